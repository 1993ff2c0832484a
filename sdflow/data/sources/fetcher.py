"""`Fetcher`: one URL's bytes over HTTP(S), for the `urls` source's rows.

Bounded time (per connect and read, and per attempt), retries with exponential backoff on 5xx / 429
/ timeouts, redirects followed by hand (at most five, every hop re-checked by `sdflow.data.netguard`), and
a byte limit checked before and while reading, on the decoded bytes (`netguard.ContentDecoder`;
identity is asked for, gzip / deflate undone with a bound). Cookies are never stored, so no row's
response can change what another row's request sends. Requests to one host pass its `HostGate`
(`download.per_host_connections`, shrunk and paused while the host refuses or stalls connects; a
refused connect is tried again `download.connect_retries` times after the host's pause).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import yarl

from sdflow.config import DownloadConfig
from sdflow.data.imaging import Rejected
from sdflow.data.netguard import (
    AddressPolicy,
    ContentDecoder,
    GuardedResolver,
    Refused,
    check_literal,
    connect_timer,
    is_public_address,
    parse_url,
    redirect_target,
    shared_ssl_context,
)
from sdflow.data.sources.hostgate import HostDown, HostGates, shared_gates

MAX_REDIRECTS = 5
REDIRECT_CODES = {301, 302, 303, 307, 308}
RETRY_CODES = {429, 500, 502, 503, 504}
OVERLOADED = {"http_429", "http_503", "timeout"}  # the host asks for less: its gate shrinks


class Retryable(Rejected):
    """A failure worth another try (5xx, 429, timeouts)."""


class ConnectFailed(Rejected):
    """A connect refused, reset or timed out: tried again after the host's pause."""


class Fetcher:
    """Downloads URLs over one aiohttp session; use as `async with Fetcher(cfg) as f:`.

    A download of small images is bound by the CPU each request costs: aiohttp's compiled HTTP
    parser spends far less of it than httpx and h11 did (`bench/download.py` reports CPU seconds
    per image; the README has the figures before and after).
    """

    def __init__(
        self,
        settings: DownloadConfig,
        policy: AddressPolicy | None = is_public_address,
        gates: HostGates | None = None,
    ):
        self.settings = settings
        self.policy = None if settings.allow_private_network else policy
        self.gates = gates or shared_gates(settings.per_host_connections, settings.backoff_s)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        seconds = self.settings.timeout_s
        connector = aiohttp.TCPConnector(
            limit=self.settings.concurrency,
            limit_per_host=0,  # the host gates cap each host, across shards
            resolver=GuardedResolver(self.policy, seconds),
            ssl=shared_ssl_context(),
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds),
            headers={"User-Agent": self.settings.user_agent, "Accept-Encoding": "identity"},
            cookie_jar=aiohttp.DummyCookieJar(),  # stores nothing: no row's cookie reaches another
            auto_decompress=False,  # decoded here, with a bound
            trust_env=False,  # through an environment proxy the guard would see only the proxy
            trace_configs=[connect_timer(self._observe)],
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, url: str | None) -> bytes:
        """The body of `url`, or `Rejected` with the failure reason of the last attempt."""
        try:
            target = parse_url(url)
        except Refused as exc:
            raise Rejected(exc.reason, exc.detail) from None
        gate = self.gates.gate(target.raw_host, target.port)
        # a slow-drip server would dodge the per-read timeout; cap the whole attempt as well
        deadline = self.settings.timeout_s * 3
        attempt = connects = 0
        while True:
            try:
                await gate.acquire()
            except HostDown as exc:
                raise Rejected("connection_error", f"{target.raw_host}: {exc}") from None
            started = time.monotonic()
            try:
                body = await asyncio.wait_for(self._get(target), deadline)
                gate.answered(time.monotonic() - started)  # the gate learns the host's pace
                return body
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
            if failure.reason in OVERLOADED:
                gate.overloaded(time.monotonic() - started)
            if attempt >= self.settings.retries:
                raise Rejected(failure.reason, failure.detail)
            await asyncio.sleep(self.settings.backoff_s * 2**attempt)
            attempt += 1

    def _observe(self, host: str, port: int, seconds: float | None) -> None:
        """How a connect went: the host's gate adapts to it."""
        gate = self.gates.gate(host, port)
        if seconds is None:
            gate.connect_failed()
        else:
            gate.connected(seconds)

    async def _get(self, url: yarl.URL) -> bytes:
        """GET with redirects followed by hand, so every hop's URL and address are checked."""
        assert self.session is not None, "use the Fetcher as an async context manager"
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                check_literal(url.raw_host, self.policy)
                async with self.session.get(url, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status in REDIRECT_CODES and location:
                        url = redirect_target(url, location)
                        continue
                    return await self._body(response)
            except Rejected:
                raise
            except Exception as exc:  # untrusted input fails its own row, never the whole stage
                failure = failure_of(exc, url)
                if isinstance(failure, ConnectFailed):
                    self._observe(url.raw_host, url.port, None)
                raise failure from None
        raise Rejected("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    async def _body(self, response: aiohttp.ClientResponse) -> bytes:
        status = response.status
        if status in RETRY_CODES or 500 <= status < 600:
            raise Retryable(f"http_{status}", str(response.url))
        if not 200 <= status < 300:
            raise Rejected(f"http_{status}", str(response.url))
        limit = self.settings.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Rejected("too_large", f"Content-Length {declared} > {limit}")
        # raw bytes, decoded here with a bound: a missing or lying Content-Length or a small
        # compressed body stops at the limit, counted on what it decodes to
        decoder = ContentDecoder(response.headers.get("Content-Encoding", ""), limit)
        chunks = [decoder.decode(raw) async for raw in response.content.iter_any()]
        decoder.finish()
        body = b"".join(chunks)
        if not body:
            raise Rejected("empty_body", str(response.url))
        return body


def failure_of(exc: Exception, url: yarl.URL) -> Rejected:
    """The failure reason for an exception raised while fetching `url`."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Refused):
        return Rejected(exc.reason, exc.detail)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectFailed("timeout", f"{type(exc).__name__} from {url}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # aiohttp's read timeouts too
        return Retryable("timeout", f"{type(exc).__name__} from {url}")
    if isinstance(exc, (aiohttp.InvalidURL, UnicodeError)):  # e.g. a host that is not valid IDNA
        return Rejected("bad_url", detail)
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
        exc, aiohttp.ClientSSLError
    ):
        return ConnectFailed("connection_error", detail)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return Rejected("connection_error", detail)
    return Rejected("fetch_error", detail)
