"""One model's evaluation: its grid samples saved, every metric computed on its FID set, and the
comparison of the trained model with its baseline (metrics.json and the before/after grid)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdflow.config import RunConfig
from sdflow.evaluation.features import feature_label, feature_note
from sdflow.evaluation.grids import Block, render_grid, save_png
from sdflow.evaluation.sampling import SEED_STRIDE, fid_sample_jobs, generate
from sdflow.evaluation.scoring import Scorer

log = logging.getLogger("tasks.evaluate")


def score_model(pipe, sample_dir: Path, prompts, pool, scorer: Scorer, config) -> dict[str, Any]:
    """Save the grid samples, then every metric: the grid images count for CLIP score only, the
    FID set (`pool`: the held-out captions it cycles through) for every metric."""
    ev = config.eval
    model = scorer.start()
    sample_dir.mkdir(parents=True, exist_ok=True)
    grid_jobs = [
        (p, ev.seed + i * SEED_STRIDE + j, f"p{i:03d}-{j}.png")
        for i, p in enumerate(prompts)
        for j in range(ev.images_per_prompt)
    ]
    for batch, images in generate(pipe, grid_jobs, config):
        for (_, _, file), image in zip(batch, images, strict=True):
            save_png(Image.fromarray(image.permute(1, 2, 0).numpy()), sample_dir / file)
        model.add(images, [prompt for prompt, _, _ in batch], for_distribution=False)
    for batch, images in generate(pipe, fid_sample_jobs(pool, ev.fid_samples, ev.seed), config):
        model.add(images, [prompt for prompt, _, _ in batch], for_distribution=True)
    del pipe  # free the GPU before the next model loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    scores = model.result(prompts)  # the per-prompt table: the evaluation (grid) prompts
    log.info(
        "evaluate: %s FID %.3f, KID %s, precision %s, recall %s, CLIP score %s",
        sample_dir.name, scores["fid"], scores["kid"], scores["precision"], scores["recall"],
        scores["clip_score"],
    )  # fmt: skip
    return scores


def draw_grid(path: Path, prompts, names: dict[str, str], config: RunConfig) -> Image.Image:
    """Baseline block left (before), trained block right (after), read back from the samples."""
    ev = config.eval
    blocks = []
    for name in ("baseline", "trained"):
        if name in names:
            rows = [
                [
                    _open(path / "samples" / name / f"p{i:03d}-{j}.png")
                    for j in range(ev.images_per_prompt)
                ]
                for i in range(len(prompts))
            ]
            blocks.append(Block(name, rows))  # full names are in the title
    settings = (
        f"sdflow evaluate: {ev.scheduler}, {ev.num_inference_steps} steps, guidance "
        f"{ev.guidance_scale}, seed {ev.seed}, {config.download.resolution} px"
    )
    return render_grid(prompts, blocks, [settings, *names.values()])


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def summarise(results, names, prompts, num_real: int, config: RunConfig) -> dict[str, Any]:
    """metrics.json: each model's scores, how they were measured, and whether training helped."""
    ev = config.eval
    trained, baseline = results["trained"], results.get("baseline")
    metrics: dict[str, Any] = {
        "trained": {**trained, "name": names["trained"]},
        "baseline": {**baseline, "name": names["baseline"]} if baseline else None,
        "fid_feature_extractor": feature_label(ev.fid_features),
        "fid_note": feature_note(ev.fid_features),
        "comparable_to_published": ev.fid_features == "inception",
        "num_generated": ev.fid_samples,
        "num_real": num_real,
        "prompts": prompts,
        "images_per_prompt": ev.images_per_prompt,
        "guidance_scale": ev.guidance_scale,
        "num_inference_steps": ev.num_inference_steps,
        "scheduler": ev.scheduler,
        "resolution": config.download.resolution,
        "seed": ev.seed,
    }
    if baseline:
        metrics["training_helped"] = trained["fid"] < baseline["fid"]
    else:
        metrics["training_helped"] = None
        metrics["training_helped_reason"] = "eval.baseline is false: nothing to compare with"
    return metrics
