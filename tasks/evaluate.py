"""Evaluate stage: samples, a labelled grid and every metric, for the trained model and baseline.

Run it with `sdflow run tiny-cpu --only evaluate`. Both models sample the same prompts with the same
seeds (image j of prompt i uses seed `eval.seed + i*1000 + j`), so the grid shows before vs after
along each row and `metrics.json` says whether training helped (trained FID < baseline FID).

- Prompts: `eval.prompts`, else `eval.num_prompts` held-out captions, distinct ones first.
- Distribution metrics (FID, KID, precision, recall, density, coverage; CMMD with a CLIP model):
  `eval.fid_samples` images generated from the held-out captions (cycled), against up to as many
  held-out real images, each image through each network once (`sdflow.evaluation`).
- CLIP score: every generated image against its prompt, overall and per prompt (worst first), when
  `eval.clip_model` is set; otherwise `null` with the reason, never a made-up number.
- Baseline: the scratch UNet as training started (`build_unet(model)`, same seed), or the pretrained
  model (`model.pretrained`) for full fine-tuning and LoRA. It is scored once per base model and
  evaluation settings, as its own stage output `stages/baseline/<key>/` (key: the base weights, the
  eval settings, the caption stage that holds the prompts and real images, the code), and reused by
  every trained model evaluated against it.
- Which trained model (`eval.checkpoints`, `trained_model` in metrics.json names its directory in
  the train output and its step): `final`, the last step's (with `train.keep_best` the train stage
  exports it as `final-pipeline/` beside the best); `best`, the lowest validation loss's
  (`pipeline/`, needs `train.keep_best`); `all`, the last step's and every checkpoint the train
  stage kept (`checkpoints` in metrics.json, `metric_curve.png`; a note says when only the final
  one was kept).

Output: `samples/<model>/pXXX-J.png`, `grid.png`, `metrics.json` (also the manifest's info, which
the flow copies into summary.json). Each model's scores are saved as they finish, so a rerun after
a crash skips the models already done.
"""

from __future__ import annotations

import json
import logging
import shutil
from typing import Any

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.evaluation.curves import draw_metric_curve
from sdflow.evaluation.grids import save_png
from sdflow.evaluation.held_out import add_real_images, held_out_prompts
from sdflow.evaluation.results import draw_grid, score_model, summarise
from sdflow.evaluation.sampling import (
    base_source,
    load_baseline,
    load_checkpoint_pipeline,
    load_trained,
    scored_model,
)
from sdflow.evaluation.scoring import METRICS, Scorer
from sdflow.models.components import component_sources
from sdflow.models.files import weights_hash
from sdflow.models.formats.evaluation_card import write_evaluation_card
from sdflow.ops.orchestration import stage_task
from sdflow.store.checkpoints import list_checkpoints, step_name
from sdflow.store.fingerprint import code_version, hash_tree
from sdflow.store.stageio import (
    Manifest,
    StageBuild,
    build_stage,
    output_dir,
    stage_key,
    write_atomic,
    write_json,
)

log = logging.getLogger(__name__)

METRIC_CURVE = "metric_curve.png"


def evaluate_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    """Trained model + captions + eval settings + resolution + the baseline's source + code."""
    model = config.model
    base = None
    if config.eval.baseline and model.init == "pretrained" and model.pretrained:
        base = weights_hash(model.pretrained, None, model.revision)  # a swapped base reruns
    parts = {
        "eval": config.eval.model_dump(mode="json"),
        "resolution": config.download.resolution,
        "model": model.model_dump(mode="json"),  # decides the baseline (scratch seed, base model)
        "base_weights": base,
    }
    stages = [upstream.get("train"), upstream.get("caption")]
    return stage_key("evaluate", parts, stages, code_version(__name__))


def evaluate(config: RunConfig, upstream: dict[str, Manifest | None], workdir: str) -> Manifest:
    """Sample, draw the grid and score trained vs baseline; returns the evaluate manifest."""
    for name in ("train", "caption"):
        if not upstream.get(name):
            raise UserError(f"The evaluate stage needs the {name} stage's output; run it first.")
    key = evaluate_key(config, upstream)
    return build_stage(workdir, "evaluate", key, lambda b: _build(b, config, upstream, workdir))


