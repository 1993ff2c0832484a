"""Run bookkeeping for the pipeline flow: which stages run, their states, `summary.json`, and what
the run shows in the Prefect UI (summary, failures, metrics, grid and loss-curve artifacts).

Kept out of `pipeline.py` so the flow body stays a plain list of stages.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger
from prefect.runtime import flow_run

from sdflow.config import STAGES, RunConfig
from sdflow.data.report import DATA_STAGES, build_report, publish_report
from sdflow.errors import UserError
from sdflow.ops import artifacts
from sdflow.ops.orchestration import result_storage
from sdflow.ops.phases import mark
from sdflow.store.lease import RunLease
from sdflow.store.stageio import (
    Manifest,
    discard_stage,
    load_manifest,
    output_dir,
    stage_dir,
    write_json,
)

EXPORT_NAMES = ("single_file", "single_file_config", "kohya_lora")
# The subsets stage joins the subsets' caption outputs (`tasks.subsets`): --only and --refresh
# `caption` select it, and a stage reading `caption` upstream reads its output.
JOINS = {"subsets": "caption"}


class StageFailed(Exception):
    """Raised at the end of a run in which a stage failed, after summary.json is written."""


class RunTracker:
    """Runs stages in order, honouring --only / --refresh, and records what each one did."""

    def __init__(
        self,
        config: RunConfig,
        profile: str,
        workdir: str,
        only: list[str] | None = None,
        refresh: list[str] | None = None,
    ):
        self.config = config
        self.workdir = str(Path(workdir).resolve())
        self.only = set(only or [])
        self.refresh = set(refresh or [])
        self.summary: dict[str, Any] = {"profile": profile, "stages": {}}
        self.manifests: dict[str, Manifest] = {}  # the outputs this run produced or looked up
        self.failure: BaseException | None = None
        mark("flow")
        self.run_dir = Path(self.workdir) / "runs" / run_id()
        self.summary["run_id"] = self.run_dir.name
        self.summary["started_at"] = datetime.now(timezone.utc).isoformat()
        self.lease = RunLease(self.run_dir)  # gc keeps outputs until summary.json names them
        # Cache records beside the stage outputs (or in object storage): a retry on another worker
        # must find them. Set per task, since the flow's own storage is fixed before the profile loads.
        self.storage = result_storage(config.runner.result_storage, self.workdir)
        for name in ("sdflow", "tasks"):  # stage progress reaches the run's log (worker runs too)
            logging.getLogger(name).setLevel(logging.INFO)

    def stage(
        self,
        task: Task,
        config: RunConfig | None = None,
        label: str | None = None,
        **upstream: Manifest | None,
    ) -> Manifest | None:
        """Run (or look up) one stage; returns its manifest, or None when it is unavailable.

        With `label` (a subset's name) the stage runs on `config` (that subset's view of the
        profile) and is shown as `stage[label]`; --only and --refresh name the stage alone."""
        name = task.name
        shown = f"{name}[{label}]" if label else name
        config = config or self.config
        if self.failure is not None or self._missing(upstream, label):
            return self._record(shown, "skipped", None, 0.0, cached=False)
        key_fn, selected = task.cache_policy.key_fn, JOINS.get(name, name)
        if self.only and selected not in self.only:
            return self._look_up(name, key_fn(config, upstream), shown)
        refresh = selected in self.refresh
        if refresh:
            discard_stage(self.workdir, name, key_fn(config, upstream))
        named = {"task_run_name": shown} if label else {}
        task = task.with_options(
            result_storage=self.storage, refresh_cache=refresh or None, **named
        )
        started = time.monotonic()
        state = task(config, upstream, self.workdir, return_state=True)
        seconds = time.monotonic() - started
        if not state.is_completed():
            self.failure = _exception_of(state)
            get_run_logger().error(_failure_paragraph(shown, self.failure))
            return self._record(
                shown, "failed", None, seconds, cached=False, error=str(self.failure)
            )
        manifest = state.result()
        cached = state.name == "Cached" or bool(manifest.get("reused"))
        return self._record(shown, "completed", manifest, seconds, cached=cached)

    def needed(self, name: str) -> bool:
        """Whether stage `name` takes part: run, or looked up in the cache. With --only, a model
        stage after the last chosen stage is neither (its module imports torch and diffusers,
        seconds that would dwarf an all-cached data run); a data stage after it is looked up."""
        if not self.only or name in self.only or name in DATA_STAGES or name not in STAGES:
            return True  # (not in STAGES: the subsets stage, a data stage too)
        return any(s in self.only for s in STAGES[STAGES.index(name) + 1 :])

    def skip(self, name: str) -> None:
        """Record stage `name` as skipped without importing or looking it up (see `needed`)."""
        return self._record(name, "skipped", None, 0.0, cached=False)

    def _missing(self, upstream: dict[str, Manifest | None], label: str | None = None) -> bool:
        """An upstream stage that was part of this run but has no output (failed or not cached);
        a subset's stage (`label`) looks at that subset's upstream stages.

        An upstream that was never part of the run (no autoencoder with a pretrained VAE) is fine.
        """
        ran = {*self.summary["stages"], *(JOINS[n] for n in self.summary["stages"] if n in JOINS)}
        names = {n: f"{n}[{label}]" if label else n for n in upstream}
        return any(m is None and names[n] in ran for n, m in upstream.items())

    def _look_up(self, name: str, key: str, shown: str | None = None) -> Manifest | None:
        """A stage left out by --only: use its cached output if there is one."""
        started = time.monotonic()
        manifest = load_manifest(stage_dir(self.workdir, name, key))
        return self._record(
            shown or name, "skipped", manifest, time.monotonic() - started, cached=bool(manifest)
        )

    def _record(self, name, status, manifest, seconds, cached, error=None) -> Manifest | None:
        entry: dict[str, Any] = {"status": status, "cached": cached, "seconds": round(seconds, 3)}
        if manifest is not None:
            self.manifests[JOINS.get(name, name)] = manifest  # the report reads the join as caption
            entry["output"] = str(output_dir(self.workdir, manifest))
            entry["counts"] = manifest.get("counts", {})
            if name == "latents" and manifest.get("info", {}).get("buckets"):
                entry["buckets"] = manifest["info"]["buckets"]  # samples per bucket
            if name == "train" and manifest.get("info", {}).get("subsets"):
                entry["subsets"] = manifest["info"]["subsets"]  # images, repeats, samples seen
            self._note_products(name, manifest)
        if error:
            entry["error"] = error
        self.summary["stages"][name] = entry
        if manifest is not None:
            self._show(name, manifest)
        return manifest

    def _show(self, name: str, manifest: Manifest) -> None:
        """The stage's artifacts in the UI, from its manifest (fresh or cached alike)."""
        profile = self.summary["profile"]
        base = output_dir(self.workdir, manifest)
        files = manifest.get("files", {})
        if name == "filter":
            stages = self.summary["stages"]
            counts = {s: stages[s]["counts"] for s in ("download", "filter") if s in stages}
            _best_effort(artifacts.publish_failures, profile, counts)
        if name == "train" and "loss_curve" in files:
            path = base / files["loss_curve"]
            validation = manifest.get("info", {}).get("validation")
            what = "Training loss" + (" and held-out validation loss" if validation else "")
            _best_effort(artifacts.publish_image, profile, "loss-curve", path, what)
            if validation:
                _best_effort(artifacts.publish_validation, profile, validation)
        if name == "train" and "validation_grid" in files:
            path, what = base / files["validation_grid"], "Newest validation grid"
            _best_effort(artifacts.publish_image, profile, "validation-grid", path, what)
        if name == "evaluate":
            _best_effort(artifacts.publish_metrics, profile, manifest.get("info", {}))
            _best_effort(artifacts.publish_prompt_scores, profile, manifest.get("info", {}))
            if "metric_curve" in files:
                path, what = base / files["metric_curve"], "Metrics by training checkpoint"
                _best_effort(artifacts.publish_image, profile, "metric-curve", path, what)
            if "grid" in files:
                path, what = base / files["grid"], "Sample grid: trained (and baseline) per prompt"
                _best_effort(artifacts.publish_image, profile, "sample-grid", path, what)

    def _note_products(self, name: str, manifest: Manifest) -> None:
        base = output_dir(self.workdir, manifest)
        files = manifest.get("files", {})
        if name == "train":
            # with train.keep_best: the best checkpoint's model, and the last step's beside it
            product = files.get("pipeline") or files.get("lora")
            final = files.get("final_pipeline") or files.get("final_lora") or product
            self.summary["model_dir"] = str(base / product) if product else None
            self.summary["final_model_dir"] = str(base / final) if final else None
            exports = {k: str(base / v) for k, v in files.items() if k.endswith(EXPORT_NAMES)}
            if exports:  # train.export_formats: single_file, kohya_lora (final_ with keep_best)
                self.summary["exports"] = exports
            if "validation" in manifest.get("info", {}):
                self.summary["validation"] = manifest["info"]["validation"]
        if name == "evaluate":
            self.summary["metrics"] = manifest.get("info", {})
            if "grid" in files:
                self.summary["grid"] = str(base / files["grid"])

    def finish(self) -> str:
        """Write summary.json; raise if a stage failed (so the flow run is Failed and retryable)."""
        mark("stages")
        try:
            return self._finish()
        finally:
            self.lease.release()

    def _finish(self) -> str:
        self.summary["finished_at"] = datetime.now(timezone.utc).isoformat()
        self.summary["status"] = "failed" if self.failure else "completed"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._dataset_report()
            mark("report")
            write_json(self.run_dir / "summary.json", self.summary, sort_keys=False)  # DAG order
        except OSError as exc:  # a full or read-only disk: the stage's own error matters more
            if self.failure is None:
                raise
            get_run_logger().warning("summary.json could not be written: %s", exc)
        _best_effort(artifacts.publish_summary, self.summary)
        mark("summary")
        if isinstance(self.failure, UserError):
            raise self.failure
        if self.failure is not None:
            raise StageFailed(f"{self.failure} (summary: {self.run_dir / 'summary.json'})")
        return str(self.run_dir)

    def _dataset_report(self) -> None:
        """The data stages' report in the run directory and the UI, when a data stage took part in
        the run (ran or came from the cache; not when --only left them all out). It never fails
        the run."""
        stages = self.summary["stages"]
        if not any(stages.get(s, {}).get("status") == "completed" for s in (*DATA_STAGES, *JOINS)):
            return
        try:
            html = build_report(self.workdir, self.manifests, self.run_dir)
        except Exception as exc:
            get_run_logger().warning("The dataset report could not be built: %r", exc)
            return
        self.summary["dataset_report"] = str(html)
        _best_effort(publish_report, self.summary["profile"], html)


def run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    flow_run_id = flow_run.get_id()
    return f"{stamp}-{(flow_run_id or uuid.uuid4().hex)[:8]}"


def _failure_paragraph(stage: str, error: BaseException) -> str:
    """What the run log says about a failed stage: one paragraph, and whether it was retried."""
    if isinstance(error, UserError):
        return f"Stage {stage} stopped on a problem to fix, so it was not retried. {error}"
    return (
        f"Stage {stage} failed ({type(error).__name__}: {error}). Fix the cause and retry this flow "
        "run: the stages before it come back from the cache."
    )


def _best_effort(publish: Any, *args: Any) -> None:
    """Artifacts are a view of the run: failing to show one never fails the run."""
    try:
        publish(*args)
    except Exception as exc:
        get_run_logger().warning("Could not create the %s artifact: %s", publish.__name__, exc)


def _exception_of(state: Any) -> BaseException:
    try:
        state.result()
    except BaseException as exc:  # the stage's own exception, re-raised by Prefect
        return exc
    return RuntimeError(f"stage ended in state {state.name}:\n{traceback.format_exc()}")
