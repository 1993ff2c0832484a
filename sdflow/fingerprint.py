"""Content fingerprints: of bytes, files, directory trees, JSON-able values and code."""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

CHUNK = 1 << 20
# The config schema is data, not behaviour: the values a stage reads are already in its key, so a
# description edited in config.py must not invalidate every cache.
NOT_CODE = {"sdflow.config", "sdflow.errors", "sdflow.artifacts"}


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def hash_json(value: Any) -> str:
    """Stable hash of a JSON-able value (keys sorted, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_tree(root: str | Path, skip: Iterable[str] = (), skip_dirs: Iterable[str] = ()) -> str:
    """Hash of every file's relative path and content below `root`, in sorted order.

    `skip` leaves out files by relative path or name; `skip_dirs`, whole top-level folders.
    """
    root = Path(root)
    skipped, skipped_dirs = set(skip), set(skip_dirs)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skipped or path.name in skipped or rel.split("/", 1)[0] in skipped_dirs:
            continue
        digest.update(rel.encode() + b"\0" + hash_file(path).encode() + b"\n")
    return digest.hexdigest()


def hash_weights(model_dir: str | Path) -> str:
    """Hash of a model directory's weight and config files (what decides its outputs)."""
    root = Path(model_dir)
    suffixes = {".safetensors", ".bin", ".json", ".txt", ".model"}
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes):
        digest.update(path.relative_to(root).as_posix().encode() + hash_file(path).encode())
    return digest.hexdigest()


def code_version(module: ModuleType | str) -> str:
    """Hash of a module's source and of the sdflow modules whose names it uses.

    Prefect's TASK_SOURCE sees only the task function's own text; a stage's behaviour also lives in
    the helpers it calls, so they are part of its code version.
    """
    if isinstance(module, str):
        module = sys.modules[module]
    return _code_version(module.__name__)


@cache
def _code_version(name: str) -> str:
    module = sys.modules[name]
    sources = {name: inspect.getsource(module)}
    for value in vars(module).values():
        dep = (
            value
            if isinstance(value, ModuleType)
            else sys.modules.get(getattr(value, "__module__", "") or "")
        )
        if dep is not None and dep.__name__ in NOT_CODE:
            continue
        if dep is not None and dep.__name__.startswith("sdflow") and dep.__name__ not in sources:
            sources[dep.__name__] = inspect.getsource(dep)
    return hash_json(sources)[:16]
