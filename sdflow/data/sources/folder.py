"""`folder` source: image files below a directory, captions beside them.

Images (png, jpg, jpeg, webp, bmp, gif; any depth; hidden files skipped) are taken in sorted order of
their relative POSIX path, which is also their stable id (unless `source.id_column` names a
`metadata.jsonl` field). A caption comes from a sidecar `<stem>.txt` next to the image, else from a
`metadata.jsonl` in the Hugging Face imagefolder convention (`file_name` relative to the metadata
file's directory, plus a caption field). A missing caption is not an error here: the caption stays
null and the filter / caption stages decide. The fingerprint hashes every image, sidecar and
metadata file's content, so an image edited under the same name changes the stage key.
A file named `<stem>.mask.png` is never an image: it is the loss mask of the image `<stem>.*`
beside it (`train.masked_loss`, docs/tags-and-masks.md), hashed with it.

Only regular files inside the folder are read: an image that is a FIFO, device or socket, or a
symlink leading out of the folder, stays a row that fails with `not_a_regular_file` /
`outside_source` (never opened, never hashed); such caption and metadata files are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sdflow.config import SourceConfig
from sdflow.data.sources import (
    CAPTION_COLUMNS,
    Rows,
    SourceRow,
    clean_caption,
    hash_files,
    hash_text,
    unsafe_reason,
)
from sdflow.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA = "metadata.jsonl"
READ_SUFFIXES = (*IMAGE_SUFFIXES, ".txt")
MASK_SUFFIX = ".mask.png"  # NAME.mask.png: the loss mask of the image NAME.*


@dataclass
class Layout:
    """What a scan of the folder found, as paths relative to its root."""

    root: Path
    images: list[str] = field(default_factory=list)
    sidecars: dict[str, str] = field(default_factory=dict)  # image -> its .txt
    masks: dict[str, str] = field(default_factory=dict)  # image -> its .mask.png
    metadata: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # image -> why it is never read


def scan(source: SourceConfig) -> Layout:
    root = Path(source.path)
    if not root.is_dir():
        raise UserError(f"Image folder {root} (source.path) does not exist or is not a directory.")
    layout = Layout(root)
    texts: set[str] = set()
    masks: set[str] = set()
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_dir = PurePosixPath(Path(directory).relative_to(root).as_posix())
        for name in files:
            rel = (rel_dir / name).as_posix()
            lower = name.lower()
            if name.startswith(".") or not (lower.endswith(READ_SUFFIXES) or name == METADATA):
                continue
            unsafe = unsafe_reason(root, root / rel)
            if lower.endswith(MASK_SUFFIX):
                if not unsafe:
                    masks.add(rel)
            elif lower.endswith(IMAGE_SUFFIXES):
                layout.images.append(rel)
                if unsafe:
                    layout.refused[rel] = unsafe
            elif unsafe:
                continue  # a caption or metadata file that is not a regular file inside: ignored
            elif lower.endswith(".txt"):
                texts.add(rel)
            elif name == METADATA:
                layout.metadata.append(rel)
    if not layout.images:
        raise UserError(
            f"No images found in {root} (searched all subfolders for "
            f"{', '.join(IMAGE_SUFFIXES)}; hidden files are skipped)."
        )
    layout.images.sort()
    layout.metadata.sort()
    for image in layout.images:
        sidecar = PurePosixPath(image).with_suffix(".txt").as_posix()
        if sidecar in texts:
            layout.sidecars[image] = sidecar
        mask = PurePosixPath(image).with_suffix(MASK_SUFFIX).as_posix()
        if mask in masks:
            layout.masks[image] = mask
    return layout


def fingerprint(source: SourceConfig) -> str:
    layout = scan(source)
    readable = [image for image in layout.images if image not in layout.refused]
    files = sorted({*readable, *layout.sidecars.values(), *layout.masks.values(), *layout.metadata})
    refused = "".join(f"{rel}\0{why}\n" for rel, why in sorted(layout.refused.items()))
    return hash_files(layout.root, files) + (f":{hash_text(refused)}" if refused else "")


def open_rows(source: SourceConfig) -> Rows:
    layout = scan(source)
    return Rows(iter_rows(source, layout), len(layout.images))


def iter_rows(source: SourceConfig, layout: Layout) -> Iterator[SourceRow]:
    records = read_metadata(source, layout)
    for index, rel in enumerate(layout.images):
        record = records.get(rel, {})
        caption = record.get("caption")
        if rel in layout.sidecars:
            caption = (layout.root / layout.sidecars[rel]).read_text(
                encoding="utf-8", errors="replace"
            )
        sample_id = rel if source.id_column is None else record.get("id")
        path = layout.root / rel
        root = str(layout.root)
        mask = str(layout.root / layout.masks[rel]) if rel in layout.masks else None
        yield SourceRow(
            index, sample_id, clean_caption(caption), str(path), path=str(path), root=root,
            mask=mask,
        )  # fmt: skip


def read_metadata(source: SourceConfig, layout: Layout) -> dict[str, dict[str, str | None]]:
    """image relpath -> {"caption", "id"} from every metadata.jsonl (small: text only)."""
    records: dict[str, dict[str, str | None]] = {}
    caption_found = False
    for meta in layout.metadata:
        base = PurePosixPath(meta).parent
        for number, row in enumerate(_jsonl(layout.root / meta), start=1):
            name = row.get("file_name")
            if not isinstance(name, str):
                raise UserError(f"{layout.root / meta} line {number} has no `file_name` string.")
            key = os.path.normpath((base / name).as_posix()).replace(os.sep, "/")
            column = source.caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
            caption_found |= column in row
            ident = row.get(source.id_column) if source.id_column else None
            records[key] = {"caption": row.get(column), "id": None if ident is None else str(ident)}
    if source.caption_column and layout.metadata and not caption_found:
        raise UserError(
            f"source.caption_column is {source.caption_column!r}, but no row of "
            f"{', '.join(layout.metadata)} in {layout.root} has that field."
        )
    return records


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number} is not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} is not a JSON object.")
            yield row
