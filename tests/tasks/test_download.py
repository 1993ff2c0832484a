"""The download stage against a real HTTP server on 127.0.0.1, and on folders and local datasets."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fixtures.image_server import JPEG, MAX_BYTES, PNG, image_bytes, stacked_gzip_bomb
from PIL import Image

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.store.stageio import load_manifest, read_failures, read_shards, stage_dir
from tasks.download import download, download_key


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def url_list(tmp_path: Path, urls: list[str], name: str = "list.csv") -> str:
    path = tmp_path / name
    lines = ["url,caption"] + [f"{u},caption {i}" for i, u in enumerate(urls)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def config_for(source: dict, **download) -> RunConfig:
    settings = {
        "resolution": 32,
        "shard_size": 4,
        "timeout_s": 0.5,
        "retries": 1,
        "backoff_s": 0.05,
        "max_bytes": MAX_BYTES,
        "concurrency": 8,
        "decode_workers": 2,
        "allow_private_network": True,
        **download,
    }
    return RunConfig.model_validate({"source": source, "download": settings})


def fates(workdir: Path, manifest: dict) -> dict[str, str]:
    """id -> "kept" or the failure reason, for every row."""
    result = {}
    for table in read_shards(workdir, manifest, columns=["id"]):
        result.update(dict.fromkeys(table["id"].to_pylist(), "kept"))
    for row in read_failures(workdir, manifest).to_pylist():
        assert row["id"] not in result, f"{row['id']} is both kept and failed"
        result[row["id"]] = row["reason"]
    return result


EXPECTED = {
    "/good.png": "kept",
    "/good.jpg": "kept",
    "/missing": "http_404",
    "/flaky.png": "kept",
    "/busy": "http_429",
    "/hang": "timeout",
    "/page.html": "not_an_image",
    "/truncated.jpg": "decode_error",
    "/empty": "empty_body",
    "/big": "too_large",
    "/big-chunked": "too_large",
    "/redirect": "kept",
    "/loop": "too_many_redirects",
    "/bomb.png": "decompression_bomb",
}


def test_every_row_is_kept_or_fails_with_its_reason(tmp_path, http_server):
    urls = [http_server.url(p) for p in EXPECTED]
    urls += ["ftp://127.0.0.1/x.png", "not-a-url", f"http://127.0.0.1:{closed_port()}/x.png"]
    expected = [*EXPECTED.values(), "unsupported_scheme", "bad_url", "connection_error"]
    config = config_for({"kind": "urls", "path": url_list(tmp_path, urls)})
    manifest = download(config, {}, str(tmp_path / "work"))

    got = fates(tmp_path / "work", manifest)
    assert got == {f"{i:08d}": fate for i, fate in enumerate(expected)}
    counts = manifest["counts"]
    assert counts["input"] == len(urls) == counts["kept"] + counts["failed"]
    assert counts["kept"] == 4 and counts["failed_by_reason"]["too_large"] == 2
    info = manifest["info"]
    assert info["images_per_second"] == pytest.approx(4 / info["seconds_this_run"], abs=0.01)
    assert http_server.hits["/flaky.png"] == 2  # retried after the 500, then kept
    assert http_server.hits["/busy"] == 2 and http_server.hits["/hang"] == 2
    assert http_server.hits["/loop"] == 6  # first request + 5 redirects, then given up

    rows = {r["id"]: r for t in read_shards(tmp_path / "work", manifest) for r in t.to_pylist()}
    good = rows["00000000"]
    assert good["content_hash"] == hashlib.sha256(PNG).hexdigest()
    assert (good["width"], good["height"], good["orig_width"], good["orig_height"]) == (
        32,
        32,
        48,
        40,
    )
    assert Image.open(io.BytesIO(good["image"])).format == "PNG"
    assert good["caption"] == "caption 0" and good["source"] == urls[0]
    assert rows["00000011"]["content_hash"] == hashlib.sha256(JPEG).hexdigest()  # redirected


def test_private_addresses_are_refused_without_any_request(tmp_path, http_server):
    port = http_server.server_address[1]
    urls = [http_server.url(p) for p in EXPECTED]
    urls += [f"http://localhost:{port}/good.png", f"http://[::1]:{port}/good.png"]
    config = config_for(
        {"kind": "urls", "path": url_list(tmp_path, urls)}, allow_private_network=False
    )
    with pytest.raises(UserError, match="refused_address.*allow_private_network"):
        download(config, {}, str(tmp_path / "work"))
    assert http_server.log == []
    partial = stage_dir(tmp_path / "work", "download", download_key(config, {}))
    partial = partial.with_name(f".{partial.name}.partial")
    reasons = [
        r
        for p in sorted((partial / "failures").glob("*.parquet"))
        for r in pq.read_table(p)["reason"].to_pylist()
    ]
    assert reasons == ["refused_address"] * len(urls)


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    return stacked_gzip_bomb(1024)


PEAK_SCRIPT = """
import json, resource, sys
from sdflow.config import RunConfig
from tasks.download import download
config = RunConfig.model_validate(json.loads(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
download(config, {}, sys.argv[2])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # KiB on Linux
"""


def download_peak_mib(config: RunConfig, workdir: Path) -> float:
    """Run the download stage in a fresh process; how far it raised that process's peak RSS (MiB).

    A fresh process: ru_maxrss is a process-wide high-water mark, which in a test process (an xdist
    worker) an earlier test may already have raised past anything this download does."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, config.model_dump_json(), str(workdir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_a_stacked_gzip_bomb_fails_with_memory_bounded(tmp_path, http_server, gzip_bomb):
    """2.5 KB of `gzip, gzip` that decodes to 1 GiB: refused at max_bytes of decoded output."""
    assert len(gzip_bomb) < 8000
    assert len(gzip.decompress(gzip_bomb)) < 2_000_000  # one layer off: still compressed
    http_server.bomb = gzip_bomb
    urls = [http_server.url(p) for p in ("/gzip-bomb.png", "/gzip.png", "/br.png")]
    config = config_for({"kind": "urls", "path": url_list(tmp_path, urls)})
    assert download_peak_mib(config, tmp_path / "work") < 200  # 1 GiB if it were decoded
    manifest = load_manifest(stage_dir(tmp_path / "work", "download", download_key(config, {})))

    assert fates(tmp_path / "work", manifest) == {
        "00000000": "too_large",
        "00000001": "kept",  # a single gzip layer is undone (the PNG is under max_bytes)
        "00000002": "unsupported_encoding",
    }
    details = read_failures(tmp_path / "work", manifest).to_pylist()
    assert f"body passed {MAX_BYTES} bytes decoded from gzip, gzip" in details[0]["detail"]
    row = next(read_shards(tmp_path / "work", manifest)).to_pylist()[0]
    assert row["content_hash"] == hashlib.sha256(PNG).hexdigest()
    for headers in http_server.headers.values():
        assert {k.lower(): v for k, v in headers.items()}["accept-encoding"] == "identity"


def test_no_cookie_is_carried_from_one_row_to_the_next(tmp_path, http_server):
    urls = [http_server.url(p) for p in ("/set-cookie.png", "/good.png", "/good.jpg")]
    config = config_for({"kind": "urls", "path": url_list(tmp_path, urls)}, concurrency=1)
    manifest = download(config, {}, str(tmp_path / "work"))
    assert manifest["counts"]["kept"] == 3
    assert http_server.log == ["/set-cookie.png", "/good.png", "/good.jpg"]  # in row order
    for path in ("/good.png", "/good.jpg"):
        assert "cookie" not in {k.lower() for k in http_server.headers[path]}


SECRETS = ("hunter2", "AKIAEXAMPLE", "deadbeef", "s3cr3t", "tok123", "g00gsig", "cfsig", "KP1")


def test_credentials_and_signatures_never_reach_failures_or_shards(tmp_path, http_server):
    port = http_server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    urls = [
        f"http://alice:hunter2@127.0.0.1:{port}/missing",
        f"{base}/missing?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef&X-Amz-Expires=60",
        f"{base}/missing?sv=2020-08-04&sig=s3cr3t&token=tok123",
        f"http://127.0.0.1:{closed_port()}/x.png?X-Goog-Signature=g00gsig",
        f"{base}/good.png?Signature=cfsig&Key-Pair-Id=KP1",
    ]
    config = config_for({"kind": "urls", "path": url_list(tmp_path, urls)})
    manifest = download(config, {}, str(tmp_path / "work"))
    assert manifest["counts"]["kept"] == 1
    assert "X-Amz-Signature=deadbeef" in next(p for p in http_server.log if "Amz" in p)  # sent

    failures = read_failures(tmp_path / "work", manifest).to_pylist()
    kept = [r["source"] for t in read_shards(tmp_path / "work", manifest) for r in t.to_pylist()]
    written = json.dumps([failures, kept])
    assert not [secret for secret in SECRETS if secret in written]
    assert [f["source"] for f in failures][:3] == [
        f"http://REDACTED@127.0.0.1:{port}/missing",
        f"{base}/missing?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&X-Amz-Expires=60",
        f"{base}/missing?sv=2020-08-04&sig=REDACTED&token=REDACTED",
    ]
    assert failures[1]["detail"] == failures[1]["source"]  # the 404 detail names the URL, redacted
    assert kept == [f"{base}/good.png?Signature=REDACTED&Key-Pair-Id=REDACTED"]


@pytest.mark.parametrize(
    ("mode", "size"), [("center_crop", (32, 32)), ("keep_ratio", (32, 27)), ("none", (48, 40))]
)
def test_resize_modes_from_a_parquet_list(tmp_path, http_server, mode, size):
    import pyarrow as pa

    path = tmp_path / "list.parquet"
    table = pa.table(
        {"URL": [http_server.url("/good.png")], "TEXT": ["a caption"], "punsafe": [0.125]}
    )
    pq.write_table(table, path)
    config = config_for({"kind": "urls", "path": str(path)}, resize_mode=mode, image_format="jpeg")
    manifest = download(config, {}, str(tmp_path / "work"))
    row = next(read_shards(tmp_path / "work", manifest)).to_pylist()[0]
    assert (row["width"], row["height"]) == size
    assert Image.open(io.BytesIO(row["image"])).size == size
    assert row["caption"] == "a caption"
    assert json.loads(row["metadata"]) == {"punsafe": 0.125}  # LAION columns reach the shards


def make_folder(root: Path, count: int = 5) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"img{i}.png").write_bytes(image_bytes("PNG", seed=i))
    (root / "img0.txt").write_text("sidecar caption")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img1.png", "text": "meta"}) + "\n"
    )
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_folder_source_and_a_stale_image_under_the_same_name(tmp_path):
    folder = make_folder(tmp_path / "images")
    config = config_for({"kind": "folder", "path": str(folder)})
    first = download(config, {}, str(tmp_path / "work"))
    assert fates(tmp_path / "work", first) == {
        **{f"img{i}.png": "kept" for i in range(5)},
        "broken.jpg": "decode_error",
    }
    rows = {r["id"]: r for t in read_shards(tmp_path / "work", first) for r in t.to_pylist()}
    assert rows["img0.png"]["caption"] == "sidecar caption"
    assert rows["img1.png"]["caption"] == "meta"
    assert rows["img2.png"]["caption"] is None  # not a download failure
    assert download(config, {}, str(tmp_path / "work"))["reused"] is True

    image = folder / "img3.png"
    stat = image.stat()
    image.write_bytes(image_bytes("PNG", seed=42))  # same name, same size class, same mtime
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert download_key(config, {}) != first["key"]
    second = download(config, {}, str(tmp_path / "work"))
    assert second["reused"] is False
    rows = {r["id"]: r for t in read_shards(tmp_path / "work", second) for r in t.to_pylist()}
    assert rows["img3.png"]["content_hash"] == hashlib.sha256(image.read_bytes()).hexdigest()


