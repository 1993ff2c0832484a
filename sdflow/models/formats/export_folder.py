"""One folder to upload: a run's model, its exports and its final card (`sdflow export RUN DEST`).

The train stage writes the model (`pipeline/` or `lora/`), its exports beside it (single file and
its `.yaml`, kohya LoRA) and a card without the evaluation; the evaluate stage runs later and may
not change the train stage's published output, so it writes the final card (metrics against the
base model, the evaluation grid) into its own `card/`. `export_folder` puts them together in DEST:
the evaluated model's directory (the one `metrics.json`'s `trained_model` names; without an
evaluation, `pipeline/` or `lora/`), that model's exports, and the evaluate stage's card over the
train stage's. Every file is a copy, so nothing done to the folder can change a stage output;
`link=True` (`--link`) hard-links the weights instead (no time, no space; where the filesystem
allows), which a write into those files would change in the stage output too. DEST is written
whole or not at all, and never over a folder that has files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sdflow.errors import UserError
from sdflow.models.formats.exports import EXPORT_FILES
from sdflow.store.stageio import Manifest, atomic_dir, load_manifest

WEIGHTS = (".safetensors", ".bin", ".ckpt")  # hard-linked with `link`
MODELS = ("pipeline", "lora")


def export_folder(run: Path, dest: Path, link: bool = False) -> list[str]:
    """Assemble DEST from the run directory `run` (or its summary.json); returns what to print."""
    train_dir, evaluate_dir = run_outputs(run)
    train = _manifest(train_dir)
    evaluate = _manifest(evaluate_dir) if evaluate_dir else None
    model = _model_key(train, evaluate)
    prefix = "final_" if model.startswith("final_") else ""
    exports = [train["files"][prefix + n] for n in EXPORT_FILES if prefix + n in train["files"]]
    card = (
        evaluate_dir / evaluate["files"]["card"]
        if evaluate and "card" in evaluate["files"]
        else None
    )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and has files: give a new (or empty) folder to export to.")
    with atomic_dir(dest) as tmp:
        _place(train_dir / train["files"][model], tmp, link, skip=card is not None)
        for name in exports:
            _place(train_dir / name, tmp / name, link)
        if card is not None:
            _place(card, tmp, link=False)
    lines = [f"{dest}: {train['files'][model]}/ of {train_dir}", *[f"  + {n}" for n in exports]]
    lines.append(f"  card: {card / 'README.md'}" if card else "  card: the train stage's; "
                 "no evaluation in this run (run the evaluate stage for the metrics)")  # fmt: skip
    return [*lines, f"upload: huggingface-cli upload <user>/<name> {dest} ."]


def run_outputs(run: Path) -> tuple[Path, Path | None]:
    """(train stage output, evaluate stage output or None) of a run, from its summary.json."""
    summary_path = run if run.name == "summary.json" else run / "summary.json"
    if not summary_path.is_file():
        raise UserError(
            f"{run} is not a run directory (no summary.json): give runs/<id> of the workdir, "
            "the directory `sdflow run` prints last."
        )
    stages = json.loads(summary_path.read_text()).get("stages", {})
    outputs = {name: stages.get(name, {}).get("output") for name in ("train", "evaluate")}
    if not outputs["train"]:
        raise UserError(f"The run {run} has no train stage output: nothing to export.")
    return Path(outputs["train"]), Path(outputs["evaluate"]) if outputs["evaluate"] else None


def _manifest(directory: Path) -> Manifest:
    manifest = load_manifest(directory)
    if manifest is None:
        raise UserError(
            f"The stage output {directory} is gone or incomplete (removed by `sdflow gc`?): "
            "rerun the run to rebuild it, then export."
        )
    return manifest


def _model_key(train: Manifest, evaluate: Manifest | None) -> str:
    """The train manifest's `files` key of the model to export: the evaluated one, else the
    main one (`pipeline` or `lora`)."""
    files = train["files"]
    scored = ((evaluate or {}).get("info", {}).get("trained_model") or {}).get("path")
    keys = [k for k, v in files.items() if v == scored] or [k for k in MODELS if k in files]
    if not keys:
        raise UserError(f"The train stage output {train['path']} has no model to export.")
    return keys[0]


def _place(source: Path, target: Path, link: bool, skip: bool = False) -> None:
    """`source` (a file or a tree) at `target`, copied (`link`: weights hard-linked where the
    filesystem allows); `skip`: leave out the README.md at the top (another card replaces it)."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in sorted(source.iterdir()):
            if not (skip and child.name == "README.md"):
                _place(child, target / child.name, link)
        return
    if link and source.suffix in WEIGHTS:
        try:
            os.link(source, target)
            return
        except OSError:  # another filesystem, or links not allowed: copy
            pass
    shutil.copyfile(source, target)
