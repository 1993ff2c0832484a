"""Two subsets end to end through `sdflow run`: each subset's data stages on their own keys, the
train stage's per-subset report, and an edit of one subset rebuilding only that subset's stages
(the other's come from the cache, and the latents stage encodes only the edited subset's rows).

A LoRA on the tiny SD 1.5 (`tiny_sd15`): no autoencoder stage, seconds per stage; the first run
stops after the train stage (evaluate reads the joined set as it reads any caption output), the
second after the latents stage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sdflow.cli import main
from sdflow.store.stageio import shard_paths
from sdflow.training.latent_data import read_shard_ids

SETTINGS = {
    "description": "two subsets, repeats 1 and 4",
    "download": {"resolution": 32, "resize_mode": "center_crop"},
    "filter": {"min_size": 16},
    "model": {"init": "pretrained"},
    "latents": {"batch_size": 8},
    "train": {"mode": "lora", "lora_rank": 4, "batch_size": 4, "max_steps": 3, "lr": 0.01,
              "checkpoint_every": 3, "log_every": 1},
    "eval": {"held_out_fraction": 0.2},
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from sdflow.data.sources.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("subsets-flow")
    return {
        name: make_demo_dataset(root / name, count=10, seed=seed, size=32)
        for seed, name in enumerate(("few", "many"))
    }


def write_profile(path: Path, base: Path, folders: dict[str, Path], many_prefix: str) -> Path:
    subsets = [
        {"name": "few", "source": {"kind": "folder", "path": str(folders["few"])}, "repeats": 1},
        {
            "name": "many",
            "source": {"kind": "folder", "path": str(folders["many"])},
            "caption": {"prefix": many_prefix},
            "repeats": 4,
        },
    ]
    settings = {**SETTINGS, "model": {"init": "pretrained", "pretrained": str(base)}}
    path.write_text(yaml.safe_dump({**settings, "subsets": subsets}))
    return path


def run(profile: Path, workdir: Path, *extra: str) -> dict:
    before = set((workdir / "runs").glob("*"))
    assert main(["run", str(profile), "--workdir", str(workdir), *extra]) == 0
    (run_dir,) = set((workdir / "runs").glob("*")) - before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stages"]
    return summary


def test_two_subsets_end_to_end_and_an_edit_rebuilds_one(
    prefect_server, tiny_sd15, folders, tmp_path
):
    workdir = tmp_path / "work"
    profile = write_profile(tmp_path / "subsets.yaml", tiny_sd15, folders, "")
    first = run(profile, workdir, "--only", "download,filter,caption,latents,train")
    data = [f"{stage}[{name}]" for name in ("few", "many") for stage in DATA]
    assert list(first["stages"]) == [*data, "subsets", "latents", "train", "evaluate"]
    assert not any(entry["cached"] for entry in first["stages"].values())
    assert first["stages"]["evaluate"]["status"] == "skipped"  # reads the join as any caption set
    assert "| captioned | caption | 20 |" in report_of(first)  # the joined set, as its caption

    # the report against the cache itself: training images per subset from the latent ids
    latents = first["stages"]["latents"]
    ids = [i for p in sorted(Path(latents["output"]).glob("latents-*")) for i in read_shard_ids(p)]
    images = Counter(i.split("/", 1)[0] for i in ids)
    report = first["stages"]["train"]["subsets"]
    assert {name: entry["images"] for name, entry in report.items()} == images
    assert (report["few"]["repeats"], report["many"]["repeats"]) == (1, 4)
    # recounted from the order after training = what the loop counted step by step
    seen = sum(entry["samples_seen"] for entry in report.values())
    assert seen == first["stages"]["train"]["counts"]["samples_seen"] > 0

    # the edit: a trigger word on one subset's captions; up to the latents (train and evaluate
    # would rerun as in the first run); --only caption selects the subsets' join too
    edited = write_profile(profile, tiny_sd15, folders, "sks, ")
    second = run(edited, workdir, "--only", "download,filter,caption,latents")
    stages = second["stages"]
    assert all(stages[f"{stage}[few]"]["cached"] for stage in DATA)
    assert stages["download[many]"]["cached"] and stages["filter[many]"]["cached"]
    assert not stages["caption[many]"]["cached"]
    assert not stages["subsets"]["cached"] and not stages["latents"]["cached"]
    assert stages["train"]["status"] == "skipped"
    # the latents stage encoded only the edited subset's rows (training and held out): the
    # unchanged subset's came from its row memo
    manifest = json.loads((Path(stages["latents"]["output"]) / "MANIFEST.json").read_text())
    assert manifest["info"]["rows_computed"] == stages["caption[many]"]["counts"]["kept"]
    captions = json.loads((Path(stages["subsets"]["output"]) / "MANIFEST.json").read_text())
    assert len(shard_paths(workdir, captions)) == 2  # one caption shard per subset
    assert "sks (10)" in report_of(second)  # the edited subset's 10 captions start with it


def report_of(summary: dict) -> str:
    """The dataset report's markdown summary (funnel, most frequent caption words)."""
    return (Path(summary["dataset_report"]).parent / "dataset-report" / "summary.md").read_text()


DATA = ("download", "filter", "caption")