def test_duplicate_and_missing_ids_fail_one_row_each(tmp_path):
    folder = make_folder(tmp_path / "images", count=3)
    (folder / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"img{i}.png", "uid": uid}) + "\n"
            for i, uid in enumerate(["u", "u"])
        )
    )
    config = config_for({"kind": "folder", "path": str(folder), "id_column": "uid"})
    manifest = download(config, {}, str(tmp_path / "work"))
    assert manifest["counts"]["failed_by_reason"] == {"duplicate_id": 1, "missing_id": 2}
    assert manifest["counts"]["kept"] == 1


def test_hf_source_from_a_local_imagefolder(tmp_path):
    root = tmp_path / "hfdata"
    root.mkdir()
    names = [f"x{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        (root / name).write_bytes(image_bytes("PNG", seed=i, size=(40 + i, 48)))
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": f"text {n}"}) + "\n" for n in names)
    )
    config = config_for({"kind": "hf", "path": str(root)})
    manifest = download(config, {}, str(tmp_path / "work"))
    assert manifest["counts"]["kept"] == 6 and len(manifest["shards"]) == 2
    rows = [r for t in read_shards(tmp_path / "work", manifest) for r in t.to_pylist()]
    assert [r["id"] for r in rows] == [f"{i:08d}" for i in range(6)]
    for row in rows:
        name = row["caption"].removeprefix("text ")
        assert row["content_hash"] == hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert (row["orig_width"], row["width"]) == (40 + int(name[1]), 32)


