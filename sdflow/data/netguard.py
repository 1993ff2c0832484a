"""Which URLs the downloader may fetch, checked where it matters: at connect time.

A URL list is untrusted input. Without a guard, a list (or a redirect in it) can point the downloader
at cloud metadata endpoints, admin interfaces on localhost or the private network (SSRF). Two checks:

- `parse_url`: only absolute http(s) URLs with a host.
- `GuardedResolver` (aiohttp's resolver) resolves the host itself and refuses if ANY of its addresses
  is private, loopback, link-local, multicast, reserved or unspecified; aiohttp then connects to one
  of the exact addresses checked (no second DNS lookup an attacker could answer differently), and
  `check_literal` judges IP-literal hosts, which aiohttp does not resolve: every spelling libc's
  `inet_aton` takes (`127.1`, `2130706433`, `0`, octal `0177.0.0.1`, hex `0x7f.1`) counts as the
  literal it stands for, whatever the installed aiohttp makes of it. The downloader applies
  both to every request, redirect hops included, so each hop is re-checked. `connect_timer` tells
  an observer how long each new connection took to connect (`ConnectObserver`), which the
  downloader's per-host gates (`sdflow.data.sources.hostgate`) adapt to.

And what a response may do: `ContentDecoder` undoes `Content-Encoding` layers with a bound on what
each layer produces and on the raw bytes read, checked as it decodes (a few KB of `gzip, gzip` can
decode to gigabytes), and refuses bytes after the end of a compressed stream. What
the downloader writes or logs about a URL goes through `redact_url` / `redact_text`: credentials
and signed query parameters never reach the failures table, logs or reports.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import anyio
import certifi
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
ConnectObserver = Callable[[str, int, "float | None"], None]  # host, port, seconds (None: failed)

ALLOWED_SCHEMES = ("http", "https")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: embeds an IPv4 address in the low bits
# one part of an inet_aton address: hex (0x..., digits optional), octal (leading 0) or decimal
_INET_PART = re.compile(r"(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


class Refused(Exception):
    """A URL the downloader will not fetch; `reason` is its failure code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_url(url: object) -> yarl.URL:
    """An absolute http(s) URL with a host, or `Refused` (`bad_url` / `unsupported_scheme`).

    yarl (aiohttp's URL type) encodes the host as IDNA, as browsers do, and percent-encodes the rest."""
    if not isinstance(url, str) or not url.strip():
        raise Refused("bad_url", f"not a URL: {url!r}")
    try:
        parsed = yarl.URL(url.strip())
        parsed.host  # noqa: B018 - decodes the IDNA host, which fails for malformed "xn--" labels
    except (ValueError, TypeError) as exc:  # UnicodeError included
        raise Refused("bad_url", f"{url!r}: {exc}") from None
    if not parsed.scheme:
        raise Refused("bad_url", f"{url!r} has no scheme")
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise Refused("unsupported_scheme", f"{parsed.scheme!r} in {url!r}; only http and https")
    if not parsed.raw_host:
        raise Refused("bad_url", f"{url!r} has no host")
    return parsed


def redirect_target(url: yarl.URL, location: str) -> yarl.URL:
    """Where a redirect from `url` to `location` (absolute or relative) leads, checked as a URL."""
    try:
        joined = url.join(yarl.URL(location))
    except (ValueError, TypeError) as exc:
        raise Refused("bad_url", f"redirect to {location!r}: {exc}") from None
    return parse_url(str(joined))


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.version == 4:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress | str) -> bool:
    """True only for globally routable unicast addresses (IPv4-in-IPv6 forms judged by the IPv4)."""
    ip = ipaddress.ip_address(ip)
    inner = embedded_ipv4(ip)
    if inner is not None:
        return is_public_address(inner)  # the packets go to the IPv4 address
    if ip.version == 6 and ip.teredo is not None:
        return False  # a tunnel whose far end we cannot judge
    flags = (
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_multicast,
        ip.is_reserved,
        ip.is_unspecified,
        ip.version == 6 and ip.is_site_local,  # fec0::/10: deprecated, still routed inside sites
    )
    return ip.is_global and not any(flags)


async def resolve(host: str, port: int, timeout: float | None = None) -> list[str]:
    """Every address `host` resolves to (literals included), in resolver order, without repeats."""
    try:
        with anyio.fail_after(timeout):
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused("dns_error", f"{host}: {exc}") from None
    except TimeoutError:
        raise Refused("dns_error", f"{host}: no answer within {timeout}s") from None
    except UnicodeError as exc:  # not a valid IDNA host name
        raise Refused("bad_url", f"{host}: {exc}") from None
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    return addresses


def check_addresses(host: str, addresses: Iterable[str], policy: AddressPolicy) -> None:
    """Refuse the host when any of its addresses fails the policy (round-robin DNS could pick it)."""
    for address in addresses:
        if not policy(ipaddress.ip_address(address)):
            raise Refused("refused_address", f"{host} resolves to {address}")


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for the downloader: resolve, refuse the host if ANY of its addresses fails
    `policy` (None: no check), and give aiohttp exactly the checked addresses to connect to.

    aiohttp skips the resolver for IP-literal hosts: `check_literal` covers those."""

    def __init__(
        self, policy: AddressPolicy | None = is_public_address, timeout: float | None = None
    ):
        self.policy, self.timeout = policy, timeout

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await resolve(host, port, self.timeout)
        if self.policy is not None:
            check_addresses(host, addresses, self.policy)
        return [_result(host, address, port) for address in addresses]

    async def close(self) -> None:
        pass


def _result(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    return {
        "hostname": host,
        "host": address,
        "port": port,
        "family": family,
        "proto": 0,
        "flags": flags,
    }


def check_literal(host: str, policy: AddressPolicy | None) -> None:
    """Refuse an IP-literal host that fails `policy`; a name is left to `GuardedResolver`."""
    if policy is None:
        return
    address = literal_address(host)
    if address is not None:
        check_addresses(host, [str(address)], policy)


def literal_address(host: str) -> IPAddress | None:
    """The address an IP-literal host stands for (any `inet_aton` spelling), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return inet_aton_address(host)


