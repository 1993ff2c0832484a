"""`hf` source: a `datasets` dataset, by hub name or local directory / file.

Loaded with `datasets.load_dataset(..., streaming=True)`, so nothing is materialised or copied into
the datasets cache: rows are read as they are used. The image column is cast to
`Image(decode=False)`: encoded bytes (or a file path) come out and the download stage decodes them in
its worker pool like any other image. Hub names should be pinned with `source.revision`; the stage
key and the load both use the commit it resolves to (`sdflow.models.hub`: the hub, or offline the
local cache), and a revision that resolves to no commit stops the run.

An image given as a file path is read only when it resolves inside the local dataset's directory
(the directory itself, or the folder of a dataset file): a row naming `../../etc/passwd`, an
absolute path elsewhere, or any path in a hub dataset fails with `outside_source`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdflow.config import SourceConfig
from sdflow.data.sources import (
    CAPTION_COLUMNS,
    Rows,
    SourceRow,
    clean_caption,
    hash_files,
    pick_column,
    row_id,
    unsafe_reason,
)
from sdflow.errors import UserError

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def fingerprint(source: SourceConfig) -> str:
    """Content hash of a local dataset; `name@commit` (or `name@revision`) for a hub dataset."""
    path = Path(source.path)
    if path.is_file():
        return hash_files(path.parent, [path.name])
    if path.is_dir():
        files = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file()
            and unsafe_reason(path, p) is None
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        return hash_files(path, files)
    return f"hub:{source.path}@{hub_commit(source)}"


def hub_commit(source: SourceConfig) -> str:
    """The commit a hub dataset's revision points at (the hub, or offline the local cache);
    a UserError when neither knows it."""
    from sdflow.models.hub import resolve_commit

    return resolve_commit(source.path, source.revision, "dataset")


def load(source: SourceConfig):
    """The split as an IterableDataset; user mistakes become UserError."""
    import datasets

    path = Path(source.path)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"Dataset file {path} must be one of {', '.join(FILE_BUILDERS)}.")
            return datasets.load_dataset(
                builder, data_files=str(path), split=source.split, streaming=True
            )
        if path.is_dir():
            return datasets.load_dataset(str(path), split=source.split, streaming=True)
        return datasets.load_dataset(
            source.path, split=source.split, revision=hub_commit(source), streaming=True
        )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise UserError(
            f"Dataset {source.path!r} (split {source.split!r}) could not be loaded: {exc}"
        ) from None


def open_rows(source: SourceConfig) -> Rows:
    import datasets

    dataset = load(source)
    names = list(dataset.features or next(iter(dataset)).keys())
    where = f"Dataset {source.path!r}"
    image = pick_column(names, source.image_column, (), "source.image_column", where)
    caption = pick_column(
        names, source.caption_column, CAPTION_COLUMNS, "source.caption_column", where
    )
    if source.id_column is not None:
        pick_column(names, source.id_column, (), "source.id_column", where)
    wanted = [c for c in (image, caption, source.id_column) if c is not None]
    dataset = dataset.select_columns(list(dict.fromkeys(wanted)))
    if dataset.features and isinstance(dataset.features[image], datasets.Image):
        dataset = dataset.cast_column(image, datasets.Image(decode=False))
    splits = getattr(dataset.info, "splits", None) or {}
    total = splits[source.split].num_examples if source.split in splits else None
    return Rows(iter_rows(source, dataset, image, caption), total or None)


def iter_rows(
    source: SourceConfig, dataset, image: str, caption: str | None
) -> Iterator[SourceRow]:
    base = dataset_dir(source)
    root = None if base is None else str(base)
    for index, example in enumerate(dataset):
        ident = example.get(source.id_column) if source.id_column else row_id(index)
        text = clean_caption(example.get(caption)) if caption else None
        data, path = image_payload(example.get(image), base)
        ref = f"{source.path}:{source.split}:{index}"
        ident = None if ident is None else str(ident)
        yield SourceRow(index, ident, text, ref, data=data, path=path, root=root)


def dataset_dir(source: SourceConfig) -> Path | None:
    """The directory image paths must stay inside: the dataset dir, a dataset file's folder, or
    None for a hub dataset (whose rows may name no local file)."""
    path = Path(source.path)
    if path.is_dir():
        return path
    return path.parent if path.is_file() else None


def image_payload(value: Any, base: Path | None) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an image cell: an undecoded Image dict, raw bytes, a path or a PIL image."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        value = value.get("path")  # a path, resolved like a plain path cell below
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        path = Path(value)
        return None, str(path if path.is_absolute() or base is None else base / path)
    if hasattr(value, "save"):  # a decoded PIL image (a dataset without Image features)
        buffer = io.BytesIO()
        value.save(buffer, format=value.format or "PNG")
        return buffer.getvalue(), None
    return None, None
