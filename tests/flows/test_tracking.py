"""The run tracker shows the evaluate stage's artifacts: metrics, CLIP per prompt, images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from flows import tracking
from sdflow.profiles import load_profile
from sdflow.store.stageio import StageBuild


def test_evaluate_artifacts_include_prompt_scores_and_the_metric_curve(tmp_path, monkeypatch):
    build = StageBuild(tmp_path, "evaluate", "k")
    build.path.mkdir(parents=True)
    for name in ("grid.png", "metric_curve.png"):
        Image.new("RGB", (8, 8)).save(build.path / name)
    info = {"trained": {"fid": 1.0, "clip_score_per_prompt": []}}
    files = {"grid": "grid.png", "metric_curve": "metric_curve.png"}
    manifest = build.finish(counts={}, files=files, info=info)
    published: list[tuple] = []
    for name in ("publish_metrics", "publish_prompt_scores", "publish_image"):
        monkeypatch.setattr(tracking.artifacts, name, lambda *a, n=name: published.append((n, *a)))
    tracker = tracking.RunTracker(load_profile("tiny-test"), "tiny-test", str(tmp_path))
    tracker._show("evaluate", manifest)
    out = Path(tmp_path).resolve() / manifest["path"]
    assert published == [
        ("publish_metrics", "tiny-test", info),
        ("publish_prompt_scores", "tiny-test", info),
        ("publish_image", "tiny-test", "metric-curve", out / "metric_curve.png",
         "Metrics by training checkpoint"),
        ("publish_image", "tiny-test", "sample-grid", out / "grid.png",
         "Sample grid: trained (and baseline) per prompt"),
    ]  # fmt: skip
