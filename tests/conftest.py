"""Shared fixtures: an isolated Prefect home and test server, and the demo dataset.

PREFECT_HOME is set before anything imports Prefect, so results and the database of the test
session never leak into ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sdflow-test-prefect-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """A small demo dataset in the `folder` layout (same generator as `sdflow demo`)."""
    from sdflow.sources.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo-data", count=240, seed=0)


@pytest.fixture()
def one_torch_thread():
    """Tiny models run fastest on one thread, and bitwise comparisons need the same CPU kernels in
    every run; more threads only contend with the other processes of a test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