evaluate_task = stage_task("evaluate", evaluate_key)(evaluate)


def _build(build: StageBuild, config: RunConfig, upstream: dict, workdir: str) -> Manifest:
    ev, train = config.eval, upstream["train"]
    chosen, step = scored_model(config, train)  # `best` without a best model: before any work
    scorer = Scorer(ev)  # first: a missing Inception file or CLIP dir fails before any sampling
    pool, held_prompts = held_out_prompts(workdir, upstream["caption"], config)
    prompts = list(ev.prompts) or held_prompts
    add_real_images(scorer, workdir, upstream["caption"], config)
    load = lambda: load_trained(config, train, workdir, chosen)  # noqa: E731
    results = {"trained": _score_once(build, "trained", load, prompts, pool, scorer, config)}
    if ev.baseline:
        results["baseline"] = baseline_scores(
            build, config, upstream, workdir, scorer, prompts, pool
        )
    names = {name: describe_model(name, config, train) for name in results}
    save_png(draw_grid(build.path, prompts, names, config), build.path / "grid.png")
    metrics = summarise(results, names, prompts, scorer.num_real, config)
    # which of the train stage's models "trained" is: its directory there, and its step
    metrics["trained_model"] = {
        "choice": ev.checkpoints,
        "path": train["files"][chosen],
        "step": step,
    }
    files = {"grid": "grid.png", "metrics": "metrics.json", "samples": "samples"}
    if ev.checkpoints == "all":
        rows, note = score_checkpoints(build, config, train, workdir, scorer, prompts, pool)
        metrics.update(checkpoints=rows, checkpoints_note=note)
        write_atomic(build.path / METRIC_CURVE, draw_metric_curve(rows))
        files["metric_curve"] = METRIC_CURVE
    write_json(build.path / "metrics.json", metrics)
    # the final card: the scored model's train card with the metrics and the grid (`sdflow export`)
    model_dir = output_dir(workdir, train) / train["files"][chosen]
    if write_evaluation_card(model_dir, metrics, build.path / "card", build.path / "grid.png"):
        files["card"] = "card"
    counts = {"prompts": len(prompts), "generated": ev.fid_samples, "real": scorer.num_real}
    return build.finish(counts=counts, files=files, info=metrics)


# --------------------------------------------------------------------------- baseline, checkpoints


def baseline_key(config: RunConfig, upstream: dict[str, Manifest | None], workdir: str) -> str:
    """The starting model's identity + eval settings + the caption stage (prompts, real images) +
    code: every trained model of the same base and settings shares this key."""
    settings = {
        "eval": config.eval.model_dump(mode="json", exclude={"baseline", "checkpoints"}),
        "resolution": config.download.resolution,
        "precision": config.train.mixed_precision,  # the sampling dtype on a GPU
        "model": config.model.model_dump(mode="json"),
        "base": base_identity(config, upstream["train"], workdir),
    }
    return stage_key("baseline", settings, [upstream.get("caption")], code_version(__name__))


def base_identity(config: RunConfig, train: Manifest, workdir: str) -> str:
    """Content hash of what the baseline is made of besides `model` (the scratch UNet's seed).

    Scratch: the trained pipeline without its UNet (VAE, text encoder, tokenizer, scheduler).
    Pretrained: the base model's weights (and `model.vae`'s, which sampling decodes with).
    """
    model = config.model
    if model.init == "scratch":
        if "pipeline" not in train["files"]:
            raise UserError(f"The train stage output {train['path']} has no pipeline.")
        pipeline = output_dir(workdir, train) / train["files"]["pipeline"]
        return "scratch:" + hash_tree(pipeline, skip_dirs=("unet",))
    source = base_source(config, train)
    revision = model.revision if source == model.pretrained else None
    identity = weights_hash(source, None, revision)
    if model.vae:
        sources = component_sources(config, {}, workdir)
        identity += " vae:" + weights_hash(sources.vae, sources.vae_subfolder)
    return identity


