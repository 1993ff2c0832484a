"""`urls` source: a URL list (parquet, CSV/TSV, JSON lines or plain text) fetched over HTTP(S).

The list is read in batches with pyarrow, so a LAION-size file never sits in memory; `path` may also
be a directory of such files (read in sorted order). Metadata columns (`similarity`, `punsafe`, ...;
see `source.metadata_columns`) travel to the shards' `metadata` column for the filter stage. The
rows' URLs are fetched by `sdflow.data.sources.fetcher.Fetcher`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from sdflow.config import SourceConfig
from sdflow.data.netguard import redact_url
from sdflow.data.sources import (
    CAPTION_COLUMNS,
    METADATA_COLUMNS,
    URL_COLUMNS,
    Rows,
    SourceRow,
    clean_caption,
    hash_files,
    metadata_json,
    pick_column,
    row_id,
)
from sdflow.errors import UserError

FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "txt",
}
BATCH_ROWS = 8192


def list_files(source: SourceConfig) -> list[Path]:
    """The URL-list files: `path` itself, or every supported file in the directory `path`."""
    path = Path(source.path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS and p.is_file())
        if not files:
            raise UserError(
                f"URL-list directory {path} holds no {', '.join(sorted(FORMATS))} files."
            )
        return files
    if not path.is_file():
        raise UserError(f"URL list {path} (source.path) does not exist.")
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"URL list {path} has an unknown extension {path.suffix!r}; "
            f"use one of {', '.join(sorted(FORMATS))}."
        )
    return [path]


def fingerprint(source: SourceConfig) -> str:
    """Hash of the URL-list file contents (the fetched images are content-hashed per sample)."""
    files = list_files(source)
    root = files[0].parent
    return hash_files(root, [f.name for f in files])


def open_rows(source: SourceConfig) -> Rows:
    files = list_files(source)
    total = None
    if all(FORMATS[f.suffix.lower()] == "parquet" for f in files):
        total = sum(parquet_rows(f) for f in files)
    return Rows(iter_rows(source, files), total)


def parquet_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"URL list {path} could not be read as parquet: {exc}") from None


def iter_rows(source: SourceConfig, files: list[Path]) -> Iterator[SourceRow]:
    index = 0
    for path in files:
        for batch in read_batches(path, source):
            urls = batch.pop("url")
            captions = batch.pop("caption", None) or [None] * len(urls)
            ids = batch.pop("id", None) or [None] * len(urls)
            for i, (url, caption, ident) in enumerate(zip(urls, captions, ids, strict=True)):
                sample_id = row_id(index) if source.id_column is None else _text(ident)
                shown = redact_url(url) if url else ""  # what shards and failures show
                metadata = metadata_json(source, {name: batch[name][i] for name in batch})
                yield SourceRow(
                    index, sample_id, clean_caption(caption), shown, url=url, metadata=metadata
                )
                index += 1


def _text(value: Any) -> str | None:
    return None if value is None or str(value) == "" else str(value)


def read_batches(path: Path, source: SourceConfig) -> Iterator[dict[str, list]]:
    """Batches of {"url": [...], "caption": [...]?, "id": [...]?} as Python lists of strings, plus
    {"<metadata column>": [...]} with the values as typed in the file (CSV numbers parsed)."""
    kind = FORMATS[path.suffix.lower()]
    if kind == "txt":
        yield from _text_batches(path)
        return
    try:
        names, reader = _open_table(path, kind)
        columns = _columns(path, names, source)
        metadata = _metadata_columns(path, names, source)
        for batch in reader(list(dict.fromkeys([*columns.values(), *metadata]))):
            roles = {role: _strings(batch.column(name)) for role, name in columns.items()}
            values = {name: batch.column(name).to_pylist() for name in metadata}
            if kind in ("csv", "tsv"):
                values = {name: [_number(v) for v in column] for name, column in values.items()}
            yield {**values, **roles}
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"URL list {path} could not be read as {kind}: {exc}") from None


def _metadata_columns(path: Path, names: list[str], source: SourceConfig) -> list[str]:
    """The metadata columns to carry: those of METADATA_COLUMNS present, or exactly the given ones."""
    if source.metadata_columns is None:
        return [name for name in METADATA_COLUMNS if name in names]
    missing = [name for name in source.metadata_columns if name not in names]
    if missing:
        raise UserError(
            f"URL list {path} has no column {', '.join(map(repr, missing))} (set in "
            f"source.metadata_columns); its columns are: {', '.join(names)}."
        )
    return list(source.metadata_columns)


def _number(text: str | None) -> str | int | float | None:
    """A CSV cell as the number it spells, else the text (CSV has no types; the columns are read
    as text so that a column of integers with one float later does not stop the reader)."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            continue
    return text


def _open_table(path: Path, kind: str):
    """Column names, and a function giving record batches of chosen columns (streaming)."""
    if kind == "parquet":
        file = pq.ParquetFile(path)
        return file.schema_arrow.names, lambda cols: file.iter_batches(BATCH_ROWS, columns=cols)
    if kind in ("csv", "tsv"):
        parse = pcsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
        read = pcsv.ReadOptions(block_size=1 << 22)
        names = pcsv.open_csv(path, read_options=read, parse_options=parse).schema.names

        def csv_batches(cols):
            convert = pcsv.ConvertOptions(
                include_columns=cols, column_types={c: pa.string() for c in cols}
            )
            return pcsv.open_csv(path, read, parse, convert)

        return names, csv_batches
    read = pjson.ReadOptions(block_size=1 << 22)
    return pjson.open_json(path, read_options=read).schema.names, lambda cols: pjson.open_json(
        path, read_options=read
    )


def _columns(path: Path, names: list[str], source: SourceConfig) -> dict[str, str]:
    url = pick_column(
        names, source.url_column, URL_COLUMNS, "source.url_column", f"URL list {path}"
    )
    if url is None:
        raise UserError(
            f"URL list {path} has no URL column: its columns are {', '.join(names) or '(none)'}; "
            f"expected one of {', '.join(URL_COLUMNS)}, or set source.url_column."
        )
    columns = {"url": url}
    where = f"URL list {path}"
    caption = pick_column(
        names, source.caption_column, CAPTION_COLUMNS, "source.caption_column", where
    )
    if caption is not None:
        columns["caption"] = caption
    if source.id_column is not None:
        columns["id"] = pick_column(names, source.id_column, (), "source.id_column", where)
    return columns


def _strings(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    return column.to_pylist()


def _text_batches(path: Path) -> Iterator[dict[str, list]]:
    """A .txt list: one URL per line (blank lines skipped, so row numbers match non-blank lines)."""
    batch: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                batch.append(line.strip())
            if len(batch) == BATCH_ROWS:
                yield {"url": batch}
                batch = []
    if batch:
        yield {"url": batch}
