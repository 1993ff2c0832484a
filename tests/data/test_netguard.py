"""Which URLs and addresses the downloader refuses (sdflow.data.netguard)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import zlib

import pytest

from sdflow.config import DownloadConfig
from sdflow.data import netguard
from sdflow.data.imaging import Rejected
from sdflow.data.netguard import (
    ContentDecoder,
    GuardedResolver,
    Refused,
    check_literal,
    is_public_address,
    parse_url,
    redact_text,
    redact_url,
)
from sdflow.data.sources.fetcher import Fetcher

REFUSED = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata endpoint
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 wrapping 169.254.169.254
    "2001:db8::1",  # documentation
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address):
    assert is_public_address(address)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/a.png", "unsupported_scheme"),
        ("file:///etc/passwd", "unsupported_scheme"),
        ("gopher://example.com/", "unsupported_scheme"),
        ("not a url", "bad_url"),
        ("", "bad_url"),
        (None, "bad_url"),
        ("http://", "bad_url"),
        ("http://[::1/a.png", "bad_url"),
        ("http://xn--zz/a.png", "bad_url"),  # not valid IDNA
    ],
)
def test_bad_urls_are_refused_with_a_reason(url, reason):
    with pytest.raises(Refused) as caught:
        parse_url(url)
    assert caught.value.reason == reason


def test_http_and_https_urls_parse():
    assert parse_url(" https://example.com/a.png?x=1 ").host == "example.com"
    assert parse_url("HTTP://Example.com/a.png").scheme == "http"
    assert parse_url("http://b\u00fccher.de/a b.png").raw_host == "xn--bcher-kva.de"  # as browsers


def listening_socket() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    return listener


def test_the_fetcher_refuses_private_hosts_before_connecting():
    """`localhost` is resolved and refused, the literals (in every spelling libc reads) are judged
    as the addresses they are; the listening socket never sees a connection."""
    listener = listening_socket()
    port = listener.getsockname()[1]

    async def fetch(host: str) -> bytes:
        async with Fetcher(DownloadConfig(timeout_s=2, retries=0)) as fetcher:
            return await fetcher.fetch(f"http://{host}:{port}/x.png")

    try:
        numeric = ("127.1", "2130706433", "0177.0.0.1", "0x7f.1")  # libc: 127.0.0.1 each
        for host in ("localhost", "127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", *numeric):
            with pytest.raises(Rejected) as caught:
                asyncio.run(fetch(host))
            assert caught.value.reason == "refused_address", host
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


def test_the_resolver_gives_aiohttp_only_checked_addresses():
    resolver = GuardedResolver(policy=lambda ip: str(ip) == "127.0.0.1")
    (result,) = asyncio.run(resolver.resolve("127.0.0.1", 8080))
    assert (result["host"], result["port"], result["family"]) == ("127.0.0.1", 8080, socket.AF_INET)
    with pytest.raises(Refused) as caught:
        asyncio.run(GuardedResolver().resolve("localhost", 80))
    assert caught.value.reason == "refused_address"
    assert asyncio.run(GuardedResolver(policy=None).resolve("localhost", 80))  # no check


def test_a_name_that_does_not_resolve_fails_as_dns_error(monkeypatch):
    """The resolver's refusal reaches the row as it is, through aiohttp (no lookup leaves this
    machine: the system resolver is replaced by one that knows no name)."""

    async def unknown(host, port, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(netguard.anyio, "getaddrinfo", unknown)

    async def fetch() -> bytes:
        async with Fetcher(DownloadConfig(timeout_s=2, retries=0)) as fetcher:
            return await fetcher.fetch("http://images.example.test/x.png")

    with pytest.raises(Rejected) as caught:
        asyncio.run(fetch())
    assert caught.value.reason == "dns_error"
    assert "images.example.test" in caught.value.detail


def test_literal_hosts_are_judged_and_names_left_to_the_resolver():
    with pytest.raises(Refused, match="refused_address"):
        check_literal("169.254.169.254", is_public_address)
    check_literal("93.184.216.34", is_public_address)
    check_literal("localhost", is_public_address)  # a name: GuardedResolver's to judge
    check_literal("127.0.0.1", None)  # allow_private_network


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@h.example/a.jpg", "https://REDACTED@h.example/a.jpg"),
        ("https://token@h.example/a.jpg?w=1", "https://REDACTED@h.example/a.jpg?w=1"),
        (
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4&X-Amz-Security-Token=T&x-amz-signature=S",
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4&X-Amz-Security-Token=REDACTED"
            "&x-amz-signature=REDACTED",
        ),
        (
            "https://storage.googleapis.com/b/o.png?X-Goog-Credential=C&X-Goog-Signature=S&X-Goog-Expires=9",
            "https://storage.googleapis.com/b/o.png?X-Goog-Credential=REDACTED"
            "&X-Goog-Signature=REDACTED&X-Goog-Expires=9",
        ),
        (
            "https://a.blob.core.windows.net/c/x.png?sv=2021&sig=S%2B&se=2030",
            "https://a.blob.core.windows.net/c/x.png?sv=2021&sig=REDACTED&se=2030",
        ),
        ("https://h.example/x#access_token=T&s=1", "https://h.example/x#access_token=REDACTED&s=1"),
        ("https://h.example/img.png?id=3", "https://h.example/img.png?id=3"),
    ],
)
def test_credentials_and_signatures_are_redacted(url, shown):
    assert redact_url(url) == shown


def test_urls_inside_messages_are_redacted():
    text = "Client error '404' for url 'https://u:pw@h.example/a?sig=abc'\nsee https://x.example"
    assert redact_text(text) == (
        "Client error '404' for url 'https://REDACTED@h.example/a?sig=REDACTED'\n"
        "see https://x.example"
    )


def decode_all(decoder: ContentDecoder, body: bytes, chunk: int = 1024) -> bytes:
    out = [decoder.decode(body[i : i + chunk]) for i in range(0, len(body), chunk)]
    decoder.finish()
    return b"".join(out)


def test_content_decoder_undoes_gzip_and_deflate_layers():
    data = bytes(range(256)) * 40
    assert decode_all(ContentDecoder("gzip", 1 << 20), gzip.compress(data)) == data
    assert decode_all(ContentDecoder("deflate", 1 << 20), zlib.compress(data)) == data
    stacked = zlib.compress(gzip.compress(data))  # gzip applied first, then deflate
    assert decode_all(ContentDecoder("gzip, deflate", 1 << 20), stacked) == data
    assert decode_all(ContentDecoder("identity", 1 << 20), data) == data


def test_content_decoder_stops_at_the_limit_while_decoding():
    body = gzip.compress(gzip.compress(b"\0" * (64 << 20)))  # 64 MiB from a few KB
    decoder, produced = ContentDecoder("gzip, gzip", 4096), 0
    with pytest.raises(Refused) as caught:
        for i in range(0, len(body), 512):
            produced += len(decoder.decode(body[i : i + 512]))
    assert caught.value.reason == "too_large"
    assert produced <= 4096 and i < len(body)  # refused before the body was read to the end


@pytest.mark.parametrize(
    ("header", "body", "reason"),
    [
        ("br", b"x", "unsupported_encoding"),
        ("gzip, gzip, gzip, gzip", b"x", "unsupported_encoding"),
        ("gzip", b"not gzip at all", "bad_encoding"),
        ("gzip", gzip.compress(b"abc" * 1000, mtime=0)[:-20], "bad_encoding"),  # truncated
        ("identity", b"\0" * 5000, "too_large"),
    ],
    ids=["brotli", "four-layers", "not-gzip", "truncated-gzip", "too-large"],
)
def test_content_decoder_refusals(header, body, reason):
    with pytest.raises(Refused) as caught:
        decode_all(ContentDecoder(header, 4096), body)
    assert caught.value.reason == reason


NUMERIC_SPELLINGS = ["127.1", "2130706433", "0", "0177.0.0.1", "0x7f.1", "0x7F000001", "127.0.1"]
NUMERIC_SPELLINGS += ["0x7f.0.0.1", "017700000001", "10.1", "169.254.43518", "0xa9fea9fe"]


@pytest.mark.parametrize("host", NUMERIC_SPELLINGS)
def test_every_inet_aton_spelling_is_judged_as_the_address_it_is(host):
    """libc connects `127.1` to 127.0.0.1: whatever aiohttp does with it, the literal check
    must see the address (the reference is libc's own inet_aton)."""
    assert netguard.inet_aton_address(host).packed == socket.inet_aton(host)
    with pytest.raises(Refused, match="refused_address"):
        check_literal(host, is_public_address)


@pytest.mark.parametrize("host", ["8.8.8.8", "134744072", "0x8.0x8.0x8.0x8", "8.8.2056"])
def test_public_numeric_spellings_pass(host):
    assert netguard.inet_aton_address(host).packed == socket.inet_aton(host)
    check_literal(host, is_public_address)


@pytest.mark.parametrize("host", ["1.256.1", "08", "1.2.3.4.5", "0x", "1e3", "example.com"])
def test_names_are_not_taken_for_numeric_spellings(host):
    with pytest.raises(OSError):
        socket.inet_aton(host)
    assert netguard.inet_aton_address(host) is None


def test_site_local_ipv6_is_not_public():
    assert not is_public_address("fec0::1")
    assert not is_public_address("feff:ffff::1")


def test_content_decoder_refuses_data_after_the_gzip_stream_as_it_arrives():
    member = gzip.compress(b"image" * 100, mtime=0)
    decoder = ContentDecoder("gzip", 1 << 20)
    assert decoder.decode(member) == b"image" * 100
    with pytest.raises(Refused, match="after the end") as caught:
        decoder.decode(b"\0" * (1 << 16))  # the first chunk of junk, not the 80th
    assert caught.value.reason == "bad_encoding"
    second = ContentDecoder("gzip", 1 << 20)  # a second member in the same chunk
    with pytest.raises(Refused, match="after the end"):
        second.decode(member + member)


def test_content_decoder_counts_raw_bytes_against_the_limit():
    """Empty flush blocks decode to nothing: only the raw count can stop an endless stream."""
    header = gzip.compress(b"", mtime=0)[:10]
    body = header + b"\x00\x00\x00\xff\xff" * 2000  # empty stored blocks, none final
    decoder = ContentDecoder("gzip", 4096)
    with pytest.raises(Refused, match="as sent") as caught:
        for i in range(0, len(body), 512):
            assert len(decoder.decode(body[i : i + 512])) <= 1
    assert caught.value.reason == "too_large"


def serve_gzip_then_junk(junk_bytes: int) -> tuple[socket.socket, dict[str, int]]:
    """A loopback server answering one request: one gzip member, then `junk_bytes` of junk."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sent = {"bytes": 0}
    body = gzip.compress(b"x" * 1000, mtime=0)

    def answer() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n"
        try:
            conn.sendall(head + body)
            chunk = b"\0" * (1 << 16)
            while sent["bytes"] < junk_bytes:
                conn.sendall(chunk)
                sent["bytes"] += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    return listener, sent


def test_the_fetcher_refuses_junk_after_a_gzip_member_without_reading_it():
    """80 MB after one gzip member under a 1 MB limit: refused on the first junk bytes, so the
    server gets to write little more than what the socket buffers hold."""
    listener, sent = serve_gzip_then_junk(80 << 20)
    port = listener.getsockname()[1]
    settings = DownloadConfig(allow_private_network=True, max_bytes=1 << 20, timeout_s=5, retries=0)

    async def fetch() -> bytes:
        async with Fetcher(settings) as fetcher:
            return await fetcher.fetch(f"http://127.0.0.1:{port}/x.png")

    try:
        with pytest.raises(Rejected) as caught:
            asyncio.run(fetch())
        assert caught.value.reason == "bad_encoding"
        assert sent["bytes"] < 16 << 20, sent
    finally:
        listener.close()
