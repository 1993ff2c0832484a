"""`urls` source: a URL list (parquet, CSV/TSV, JSON lines or plain text) fetched over HTTP(S).

The list is read in batches with pyarrow, so a LAION-size file never sits in memory; `path` may also
be a directory of such files (read in sorted order). Metadata columns (`similarity`, `punsafe`, ...;
see `source.metadata_columns`) travel to the shards' `metadata` column for the filter stage. `Fetcher` downloads one URL with httpx: bounded
time, retries with exponential backoff on 5xx / 429 / timeouts, redirects followed by hand (at most
five, every hop re-checked by `sdflow.netguard`), and a byte limit checked before and while reading,
on the decoded bytes (`netguard.ContentDecoder`; identity is asked for, gzip / deflate undone with a
bound). Cookies are never stored, so no row's response can change what another row's request sends.
Requests to one host pass its `HostGate` (`download.per_host_connections`, shrunk and paused while
the host refuses or stalls connects; a refused connect is tried again `download.connect_retries`
times after the host's pause).
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from sdflow.config import DownloadConfig, SourceConfig
from sdflow.errors import UserError
from sdflow.imaging import Rejected
from sdflow.netguard import (
    AddressPolicy,
    ContentDecoder,
    Refused,
    guarded_transport,
    is_public_address,
    parse_url,
    redact_url,
)
from sdflow.sources import (
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
from sdflow.sources.hostgate import HostDown, HostGates, shared_gates

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
MAX_REDIRECTS = 5
REDIRECT_CODES = {301, 302, 303, 307, 308}
RETRY_CODES = {429, 500, 502, 503, 504}
DEFAULT_PORTS = {"http": 80, "https": 443}


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


class Retryable(Rejected):
    """A failure worth another try (5xx, 429, timeouts)."""


class ConnectFailed(Rejected):
    """A connect refused, reset or timed out: tried again after the host's pause."""


