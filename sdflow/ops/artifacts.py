"""What a run shows in the Prefect UI: progress bars, summary, failure and metric tables, images.

Two halves, both used only through the task wrapper (`sdflow.ops.orchestration`) and the run tracker
(`flows/tracking.py`):

- Progress. Stage code calls `report_progress(stage, done, total)`; it does nothing unless the
  stage's task installed a reporter with `stage_progress(stage)`, so stage modules stay plain Python.
  The reporter creates the stage's progress artifact on the first report and updates it in place,
  at most every `UPDATE_SECONDS`, from whichever thread reports.
- Run artifacts, created in the flow run from the stage manifests: a markdown summary (stages, counts,
  cache hits, seconds), a table of failures by reason (download, filter), the evaluate metrics and
  CLIP score per prompt, and the sample grid, loss curve and metric-by-checkpoint curve as images.

An image artifact is an `<img src=URL>` in the UI, so the browser must be able to fetch the URL. A
`data:image/...;base64` URL holds the (downscaled) image itself: it renders wherever the UI runs, with
no file server, public bucket or shared disk between the worker and the browser.

Prefect is imported lazily, so importing this module (for `report_progress`) costs nothing in a
training subprocess.
"""

from __future__ import annotations

import base64
import contextvars
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

UPDATE_SECONDS = 2.0
MAX_IMAGE_SIDE = 1024  # larger images are downscaled before they go into a data URL
MAX_PNG_BYTES = 400_000  # above this the image is sent as JPEG

_reporters: dict[str, Callable[[float, float, str], None]] = {}

# ----------------------------------------------------------------------------------------- progress


def report_progress(stage: str, done: float, total: float | None, unit: str = "") -> None:
    """Tell the UI how far `stage` is (`done` of `total` `unit`); a no-op outside a Prefect task."""
    reporter = _reporters.get(stage)
    if reporter is not None and total:
        reporter(done, total, unit)


class ProgressBar(tqdm):
    """A tqdm bar whose updates also reach the stage's progress artifact (`progress_bar(...)`)."""

    def __init__(self, *args: Any, stage: str, **kwargs: Any):
        self.stage, self.done = stage, 0
        super().__init__(*args, **kwargs)
        self.expected, self.what = kwargs.get("total"), kwargs.get("unit", "")

    def update(self, n: float | None = 1) -> bool | None:
        self.done += n or 0  # counted here: a disabled bar (no terminal) does not count
        report_progress(self.stage, self.done, self.expected, self.what)
        return super().update(n)


def progress_bar(stage: str, **options: Any) -> ProgressBar:
    """`tqdm(**options)` that also shows in the UI while `stage` runs as a Prefect task."""
    return ProgressBar(stage=stage, **options)


@contextmanager
def stage_progress(stage: str) -> Iterator[None]:
    """While the stage's task runs, `report_progress(stage, ...)` updates its progress artifact."""
    progress = _ProgressArtifact(stage, contextvars.copy_context())
    _reporters[stage] = progress.report
    try:
        yield
        progress.finish()
    finally:
        _reporters.pop(stage, None)


class _ProgressArtifact:
    """One progress artifact, created lazily, updated in place with throttling.

    Reports may come from any thread (download's event loop, data loader threads); Prefect calls run
    in a copy of the task's context, so the artifact belongs to the task run and reaches its API.
    """

    def __init__(self, stage: str, context: contextvars.Context):
        self.stage, self.context, self.unit = stage, context, ""
        self.artifact_id = None
        self.sent_at = 0.0
        self.last: tuple[float, float] | None = None
        self.lock = threading.Lock()

    def report(self, done: float, total: float, unit: str) -> None:
        with self.lock:
            self.last, self.unit = (done, total), unit
            now = time.monotonic()
            if now - self.sent_at < UPDATE_SECONDS and done < total:
                return
            self.sent_at = now
            self._send(done, total)

    def finish(self) -> None:
        """A stage that reported and succeeded ends at 100 %, whatever the throttle dropped."""
        with self.lock:
            if self.last is not None and self.last[0] < self.last[1]:
                self._send(self.last[1], self.last[1])

    def _send(self, done: float, total: float) -> None:
        percent = round(min(100.0, 100.0 * done / total), 1)
        unit = f" {self.unit}" if self.unit else ""
        description = f"{self.stage}: {done:g} of {total:g}{unit}"
        try:
            self.context.copy().run(self._upsert, percent, description)
        except Exception as exc:  # the UI is a view: a lost update never fails the stage
            log.debug("progress artifact for %s not updated: %s", self.stage, exc)

    def _upsert(self, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                percent, key=f"sdflow-{slug(self.stage)}-progress", description=description
            )
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)