def baseline_scores(build, config, upstream, workdir, scorer, prompts, pool) -> dict[str, Any]:
    """The baseline's scores from `stages/baseline/<key>/`, computed there once; its grid samples
    are copied into this stage's `samples/baseline/` (the evaluate output stands alone)."""
    train = upstream["train"]

    def score(base: StageBuild) -> Manifest:
        log.info("evaluate: sampling and scoring the baseline (shared by every trained model)")
        pipe = load_baseline(config, train, workdir)
        scores = score_model(
            pipe, base.path / "samples" / "baseline", prompts, pool, scorer, config
        )
        write_json(base.path / "scores.json", scores)
        counts = {"prompts": len(prompts), "generated": config.eval.fid_samples}
        files = {"scores": "scores.json", "samples": "samples"}
        return base.finish(counts={**counts, "real": scorer.num_real}, files=files)

    key = baseline_key(config, upstream, workdir)
    manifest = build_stage(workdir, "baseline", key, score)
    if manifest["reused"]:
        log.info("evaluate: baseline scores reused from %s", manifest["path"])
    base = output_dir(workdir, manifest)
    target = build.path / "samples" / "baseline"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(base / "samples" / "baseline", target)
    return json.loads((base / manifest["files"]["scores"]).read_text())


def score_checkpoints(build, config, train, workdir, scorer, prompts, pool) -> tuple[list, str]:
    """(one row per kept checkpoint: step and every metric, a note on what was kept)."""
    root = output_dir(workdir, train) / train["files"].get("checkpoints", "checkpoints")
    final = train.get("counts", {}).get("steps")
    rows = []
    for step in list_checkpoints(root):
        name = step_name(step)
        if step == final:  # the exported model is this checkpoint's weights: scored already
            scores = json.loads((build.path / "scores-trained.json").read_text())
        else:
            load = lambda path=root / name: load_checkpoint_pipeline(config, train, workdir, path)  # noqa: E731
            scores = _score_once(build, name, load, prompts, pool, scorer, config)
        rows.append({"step": step, **{metric: scores[metric] for metric in METRICS}})
    note = f"scored {len(rows)} kept checkpoint(s) of the train stage"
    if len(rows) < 2:
        note = (
            f"only {len(rows)} checkpoint(s) kept in {root}: the train stage keeps just its "
            "final checkpoint, so there is no curve over training; keep more checkpoints there"
        )
        log.warning("evaluate: eval.checkpoints is 'all', but %s", note)
    return rows, note


# ------------------------------------------------------------------------------- prompts and reals


# ---------------------------------------------------------------------------------------- models


def describe_model(name: str, config: RunConfig, train: Manifest) -> str:
    model = config.model
    base = "scratch" if model.init == "scratch" else str(model.pretrained)
    if name == "trained":
        mode = "LoRA" if "lora" in train["files"] else "full"
        steps = train.get("counts", {}).get("steps", config.train.max_steps)
        step = scored_model(config, train)[1]
        if config.eval.checkpoints == "best":
            steps = f"best validation loss at step {step} of {steps}"  # train.keep_best
        else:
            steps = f"{steps} steps"
        return f"trained: {base}, {mode}, {steps} (train {train['key'][:8]})"
    if model.init == "scratch":
        return f"baseline: scratch UNet untrained (model.seed {model.seed})"
    return f"baseline: {base} (before training)"


# ------------------------------------------------------------------------------ sampling, scoring


def _score_once(build, name, load, prompts, pool, scorer, config) -> dict[str, Any]:
    """Scores of one model, computed once: saved to scores-<name>.json and reused by a rerun."""
    done = build.path / f"scores-{name}.json"
    if done.is_file():
        log.info("evaluate: %s already scored in an earlier attempt", name)
        return json.loads(done.read_text())
    log.info("evaluate: sampling and scoring the %s model", name)
    scores = score_model(load(), build.path / "samples" / name, prompts, pool, scorer, config)
    write_json(done, scores)
    return scores


# ------------------------------------------------------------------------------- grid and summary