class Fetcher:
    """Downloads URLs with a few shared async clients; use as `async with Fetcher(cfg) as f:`.

    httpcore's pool scans every connection (with a poll() syscall per idle one) each time a request
    starts or ends, so one pool of hundreds of connections spends more CPU on bookkeeping than on
    images. `concurrency` is split over pools of at most CLIENT_CONNECTIONS connections instead, and
    each request goes to the least busy one.
    """

    CLIENT_CONNECTIONS = 8

    def __init__(
        self,
        settings: DownloadConfig,
        policy: AddressPolicy | None = is_public_address,
        gates: HostGates | None = None,
    ):
        self.settings = settings
        self.policy = None if settings.allow_private_network else policy
        self.gates = gates or shared_gates(settings.per_host_connections, settings.backoff_s)
        self.clients: list[httpx.AsyncClient] = []
        self.busy: list[int] = []

    async def __aenter__(self) -> Fetcher:
        count = math.ceil(self.settings.concurrency / self.CLIENT_CONNECTIONS)
        size = math.ceil(self.settings.concurrency / count)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        for _ in range(count):
            client = httpx.AsyncClient(
                transport=guarded_transport(limits, self.policy, self._observe),
                timeout=httpx.Timeout(self.settings.timeout_s),
                headers={"User-Agent": self.settings.user_agent, "Accept-Encoding": "identity"},
                cookies=no_cookies(),
                follow_redirects=False,
                trust_env=False,
            )
            self.clients.append(client)
        self.busy = [0] * count
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self.clients:
            await client.aclose()

    async def fetch(self, url: str | None) -> bytes:
        """The body of `url`, or `Rejected` with the failure reason of the last attempt."""
        try:
            target = parse_url(url)
        except Refused as exc:
            raise Rejected(exc.reason, exc.detail) from None
        gate = self.gates.gate(_host_key(target), target.port or DEFAULT_PORTS[target.scheme])
        # a slow-drip server would dodge the per-read timeout; cap the whole attempt as well
        deadline = self.settings.timeout_s * 3
        attempt = connects = 0
        while True:
            try:
                await gate.acquire()
            except HostDown as exc:
                raise Rejected("connection_error", f"{_host_key(target)}: {exc}") from None
            try:
                return await asyncio.wait_for(self._follow(target), deadline)
            except asyncio.TimeoutError:
                failure = Retryable("timeout", f"no complete answer within {deadline:g}s")
            except ConnectFailed as exc:  # the gate paused the host: that is the back-off
                connects += 1
                if connects > self.settings.connect_retries:
                    raise Rejected(exc.reason, exc.detail) from None
                continue
            except Retryable as exc:
                failure = exc
            finally:
                gate.release()
            if attempt >= self.settings.retries:
                raise Rejected(failure.reason, failure.detail)
            await asyncio.sleep(self.settings.backoff_s * 2**attempt)
            attempt += 1

    def _observe(self, host: str, port: int, seconds: float | None) -> None:
        """How a connect went, from the transport: the host's gate adapts to it."""
        gate = self.gates.gate(host, port)
        if seconds is None:
            gate.connect_failed()
        else:
            gate.connected(seconds)

    async def _follow(self, url: httpx.URL) -> bytes:
        """GET with redirects followed by hand, so every hop's URL and address are checked."""
        pick = self.busy.index(min(self.busy))
        self.busy[pick] += 1
        try:
            return await self._get(self.clients[pick], url)
        finally:
            self.busy[pick] -= 1

    async def _get(self, client: httpx.AsyncClient, url: httpx.URL) -> bytes:
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                async with client.stream("GET", url) as response:
                    location = response.headers.get("location")
                    if response.status_code in REDIRECT_CODES and location:
                        url = parse_url(str(url.join(location)))
                        continue
                    return await self._body(response)
            except Rejected:
                raise
            except Exception as exc:  # untrusted input fails its own row, never the whole stage
                raise failure_of(exc, url) from None
        raise Rejected("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    async def _body(self, response: httpx.Response) -> bytes:
        status = response.status_code
        if status in RETRY_CODES or 500 <= status < 600:
            raise Retryable(f"http_{status}", str(response.url))
        if not 200 <= status < 300:
            raise Rejected(f"http_{status}", str(response.url))
        limit = self.settings.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Rejected("too_large", f"Content-Length {declared} > {limit}")
        # raw bytes, decoded here with a bound: a missing or lying Content-Length or a small
        # compressed body stops at the limit, counted on what it decodes to
        decoder = ContentDecoder(response.headers.get("content-encoding", ""), limit)
        chunks = [decoder.decode(raw) async for raw in response.aiter_raw()]
        decoder.finish()
        body = b"".join(chunks)
        if not body:
            raise Rejected("empty_body", str(response.url))
        return body


def no_cookies() -> CookieJar:
    """A cookie jar that stores nothing: a Set-Cookie from one row never reaches another row.

    Handed to httpx as the jar itself (httpx copies an `httpx.Cookies` into a default jar)."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def failure_of(exc: Exception, url: httpx.URL) -> Rejected:
    """The failure reason for an exception raised while fetching `url`."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Refused):
        return Rejected(exc.reason, exc.detail)
    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectFailed("timeout", f"{type(exc).__name__} from {url}")
    if isinstance(exc, httpx.TimeoutException):
        return Retryable("timeout", f"{type(exc).__name__} from {url}")
    if isinstance(exc, (httpx.InvalidURL, UnicodeError)):  # e.g. a host that is not valid IDNA
        return Rejected("bad_url", detail)
    if isinstance(exc, httpx.ConnectError) and not _caused_by_dns(exc):
        return ConnectFailed("connection_error", detail)
    if isinstance(exc, (httpx.TransportError, httpx.DecodingError)):
        return Rejected("dns_error" if _caused_by_dns(exc) else "connection_error", detail)
    return Rejected("fetch_error", detail)


def _host_key(url: httpx.URL) -> str:
    """The host as the transport sees it (IDNA-encoded ASCII), so gate keys match on both sides."""
    return url.raw_host.decode("ascii").lower()


def _caused_by_dns(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, socket.gaierror):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