# ------------------------------------------------------------------------------------ run artifacts


def publish_summary(summary: dict[str, Any]) -> None:
    """The run at a glance: each stage's status, cache hit, seconds and counts."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        summary_markdown(summary),
        key=artifact_key(summary["profile"], "summary"),
        description=f"sdflow run {summary['run_id']}: stages, counts, cache hits, seconds",
    )


def summary_markdown(summary: dict[str, Any]) -> str:
    stages = summary["stages"]
    rows = [
        f"| {name} | {s['status']} | {'yes' if s['cached'] else 'no'} | {s['seconds']:.1f} "
        f"| {_counts_text(s.get('counts', {}))} |"
        for name, s in stages.items()
    ]
    ran = [s for s in stages.values() if s["status"] == "completed"]
    hits = sum(1 for s in ran if s["cached"])
    lines = [
        f"# sdflow run `{summary['run_id']}`",
        f"Profile **{summary['profile']}**, status **{summary['status']}**; "
        f"cache hits: {hits} of {len(ran)} completed stages; "
        f"{sum(s['seconds'] for s in stages.values()):.1f} s in stages.",
        "",
        "| stage | status | cached | seconds | counts |",
        "|---|---|---|---:|---|",
        *rows,
    ]
    buckets = {n: s["buckets"] for n, s in stages.items() if len(s.get("buckets", {})) > 1}
    for name, counts in buckets.items():
        lines += ["", f"Samples per bucket ({name}): " + _counts_text(counts)]
    errors = [f"- **{n}**: {s['error']}" for n, s in stages.items() if s.get("error")]
    if errors:
        lines += ["", "## Failed", *errors]
    for label, field in (("Model", "model_dir"), ("Sample grid", "grid")):
        if summary.get(field):
            lines.append(f"\n{label}: `{summary[field]}`")
    for name, path in summary.get("exports", {}).items():  # train.export_formats
        lines.append(f"\nExport {name}: `{path}`")
    return "\n".join(lines)


def _counts_text(counts: dict[str, Any]) -> str:
    """Scalar counts only (`failed_by_reason` has its own table)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, (int, float)))


def publish_failures(profile: str, counts_by_stage: dict[str, dict[str, Any]]) -> None:
    """One table of the rows each stage dropped, by reason (download and filter)."""
    from prefect.artifacts import create_table_artifact

    rows = failure_rows(counts_by_stage)
    create_table_artifact(
        rows or [{"stage": "-", "reason": "no failures", "count": 0, "share of input": "0%"}],
        key=artifact_key(profile, "failures"),
        description="Rows dropped by download and filter, by reason",
    )