KILL_SCRIPT = """
import json, sys
from sdflow.config import RunConfig
from tasks.download import download
download(RunConfig.model_validate(json.loads(sys.argv[1])), {}, sys.argv[2])
"""


def test_kill_9_resumes_and_gives_byte_identical_shards(tmp_path, http_server):
    http_server.delay = 0.25
    urls = [http_server.url(f"/slow/good.png?row={i}") for i in range(10)]
    urls[4] = http_server.url("/slow/missing?row=4")
    config = config_for(
        {"kind": "urls", "path": url_list(tmp_path, urls)}, shard_size=3, concurrency=2
    )
    killed = tmp_path / "killed"
    key = download_key(config, {})
    final = stage_dir(killed, "download", key)
    partial = final.with_name(f".{key}.partial")
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, config.model_dump_json(), str(killed)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (partial / "shard-00000.parquet").exists():
            assert child.poll() is None and time.monotonic() < deadline, "child never wrote a shard"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)

    assert not final.exists()  # nothing looks complete
    done = sorted(p.name for p in partial.glob("shard-*.parquet"))
    assert done and len(done) < 4
    for path in partial.rglob("*"):
        if path.is_file() and not path.name.startswith("."):  # only temp files may be partial
            pq.read_table(path)

    finished_rows = {
        f"row={i}" for name in done for i in range(int(name[6:11]) * 3, int(name[6:11]) * 3 + 3)
    }
    http_server.log.clear()
    resumed = download(config, {}, str(killed))
    assert not any(path.split("?")[1] in finished_rows for path in http_server.log)

    clean = download(config, {}, str(tmp_path / "clean"))
    assert resumed["shards"] == clean["shards"] == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert resumed["fingerprint"] == clean["fingerprint"]
    for name in clean["shards"]:
        for sub in ("", "failures/"):
            a = (stage_dir(killed, "download", key) / sub / name).read_bytes()
            b = (stage_dir(tmp_path / "clean", "download", key) / sub / name).read_bytes()
            assert a == b, f"{sub}{name} differs"
    assert resumed["counts"] == clean["counts"]
    assert load_manifest(final)["counts"]["failed_by_reason"] == {"http_404": 1}
    # shard timings (manifest info, outside the fingerprint): the shards each build itself ran
    assert resumed["info"]["shards_timed"] == 4 - len(done) and clean["info"]["shards_timed"] == 4
    timing = clean["info"]
    assert 0 < timing["shard_busy_seconds"] <= min(timing["shard_seconds"], clean["seconds"])


