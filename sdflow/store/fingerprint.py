"""Content fingerprints: of bytes, files, directory trees, JSON-able values and code."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

CHUNK = 1 << 20
# Modules that change no stage output: the config schema is data (the values a stage reads are
# already in its key, so a description edited in sdflow/config/ must not invalidate every
# cache), and the Prefect wiring, UI artifacts and error types decide how a stage runs, not what
# it writes. A package here covers its modules.
NOT_CODE = {
    "sdflow.config",
    "sdflow.errors",
    "sdflow.ops.artifacts",
    "sdflow.ops.orchestration",
    "sdflow.ops.gpuslots",
}


def _not_code(module: str) -> bool:
    """`module` or a package above it is in NOT_CODE (the config package's modules included)."""
    parts = module.split(".")
    return any(".".join(parts[:i]) in NOT_CODE for i in range(1, len(parts) + 1))


# Libraries whose new minor release may compute different tensors (import name -> distribution).
TENSOR_LIBRARIES = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "peft": "peft",
    "PIL": "pillow",
    "tokenizers": "tokenizers",
    "open_clip": "open_clip_torch",
}


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


def code_version(module: ModuleType | str, follow: tuple[str, ...] = ("sdflow",)) -> str:
    """Hash of a stage module's source, of every module of the `follow` packages it imports
    (transitively, also imports inside functions), and of the major.minor versions of the
    `TENSOR_LIBRARIES` any of them imports.

    Prefect's TASK_SOURCE sees only the task function's own text; a stage's behaviour also lives in
    the helpers it calls and in the libraries that compute its tensors, so all of them decide
    whether a cached output is still valid. Editing `sdflow/schedules.py` retrains; upgrading
    diffusers from 0.35 to 0.36 re-encodes; a patch release changes nothing.
    """
    name = module if isinstance(module, str) else module.__name__
    return _code_version(name, follow)


@cache
def _code_version(name: str, follow: tuple[str, ...]) -> str:
    sources, libraries = code_closure(name, follow)
    versions = {lib: library_version(TENSOR_LIBRARIES[lib]) for lib in sorted(libraries)}
    return hash_json({"sources": sources, "libraries": versions})[:16]


def code_closure(name: str, follow: tuple[str, ...] = ("sdflow",)) -> tuple[dict[str, str], set]:
    """(module name -> source text, tensor libraries imported) of `name` and what it imports."""
    sources: dict[str, str] = {}
    libraries: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in sources or _not_code(current):
            continue
        sources[current] = _source(current)
        for imported in _imports(sources[current], current):
            top = imported.partition(".")[0]
            if top in follow:
                pending.extend(_with_parents(imported))
            elif top in TENSOR_LIBRARIES:
                libraries.add(top)
    return {k: sources[k] for k in sorted(sources)}, libraries


def library_version(distribution: str) -> str | None:
    """major.minor of an installed distribution (None when it is not installed)."""
    try:
        return ".".join(metadata.version(distribution).split(".")[:2])
    except metadata.PackageNotFoundError:
        return None


def _imports(source: str, module: str) -> Iterator[str]:
    """Every module name an `import` statement anywhere in `source` names (relative ones resolved);
    for `from package import name`, also `package.name`, which may be a submodule."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def _with_parents(name: str) -> list[str]:
    """`a.b.c` and the packages importing it runs (`a.b`, `a`), those that exist as files."""
    parts = name.split(".")
    names = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return [n for n in names if _path(n) is not None]


def _source(name: str) -> str:
    path = _path(name)
    if path is None:
        raise ModuleNotFoundError(f"no source for module {name!r}")
    return path.read_text()


def _is_package(name: str) -> bool:
    path = _path(name)
    return path is not None and path.name == "__init__.py"


@cache
def _path(name: str) -> Path | None:
    """The source file of module `name`: the loaded module's, else found without importing it."""
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None):
        return Path(loaded.__file__)
    top, _, rest = name.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return Path(spec.origin) if spec and spec.origin and not rest else None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(
        *rest.split(".") if rest else []
    )
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None
