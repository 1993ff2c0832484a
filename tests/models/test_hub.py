"""Hub names are keyed and loaded by the commit their revision resolves to (offline: the cache's)."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from sdflow.errors import UserError
from sdflow.models import hub
from sdflow.models.files import weights_hash

A, B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (as every test runs)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.resolve_commit.cache_clear()
    yield tmp_path
    hub.resolve_commit.cache_clear()


def cache_download(root, name: str, revision: str, commit: str) -> None:
    """What a download leaves in the cache: refs/<revision> -> commit, and the commit's snapshot."""
    repo = root / f"models--{name.replace('/', '--')}"
    (repo / "snapshots" / commit / "unet").mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


def test_a_branch_is_keyed_by_its_commit_and_a_new_commit_is_a_new_key(hub_cache):
    cache_download(hub_cache, "org/tiny-sd", "main", A)
    first = weights_hash("org/tiny-sd", "unet", None)
    assert first == f"hub:org/tiny-sd@{A}/unet"
    assert weights_hash("org/tiny-sd", "unet", "main") == first

    cache_download(hub_cache, "org/tiny-sd", "main", B)  # upstream moved main, and we fetched it
    hub.resolve_commit.cache_clear()  # a new run
    assert weights_hash("org/tiny-sd", "unet", None) == f"hub:org/tiny-sd@{B}/unet"


def test_a_pinned_commit_needs_no_lookup(hub_cache):
    assert hub.resolve_commit("org/never-downloaded", A) == A


def test_an_unresolvable_revision_offline_is_a_clear_error(hub_cache):
    cache_download(hub_cache, "org/tiny-sd", "main", A)
    with pytest.raises(UserError, match="'org/tiny-sd' at revision 'v2' cannot be resolved"):
        hub.resolve_commit("org/tiny-sd", "v2")
    (hub_cache / "models--org--other" / "refs").mkdir(parents=True)
    (hub_cache / "models--org--other" / "refs" / "main").write_text(B)  # ref without its files
    with pytest.raises(UserError, match="pin the revision to a commit"):
        hub.resolve_commit("org/other", None)


def test_the_resolved_commit_is_what_a_run_records(hub_cache):
    from sdflow.config import ModelConfig
    from sdflow.models.files import hub_commit

    cache_download(hub_cache, "org/tiny-sd", "main", A)
    assert hub_commit(ModelConfig(init="pretrained", pretrained="org/tiny-sd")) == A
    assert hub_commit(ModelConfig(init="scratch")) is None