def test_a_grown_url_list_requests_only_its_new_rows(tmp_path, http_server):
    urls = [http_server.url(f"/good.png?row={i}") for i in range(20)]
    urls += [http_server.url("/missing?row=20"), http_server.url("/busy?row=21")]
    nightly = tmp_path / "nightly"
    first = config_for({"kind": "urls", "path": url_list(tmp_path, urls, "night1.csv")})
    download(first, {}, str(nightly))

    grown = [*urls, http_server.url("/good.jpg?row=22"), http_server.url("/good.png?row=23")]
    second = config_for({"kind": "urls", "path": url_list(tmp_path, grown, "night2.csv")})
    http_server.log.clear()
    incremental = download(second, {}, str(nightly))
    # the new rows, and the 503 that may pass by now; never the kept rows or the 404
    assert set(http_server.log) == {"/busy?row=21", "/good.jpg?row=22", "/good.png?row=23"}
    assert fates(nightly, incremental)["00000023"] == "kept"

    fresh = download(second, {}, str(tmp_path / "scratch"))
    assert incremental["counts"] == fresh["counts"]
    assert incremental["fingerprint"] == fresh["fingerprint"]  # the same bytes as from scratch


def test_speed_knobs_keep_the_key_retry_budgets_change_it(tmp_path):
    """per_host_connections changes only how fast rows arrive; connect_retries changes which fail."""
    source = {"kind": "urls", "path": url_list(tmp_path, ["http://127.0.0.1:9/a.png"])}
    key = download_key(config_for(source), {})
    assert download_key(config_for(source, per_host_connections=2), {}) == key
    assert download_key(config_for(source, connect_retries=0), {}) != key
