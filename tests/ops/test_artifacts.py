"""The UI artifacts of a run (`sdflow.ops.artifacts`): the summary markdown, the failure, metric and
prompt tables, image data URLs, artifact keys and progress reporting, without a server."""

from __future__ import annotations

import base64
import io

from PIL import Image

from sdflow.ops import artifacts


def test_summary_markdown_lists_stages_counts_and_cache_hits():
    summary = {
        "run_id": "r1",
        "profile": "tiny-test",
        "status": "failed",
        "stages": {
            "download": {"status": "completed", "cached": True, "seconds": 0.5,
                         "counts": {"input": 10, "kept": 9, "failed": 1,
                                    "failed_by_reason": {"decode": 1}}},
            "filter": {"status": "failed", "cached": False, "seconds": 1.25, "error": "boom"},
            "latents": {"status": "completed", "cached": False, "seconds": 2.0, "counts": {},
                        "buckets": {"24x40": 3, "32x32": 0, "40x24": 6}},
        },
    }  # fmt: skip
    text = artifacts.summary_markdown(summary)
    assert "Samples per bucket (latents): 24x40 3, 32x32 0, 40x24 6" in text
    assert "| download | completed | yes | 0.5 | input 10, kept 9, failed 1 |" in text
    assert "failed_by_reason" not in text and "cache hits: 1 of 2" in text
    assert "- **filter**: boom" in text


def test_failure_and_metric_rows():
    counts = {
        "download": {"input": 200, "failed_by_reason": {"timeout": 2, "decode": 8}},
        "filter": {"input": 190, "failed_by_reason": {}},
    }
    assert artifacts.failure_rows(counts) == [
        {"stage": "download", "reason": "decode", "count": 8, "share of input": "4.0%"},
        {"stage": "download", "reason": "timeout", "count": 2, "share of input": "1.0%"},
    ]
    metrics = {"trained": {"fid": 1.234567, "clip_score": None, "name": "t"}, "baseline": None}
    empty = dict.fromkeys(("kid", "precision", "recall", "density", "coverage", "cmmd"))
    assert artifacts.metric_rows(metrics) == [
        {"model": "trained", "name": "t", "fid": 1.2346, **empty, "clip_score": None}
    ]


def test_prompt_rows_put_the_worst_followed_prompt_first_beside_the_baseline():
    worst, best = {"prompt": "a cat", "clip_score": 11.11111, "num_images": 3}, {
        "prompt": "a dog", "clip_score": 30.0, "num_images": 2}  # fmt: skip
    baseline = [{"prompt": "a dog", "clip_score": 12.0, "num_images": 2}]
    metrics = {
        "trained": {"clip_score_per_prompt": [worst, best]},
        "baseline": {"clip_score_per_prompt": baseline},
    }
    assert artifacts.prompt_rows(metrics) == [
        {"prompt": "a cat", "trained": 11.1111, "baseline": None, "images": 3},
        {"prompt": "a dog", "trained": 30.0, "baseline": 12.0, "images": 2},
    ]
    assert artifacts.prompt_rows({"trained": {"clip_score_per_prompt": []}}) == []


def test_image_data_url_is_the_downscaled_image(tmp_path):
    path = tmp_path / "grid.png"
    Image.new("RGB", (2048, 512), "red").save(path)
    url = artifacts.image_data_url(path)
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.size == (1024, 256) and image.getpixel((5, 5)) == (255, 0, 0)


def test_artifact_keys_are_valid():
    assert artifacts.artifact_key("profiles/My_Profile.yaml", "sample grid") == (
        "sdflow-my-profile-sample-grid"
    )


def test_progress_is_a_no_op_outside_a_task_and_counts_when_disabled():
    artifacts.report_progress("download", 5, 10)  # no reporter installed: nothing happens
    seen = []
    artifacts._reporters["probe"] = lambda done, total, unit: seen.append((done, total, unit))
    try:
        with artifacts.progress_bar("probe", total=10, unit="img", disable=True) as bar:
            bar.update(3)
            bar.update(7)
    finally:
        artifacts._reporters.pop("probe")
    assert seen == [(3, 10, "img"), (10, 10, "img")]
