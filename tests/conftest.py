"""Shared fixtures: an isolated Prefect home and test server, and the demo dataset.

PREFECT_HOME is set before anything imports Prefect, so results and the database of the test
session never leak into ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# the shared builders: the tiny CLIP (`clip_dir`), the tiny model families (`tiny_sd`, `tiny_sd15`,
# `tiny_sd21`, `tiny_sdxl`; with SD's own block layout `sd15_layout`, `sd21_layout`, `sdxl_layout`),
# the hand-made latents of the training tests (`ramp_latents`, `ramp_source`), the loopback image
# server (`http_server`), a fake hub cache and the flow families (`tiny_sd3`, `tiny_flux`)
pytest_plugins = [
    "fixtures.clip",
    "fixtures.pipelines",
    "fixtures.sd_layout",
    "fixtures.training",
    "fixtures.image_server",
    "fixtures.hub",
    "fixtures.sd3",
    "fixtures.flux",
]

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sdflow-test-prefect-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# The longest modules, longest first (minutes of one core, measured in `make test`). `make test`
# runs pytest-xdist with --dist loadfile --no-loadscope-reorder, which hands whole modules to the
# workers in collection order: started first, they run side by side instead of one of them being
# left for last (by default xdist starts the modules with the most tests first, and a one-test
# module of 5 minutes last).
LONGEST_FIRST = [
    "tests/flows/test_profile_runs.py",
    "tests/flows/test_profile_runs_flow.py",
    "tests/flows/test_finetune_learns.py",
    "tests/flows/test_sweep.py",
    "tests/flows/test_pipeline.py",
    "tests/flows/test_chaos.py",
    "tests/flows/test_profile_runs_multinode.py",
    "tests/training/test_processes.py",
    "tests/flows/test_server.py",
    "tests/flows/test_dask.py",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    if missing := [path for path in LONGEST_FIRST if not (root / path).is_file()]:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names missing files: {missing}")

    def position(item: pytest.Item) -> int:
        return rank.get(item.path.relative_to(root).as_posix(), len(rank))

    items.sort(key=position)  # stable: every module's tests keep their order


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """A small demo dataset in the `folder` layout (same generator as `sdflow demo`)."""
    from sdflow.data.sources.demo import make_demo_dataset

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


# Tiny random caption models saved like pretrained ones (tests/captioners, tests/flows).
WORDS = ["a", "photograph", "of", "zebra", "quartz", "violet", "ember", "lagoon", "maple"]
TERMS = {
    "artists.txt": ["Claude Monet", "Pablo Picasso", "Hokusai"],
    "flavors.txt": ["sharp focus", "highly detailed", "soft light", "blurry", "4k", "grainy"],
    "mediums.txt": ["oil painting", "charcoal drawing", "watercolor"],
    "movements.txt": ["impressionism", "cubism", "ukiyo-e"],
    "negative.txt": ["ugly", "text", "watermark"],
}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def caption_words() -> list[str]:
    """The tiny caption models' whole vocabulary (special tokens aside)."""
    return WORDS


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BLIP whose captions are words of WORDS (special tokens banned: never empty)."""
    out = tmp_path_factory.mktemp("captioners") / "blip"
    from sdflow.data.captioners.random_init import save_random_blip, tiny_blip_config

    return save_random_blip(out, tiny_blip_config(len(WORDS) + 6), WORDS)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random open_clip model (ViT, 32 px) as a local directory. Its short text context (24
    tokens) ends clip-interrogator's term chains early: they grow until the prompt fills it."""
    from sdflow.data.captioners.random_init import save_random_open_clip

    return save_random_open_clip(tmp_path_factory.mktemp("captioners") / "clip", TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_clip_77(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_clip` with ViT-L-14's 77-token text context: room for a 32-token BLIP caption and
    the terms clip-interrogator appends (a profile's own caption length)."""
    from sdflow.data.captioners.random_init import save_random_open_clip

    text_cfg = TINY_CLIP["text_cfg"] | {"context_length": 77}
    out = tmp_path_factory.mktemp("captioners") / "clip-77"
    return save_random_open_clip(out, TINY_CLIP | {"text_cfg": text_cfg})


@pytest.fixture(scope="session")
def term_lists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("terms")
    for name, terms in TERMS.items():
        (out / name).write_text("\n".join(terms) + "\n")
    return out
