"""The final model card: the train stage's card of the scored model, with the evaluation.

The evaluate stage runs after the train stage, whose published output never changes, so it writes
the final card into its own output (`card/README.md`, with the evaluation grid beside it as
`evaluation-grid.png`): the train card's metadata and body, plus the trained model's metrics in
the metadata's `model-index` (huggingface_hub's `EvalResult`s, which the Hub shows as the model's
evaluation results) and, in the body, the metrics of the trained and the base model side by side,
how they were measured and the grid. `sdflow export` lays it over the train card
(`sdflow.models.formats.export_folder`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from sdflow.models.formats.card import BESIDE, CARD, EVALUATION_PENDING
from sdflow.store.stageio import write_atomic

EVALUATION_GRID = "evaluation-grid.png"
LABELS = {"fid": "FID", "kid": "KID", "cmmd": "CMMD", "clip_score": "CLIP score"}
LOWER_IS_BETTER = ("fid", "kid", "cmmd")
DATASET = "held-out images of the run's data"


def write_evaluation_card(model_dir: Path, metrics: dict[str, Any], out: Path, grid: Path) -> bool:
    """`out/README.md` (the card of `model_dir`, the train stage's, with the evaluation) and
    `out/evaluation-grid.png`; False when the train stage wrote no card there."""
    if not (model_dir / CARD).is_file():
        return False
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid, out / EVALUATION_GRID)
    write_atomic(out / CARD, str(evaluated_card(ModelCard.load(model_dir / CARD), metrics)))
    return True


def evaluated_card(card: ModelCard, metrics: dict[str, Any]) -> ModelCard:
    data = card.data
    title = next((line[2:] for line in card.text.splitlines() if line.startswith("# ")), None)
    data.model_name = title or "sdflow model"
    data.eval_results = eval_results(metrics) or None
    section = "\n".join(evaluation_section(metrics))
    body = card.text.replace(BESIDE, "(in this folder)")
    if EVALUATION_PENDING not in body:  # a card of an earlier sdflow: the section goes last
        body += f"\n{EVALUATION_PENDING}\n"
    body = body.replace(EVALUATION_PENDING, section)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def eval_results(metrics: dict[str, Any]) -> list[EvalResult]:
    """The trained model's metrics that have a value, as the Hub's model-index reads them."""
    results = []
    for name, metric in metrics["trained"]["metrics"].items():
        if metric["value"] is None:
            continue
        results.append(EvalResult(
            task_type="text-to-image", dataset_type="sdflow-held-out", dataset_name=DATASET,
            dataset_split="held-out", metric_type=name, metric_value=metric["value"],
            metric_name=LABELS.get(name, name), metric_config=metric["features"],
        ))  # fmt: skip
    return results


def evaluation_section(metrics: dict[str, Any]) -> list[str]:
    trained, baseline = metrics["trained"], metrics.get("baseline")
    head = "| metric | trained |" + (" base model |" if baseline else "")
    lines = [
        "## Evaluation against the base model",
        "",
        head,
        "|---|---|" + ("---|" if baseline else ""),
    ]
    notes: dict[str, str] = {}
    for name, metric in trained["metrics"].items():
        label = LABELS.get(name, name)
        row = [label, _value(metric, notes, label)]
        if baseline:
            row.append(_value(baseline["metrics"][name], notes, label))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Lower is better for " + ", ".join(LABELS[m] for m in LOWER_IS_BETTER)
              + "; higher for the others."]  # fmt: skip
    lines += ["", *[f"- {name}: not computed: {reason}" for name, reason in notes.items()]]
    lines += ["", *_how(metrics, trained, baseline)]
    shown = "the base model (left) and the trained model (right)" if baseline else "the model"
    lines += ["", f"![evaluation grid: {shown}, the same prompts and seeds]({EVALUATION_GRID})", ""]
    return lines


def _value(metric: dict[str, Any], notes: dict[str, str], label: str) -> str:
    if metric["value"] is None:
        notes.setdefault(label, metric.get("reason") or "no value")
        return "n/a"
    return f"{metric['value']:.6g}"


def _how(metrics: dict[str, Any], trained: dict, baseline: dict | None) -> list[str]:
    helped = metrics.get("training_helped")
    verdict = (
        f"Training helped (FID below the base model's): {'yes' if helped else 'no'}."
        if helped is not None
        else f"No comparison: {metrics.get('training_helped_reason', 'no baseline')}."
    )
    lines = [
        f"Models: {trained['name']}" + (f"; {baseline['name']}." if baseline else "."),
        verdict,
        f"Measured on {metrics['num_generated']} generated and {metrics['num_real']} held-out "
        f"real images; features: {metrics['fid_feature_extractor']}. {metrics.get('fid_note') or ''}",
        f"Sampling: {metrics['scheduler']}, {metrics['num_inference_steps']} steps, guidance "
        f"{metrics['guidance_scale']}, {metrics['resolution']} px, seed {metrics['seed']}.",
    ]
    return [line.strip() for line in lines]
