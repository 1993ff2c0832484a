"""Hub models pinned to the commit they resolve to, so a stage key never names a moving branch.

`model.pretrained: stable-diffusion-v1-5/stable-diffusion-v1-5` with `model.revision: main` means
whatever `main` is today; caching on the words would reuse outputs made from last month's weights.
`resolve_commit` asks the hub once per run (process) which commit a revision is, and the stages
key on and load exactly that commit. Offline (HF_HUB_OFFLINE, no network), the commit the local
cache recorded for the revision (`refs/<revision>`, whose snapshot holds the files) is used; when
neither knows it, the run stops with a message saying how to pin one.

Every hub load goes through this one resolver with the same revision the stage key used (models,
schedulers, captioners, classifiers, CLIP, hub datasets): `pinned(source, revision)` gives the
`revision=<commit>` keyword for a hub name and nothing for a local directory. Nothing falls back to
`main` or to the bare revision.
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sdflow.errors import UserError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
log = logging.getLogger("sdflow.models.hub")


@lru_cache(maxsize=128)
def resolve_commit(name: str, revision: str | None = None, repo_type: str = "model") -> str:
    """The commit `revision` (default `main`) of hub repository `name` points to."""
    revision = revision or "main"
    if COMMIT.match(revision):
        return revision
    if not _offline():
        try:
            sha = HfApi().repo_info(name, revision=revision, repo_type=repo_type).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise UserError(
                f"The hub has no {repo_type} {name!r} at revision {revision!r} "
                f"({type(exc).__name__}). Check the name and the revision."
            ) from None
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
            log.warning(
                "hub unreachable for %s@%s (%s); trying the local cache", name, revision, exc
            )
        else:
            if sha:
                return sha
    cached = cached_commit(name, revision, repo_type)
    if cached is None:
        raise UserError(
            f"{repo_type} {name!r} at revision {revision!r} cannot be resolved to a commit: the hub "
            "is not reachable (or HF_HUB_OFFLINE is set) and the local Hugging Face cache has no "
            "download of that revision. Connect once so it is cached, or pin the revision to a "
            "commit hash that is in the cache."
        )
    return cached


def pinned(
    source: str, revision: str | None, hub: bool, repo_type: str = "model"
) -> dict[str, str]:
    """`{"revision": <commit>}` for a hub repository (`hub`), `{}` for a local one: the keyword to
    pass to `from_pretrained` / `load_dataset` so the load reads the commit the stage key names."""
    return {"revision": resolve_commit(source, revision, repo_type)} if hub else {}


def cached_commit(name: str, revision: str, repo_type: str = "model") -> str | None:
    """The commit the local cache recorded for `revision`, when its snapshot is there."""
    repo = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}"
    try:
        sha = (repo / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return sha if COMMIT.match(sha) and (repo / "snapshots" / sha).is_dir() else None


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or flag in {"1", "true", "yes", "on"}
