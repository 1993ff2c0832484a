"""The dataset report of a small WebDataset source run through the real download → filter → caption
stages: its numbers against the data, and every image of it rendered in headless Chromium."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import pytest
from fixtures.browser import CHROMIUM, Browser
from fixtures.shards import write_tar
from PIL import Image

from flows import tracking
from sdflow.config import RunConfig
from sdflow.data.report import ASSETS, build_report
from sdflow.data.report.collect import duplicate_clusters, funnel, measured_scores
from sdflow.profiles import load_profile
from sdflow.store.stageio import Manifest, failures_table, read_shards
from tasks.caption import caption_samples
from tasks.download import download
from tasks.filter import filter_samples


def png(color: tuple[int, int, int], width: int = 40, height: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED = png((255, 0, 0))
GREEN = png((0, 200, 0), 64, 40)
# key: (image bytes, caption, metadata)
SAMPLES = {
    "k00": (RED, "a red circle on a white background", {"similarity": 0.31}),
    "k01": (RED, "a red circle again", {"similarity": 0.30}),  # duplicate of k00
    "k02": (png((0, 0, 255), 48, 32), "a blue circle near a square", {"similarity": 0.25}),
    "k03": (GREEN, "a green square", {"similarity": 0.35}),
    "k04": (b"\xff\xd8\xff\xe0 not a jpeg", "broken", {}),  # fails to download
    "k05": (RED, "red again", {}),  # duplicate of k00
    "k06": (png((255, 255, 0), 8, 8), "a tiny yellow circle", {}),  # too small
    "k07": (png((255, 0, 255)), "pink circle", {}),
    "k08": (GREEN, "green square copy", {}),  # duplicate of k03
    "k09": (png((90, 90, 90), 100, 20), "a wide grey circle banner", {}),  # ratio 5 > 2
    "k10": (png((0, 255, 255), 40, 50), "a cyan triangle", {}),
}
KEPT = ["k00", "k02", "k03", "k07", "k10"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict[str, Manifest], Path]:
    root = tmp_path_factory.mktemp("report")
    members = [
        (key, {"png": image, "txt": caption, **({"json": meta} if meta else {})})
        for key, (image, caption, meta) in SAMPLES.items()
    ]
    write_tar(root / "data" / "00000.tar", members)
    config = RunConfig(
        source={"kind": "webdataset", "path": str(root / "data" / "00000.tar")},
        download={"resolution": 32, "shard_size": 4, "decode_workers": 1},
        filter={"min_size": 16, "max_aspect_ratio": 2.0},
    )
    workdir = root / "work"
    manifests = {"download": download(config, {}, str(workdir))}
    manifests["filter"] = filter_samples(config, {"download": manifests["download"]}, str(workdir))
    manifests["caption"] = caption_samples(config, {"filter": manifests["filter"]}, str(workdir))
    html = build_report(workdir, manifests, workdir / "runs" / "r1")
    return workdir, manifests, html


def cells(html: str, attribute: str, value: str) -> list[str]:
    """The text of the cells of the row whose `attribute` is `value`."""
    row = re.search(rf'<tr [^>]*{attribute}="{re.escape(value)}"[^>]*>(.*?)</tr>', html, re.S)
    assert row, f"no row {attribute}={value}"
    return re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)


def test_funnel_failures_words_clusters_scores_and_samples_match_the_data(report):
    workdir, manifests, path = report
    html = path.read_text()
    assert path == workdir / "runs" / "r1" / "dataset-report.html"
    counts = {stage: m["counts"] for stage, m in manifests.items()}
    funnel = {
        "rows in": (counts["download"]["input"], 11),
        "downloaded": (counts["download"]["kept"], 10),
        "kept by filter": (counts["filter"]["kept"], 5),
        "captioned": (counts["caption"]["kept"], 5),
    }
    for step, (from_manifest, expected) in funnel.items():
        assert from_manifest == expected
        assert int(cells(html, "data-step", step)[2]) == expected, step
    assert "encoded" not in re.findall(r'data-step="([^"]+)"', html)  # no latents stage here

    assert cells(html, "data-reason", "duplicate")[2] == "3"
    assert cells(html, "data-reason", "too_small")[2] == "1"
    assert cells(html, "data-reason", "aspect_ratio")[2] == "1"
    assert cells(html, "data-stage", "download")[2] == "1"  # the broken image

    captions = [
        r["caption"] for t in read_shards(workdir, manifests["caption"]) for r in t.to_pylist()
    ]
    assert sorted(captions) == sorted(SAMPLES[k][1] for k in KEPT)
    reference = Counter(w for c in captions for w in c.split() if len(w) > 2).most_common(1)
    top = re.search(r'<tr data-word="([^"]+)"><td>[^<]*</td><td class="n">(\d+)', html)
    assert [(top[1], int(top[2]))] == reference == [("circle", 3)]  # red, blue, pink circle

    clusters = dict(re.findall(r'class="cluster" data-kept="([^"]+)" data-size="(\d+)"', html))
    assert clusters == {"k00": "2", "k03": "1"}

    # four downloaded rows carry a similarity; the filter measured k09's ratio 100/20 = 5
    assert re.search(r'id="plot-score-metadata-similarity" data-n="4"', html)
    assert re.search(r'id="plot-score-rejected-aspect-ratio-ratio" data-n="1"', html)
    assert re.search(r'id="plot-width" data-n="5"', html)
    assets = workdir / "runs" / "r1" / ASSETS
    assert (assets / "score-metadata-similarity.png").is_file()
    assert "| kept by filter | filter | 5 | 45.5% |" in (assets / "summary.md").read_text()

    samples = re.findall(r'class="sample" data-id="([^"]+)"', html)
    assert sorted(samples) == KEPT
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)  # self-contained


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium")
def test_every_image_of_the_report_renders_in_chromium(report, tmp_path):
    _, _, path = report
    expected = path.read_text().count("<img ")
    assert expected == 4 + 2 + (2 + 3) + 5  # sizes, scores, clusters (kept + dropped), samples
    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.call("Page.navigate", url=path.as_uri())
        browser.wait_for("document.readyState === 'complete'")
        widths = browser.js("[...document.images].map(i => i.complete ? i.naturalWidth : -1)")
    finally:
        browser.close()
    assert len(widths) == expected
    assert all(width > 0 for width in widths), widths


def test_a_run_writes_the_report_and_a_report_failure_never_fails_it(report, tmp_path, monkeypatch):
    workdir, manifests, _ = report
    published, warnings = [], []
    monkeypatch.setattr(tracking, "publish_report", lambda *args: published.append(args))
    monkeypatch.setattr(tracking, "get_run_logger", lambda: WarningLog(warnings))
    tracker = tracking.RunTracker(load_profile("tiny-test"), "tiny-test", str(workdir))
    tracker.manifests = dict(manifests)
    tracker.summary["stages"] = {stage: {"status": "skipped"} for stage in manifests}
    tracker._dataset_report()  # --only train: the data stages are only looked up
    assert not (tracker.run_dir / "dataset-report.html").exists() and not published
    tracker.summary["stages"]["caption"]["status"] = "completed"
    tracker._dataset_report()
    html = tracker.run_dir / "dataset-report.html"
    assert html.is_file() and published == [("tiny-test", html)]
    assert tracker.summary["dataset_report"] == str(html)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "build_report", broken)
    tracker._dataset_report()  # does not raise
    assert warnings == ["The dataset report could not be built: OSError('disk full')"]
    assert len(published) == 1


class WarningLog:
    def __init__(self, sink: list[str]):
        self.sink = sink

    def warning(self, message: str, *args) -> None:
        self.sink.append(message % args)


def test_the_funnel_ends_with_the_images_the_latents_stage_encoded():
    counts = {
        "download": {"input": 100, "kept": 90},
        "filter": {"input": 90, "kept": 70},
        "caption": {"input": 70, "kept": 68},
        "latents": {"input": 68, "held_out": 6, "validation": 6, "encoded": 61},
    }
    manifests = {stage: {"counts": c} for stage, c in counts.items()}
    assert funnel(manifests) == [
        ("rows in", "download", 100),
        ("downloaded", "download", 90),
        ("kept by filter", "filter", 70),
        ("captioned", "caption", 68),
        ("encoded", "latents", 61),
    ]
    del manifests["download"]  # steps only for the stages given
    assert [step for step, _, _ in funnel(manifests)][0] == "kept by filter"


def test_clusters_and_scores_from_curation_filter_details():
    """Details as the curation filters write them: a duplicate names its kept twin, alone or with
    the distance measured; a threshold rejection names the measured value and the bound."""
    rows = [
        ("d1", "duplicate", "k0"),
        ("n1", "near_duplicate", "k0 at Hamming distance 3"),
        ("n2", "near_duplicate", "a photo at sea.jpg at Hamming distance 5"),
        ("s1", "semantic_duplicate", "k9 at cosine 0.991234"),
        ("m1", "metadata:pwatermark", "pwatermark=0.75 > max 0.5"),
        ("c1", "clip_score", "clip_score 0.2100 < min 0.28"),
        ("c2", "clip_score", "clip_score 0.1500 < min 0.28"),
        ("t1", "too_small", "8x8 original, shorter side < 16"),
    ]
    failures = failures_table(
        [{"id": i, "source": "x", "reason": r, "detail": d} for i, r, d in rows]
    )
    clusters = {c.kept: (c.members, c.size) for c in duplicate_clusters(failures)}
    assert clusters == {
        "k0": ([("d1", "duplicate"), ("n1", "near_duplicate")], 2),
        "a photo at sea.jpg": ([("n2", "near_duplicate")], 1),
        "k9": ([("s1", "semantic_duplicate")], 1),
    }
    scores = {title: list(values) for title, values in measured_scores(failures).items()}
    assert scores == {
        "rejected (clip_score): clip_score": [0.21, 0.15],
        "rejected (metadata:pwatermark): pwatermark": [0.75],
        "rejected (near_duplicate): Hamming distance": [3.0, 5.0],
        "rejected (semantic_duplicate): cosine": [0.991234],
    }