def inet_aton_address(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address libc's `inet_aton` reads `host` as (1 to 4 parts, each decimal, octal or
    hex; the last part fills the remaining bytes), or None when it is no such spelling."""
    parts = host.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_PART.fullmatch(p) for p in parts):
        return None
    values = [_inet_part(p) for p in parts]
    if any(v > 255 for v in values[:-1]) or values[-1] >= 256 ** (5 - len(parts)):
        return None
    number = values[-1]
    for i, value in enumerate(values[:-1]):
        number += value << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _inet_part(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:], 16)
    return int(part, 8) if part.startswith("0") else int(part)


def connect_timer(observer: ConnectObserver) -> aiohttp.TraceConfig:
    """An aiohttp trace telling `observer` how long each new connection's connect took (from the
    end of its DNS lookup, so a slow resolver is not taken for a host that drops SYNs). Failed
    connects raise in the request; the caller reports those."""
    trace = aiohttp.TraceConfig()

    async def request(_session, context, params) -> None:
        context.host, context.port = params.url.raw_host, params.url.port

    async def started(_session, context, _params) -> None:
        context.started = time.monotonic()

    async def connected(_session, context, _params) -> None:
        observer(context.host, context.port, time.monotonic() - context.started)

    trace.on_request_start.append(request)
    trace.on_connection_create_start.append(started)
    trace.on_dns_resolvehost_end.append(started)
    trace.on_dns_cache_hit.append(started)
    trace.on_connection_create_end.append(connected)
    return trace


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """A verifying TLS context on certifi's CA bundle, built once per process (each build loads the
    bundle, ~80 ms)."""
    return ssl.create_default_context(cafile=certifi.where())


# Query / fragment parameters that carry credentials or signatures (S3, GCS, Azure SAS, CloudFront,
# OAuth, API keys); matched case-insensitively, exactly or as a part of the name.
SECRET_PARAMS = frozenset({"sig", "key", "auth", "code", "policy", "key-pair-id"})
SECRET_PARTS = ("signature", "token", "credential", "secret", "password", "apikey", "api_key")
REDACTED = "REDACTED"
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _secret(name: str) -> bool:
    name = unquote(name).lower()
    return name in SECRET_PARAMS or any(part in name for part in SECRET_PARTS)


def _redact_params(text: str) -> str:
    pairs = text.split("&")
    return "&".join(
        f"{p.split('=', 1)[0]}={REDACTED}" if "=" in p and _secret(p.split("=", 1)[0]) else p
        for p in pairs
    )


def redact_url(url: str) -> str:
    """`url` without its user:password and with secret query / fragment values replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit(
        parts._replace(
            netloc=netloc,
            query=_redact_params(parts.query),
            fragment=_redact_params(parts.fragment),
        )
    )


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (exception messages quote the URL they failed on)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)


ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits: gzip header / zlib header
MAX_ENCODING_LAYERS = 3


class ContentDecoder:
    """Undoes a response's Content-Encoding chunk by chunk; no layer may yield more than `limit`.

    Each layer's zlib call is given the room left under the limit as `max_length`, so memory stays
    bounded by the limit however small the compressed body is (the HTTP client's own decoding
    knows nothing of `download.max_bytes`: it is switched off). The raw bytes read count against
    the same limit, and bytes after the end of a layer's stream (junk, or a second gzip member,
    which browsers and libraries decode differently) are refused as they arrive, so nothing piles
    up in zlib's `unused_data`. `identity` passes through, still counted; other encodings are
    refused.
    """

    def __init__(self, header: str, limit: int):
        codings = [c.strip().lower() for c in header.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        unknown = [c for c in codings if c not in ENCODINGS]
        if unknown or len(codings) > MAX_ENCODING_LAYERS:
            raise Refused("unsupported_encoding", f"Content-Encoding {header!r}")
        # the last coding listed was applied last, so it is undone first
        self.layers = [zlib.decompressobj(ENCODINGS[c]) for c in reversed(codings)]
        self.produced = [0] * (len(self.layers) + 1)  # per layer, and the final output
        self.raw = 0
        self.header, self.limit = header, limit

    def decode(self, data: bytes) -> bytes:
        self.raw += len(data)
        if self.raw > self.limit:
            raise Refused("too_large", f"body passed {self.limit} bytes as sent")
        for i, layer in enumerate(self.layers):
            if layer.eof and data:
                raise Refused("bad_encoding", f"{self.header}: data after the end of the stream")
            try:
                data = layer.decompress(data, self.limit + 1 - self.produced[i])
            except zlib.error as exc:
                raise Refused("bad_encoding", f"{self.header}: {exc}") from None
            if layer.unused_data:
                raise Refused("bad_encoding", f"{self.header}: data after the end of the stream")
            self._count(i, data)
        self._count(len(self.layers), data)
        return data

    def finish(self) -> None:
        """Refuse a body that ended inside a compressed stream."""
        if not all(layer.eof for layer in self.layers):
            raise Refused("bad_encoding", f"{self.header} body ended early")

    def _count(self, layer: int, data: bytes) -> None:
        self.produced[layer] += len(data)
        if self.produced[layer] > self.limit:  # stop at the limit: the rest is never decoded
            detail = f"body passed {self.limit} bytes"
            raise Refused(
                "too_large", f"{detail} decoded from {self.header}" if self.layers else detail
            )