def failure_rows(counts_by_stage: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for stage, counts in counts_by_stage.items():
        total = counts.get("input") or 0
        reasons = sorted(counts.get("failed_by_reason", {}).items(), key=lambda item: -item[1])
        for reason, count in reasons:
            share = f"{100 * count / total:.1f}%" if total else "-"
            rows.append({"stage": stage, "reason": reason, "count": count, "share of input": share})
    return rows


METRIC_COLUMNS = ("fid", "kid", "precision", "recall", "density", "coverage", "cmmd", "clip_score")


def publish_metrics(profile: str, metrics: dict[str, Any]) -> None:
    """The evaluate stage's scores, one row per model (trained, baseline)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        metric_rows(metrics),
        key=artifact_key(profile, "metrics"),
        description=f"FID, KID, precision/recall, density/coverage on "
        f"{metrics.get('fid_feature_extractor')}; CMMD and CLIP score on CLIP embeddings; "
        f"{metrics.get('num_generated')} generated vs {metrics.get('num_real')} real images "
        "(empty cell: not computed, see metrics.json for why)",
    )


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for model in ("trained", "baseline"):
        scores = metrics.get(model)
        if scores:
            values = {name: _rounded(scores.get(name)) for name in METRIC_COLUMNS}
            rows.append({"model": model, "name": scores.get("name"), **values})
    return rows


def publish_prompt_scores(profile: str, metrics: dict[str, Any]) -> None:
    """CLIP score per prompt, the prompt the trained model follows worst first."""
    from prefect.artifacts import create_table_artifact

    rows = prompt_rows(metrics)
    reason = ((metrics.get("trained") or {}).get("metrics") or {}).get("clip_score", {})
    create_table_artifact(
        rows or [{"prompt": "-", "trained": None, "note": reason.get("reason", "no CLIP score")}],
        key=artifact_key(profile, "clip-per-prompt"),
        description="CLIP score per prompt (trained, and baseline when evaluated), worst first",
    )


def prompt_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    trained = (metrics.get("trained") or {}).get("clip_score_per_prompt") or []
    baseline = {
        row["prompt"]: row["clip_score"]
        for row in (metrics.get("baseline") or {}).get("clip_score_per_prompt") or []
    }
    rows = []
    for row in trained:  # already worst first
        entry = {"prompt": row["prompt"], "trained": _rounded(row["clip_score"])}
        if baseline:
            entry["baseline"] = _rounded(baseline.get(row["prompt"]))
        rows.append({**entry, "images": row["num_images"]})
    return rows


def publish_validation(profile: str, validation: dict[str, Any]) -> None:
    """The train stage's held-out validation loss per validation step, the best one marked."""
    from prefect.artifacts import create_table_artifact

    stopped = validation.get("stopped_early_at")
    create_table_artifact(
        validation_rows(validation),
        key=artifact_key(profile, "validation"),
        description=f"Held-out validation loss every {validation.get('every')} steps; best at "
        f"step {validation.get('best_step')}"
        + (f", stopped early at {stopped}" if stopped else ""),
    )


def validation_rows(validation: dict[str, Any]) -> list[dict[str, Any]]:
    best = validation.get("best_step")
    return [
        {"step": int(step), "validation_loss": _rounded(loss), "best": int(step) == best}
        for step, loss in validation.get("curve", [])
    ]


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def publish_sweep(profile: str, summary: dict[str, Any]) -> None:
    """A sweep's comparison table: one row per setting, the best one starred."""
    from prefect.artifacts import create_table_artifact

    best = summary.get("best")
    verdict = f"best: setting {best['index']}" if best else "no setting has the metric"
    create_table_artifact(
        summary["table"],
        key=artifact_key(profile, "sweep"),
        description=f"Sweep over {', '.join(summary['grid'])}, ranked by {summary['metric']} "
        f"({'lower' if summary['direction'] == 'min' else 'higher'} is better); {verdict}",
    )


def publish_image(profile: str, name: str, path: Path, description: str) -> None:
    """An image artifact whose URL is the image itself (a data URL)."""
    from prefect.artifacts import create_image_artifact

    create_image_artifact(
        image_data_url(path), key=artifact_key(profile, name), description=description
    )


def image_data_url(path: Path) -> str:
    """`data:image/png;base64,...` of the image at `path`, downscaled to MAX_IMAGE_SIDE."""
    from PIL import Image

    with Image.open(path) as image:
        return pil_data_url(image, MAX_IMAGE_SIDE)


def pil_data_url(image: Any, max_side: int, max_png_bytes: int = MAX_PNG_BYTES) -> str:
    """A PIL image as a data URL, downscaled to `max_side`: PNG, or JPEG above `max_png_bytes`."""
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    mime = "image/png"
    if buffer.tell() > max_png_bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        mime = "image/jpeg"
    return bytes_data_url(buffer.getvalue(), mime)


def bytes_data_url(data: bytes, mime: str) -> str:
    """`data:<mime>;base64,...` of encoded image bytes, as they are."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def artifact_key(profile: str, name: str) -> str:
    """`sdflow-<profile>-<name>`: keyed artifacts keep a history per profile in the UI."""
    return f"sdflow-{slug(Path(profile).stem)}-{slug(name)}"


def slug(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
