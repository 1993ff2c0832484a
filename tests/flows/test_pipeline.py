"""The pipeline flow end to end on tiny-test, against a real (test) Prefect server.

Covers the caching contract as a user sees it: a second run is all cache hits, a deleted output or a
changed threshold reruns exactly what it must, edited source bytes are never a stale hit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from fixtures.pipelines import seeded_image

from sdflow.cli import main

DATA_STAGES = "download,filter,caption"
PROMPT = "a red circle on a white background"


def _run(workdir: Path, source: Path, *extra: str) -> dict:
    """`sdflow run tiny-test ...`; returns the new run's summary.json.

    (Not through capsys: Prefect keeps the stream it first logged to for the whole session.)
    """
    before = set((workdir / "runs").glob("*"))
    args = ["run", "tiny-test", "--workdir", str(workdir), "--set", f"source.path={source}"]
    assert main([*args, *extra]) == 0
    (run_dir,) = set((workdir / "runs").glob("*")) - before
    return json.loads((run_dir / "summary.json").read_text())


def _statuses(summary: dict) -> dict[str, tuple[str, bool]]:
    return {name: (s["status"], s["cached"]) for name, s in summary["stages"].items()}


@pytest.fixture()
def source(demo_folder, tmp_path) -> Path:
    copy = tmp_path / "source"
    shutil.copytree(demo_folder, copy)
    return copy


def test_whole_dag_then_all_cached(prefect_server, source, tmp_path):
    workdir = tmp_path / "work"
    first = _run(workdir, source)
    assert first["status"] == "completed"
    assert all(s["status"] == "completed" for s in first["stages"].values()), first["stages"]
    assert list(first["stages"]) == [
        "download",
        "filter",
        "caption",
        "autoencoder",
        "latents",
        "train",
        "evaluate",
    ]
    counts = first["stages"]["download"]["counts"]
    assert counts["kept"] + counts["failed"] == counts["input"] == 240
    metrics = first["metrics"]
    evaluated = Path(first["stages"]["evaluate"]["output"], "metrics.json")
    assert metrics == json.loads(evaluated.read_text())  # summary.json reports the stage's scores
    assert metrics["trained"]["fid"] != metrics["baseline"]["fid"]
    image = seeded_image(StableDiffusionPipeline.from_pretrained(first["model_dir"]), PROMPT)
    assert image.shape == (32, 32, 3)

    second = _run(workdir, source)
    assert all(cached for _, cached in _statuses(second).values()), second["stages"]

    # LoRA fine-tune of the model this run just trained: the pretrained path, offline
    base = first["model_dir"]
    lora = _run(
        workdir, source,
        "--set", "model.init=pretrained", "--set", f"model.pretrained={base}",
        "--set", "train.mode=lora", "--set", "train.lr=0.01",
    )  # fmt: skip
    assert "autoencoder" not in lora["stages"]  # the pretrained VAE is used
    assert _statuses(lora)["download"] == ("completed", True)
    assert _statuses(lora)["latents"] == ("completed", False)  # other encoders: re-encoded
    assert Path(lora["model_dir"], "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora["model_dir"])
    assert not np.array_equal(
        seeded_image(pipe, PROMPT), image
    )  # the LoRA changes the base's output
    # the LoRA run's baseline is the first run's trained model, scored the same way again
    trained_fid = metrics["trained"]["fid"]
    assert lora["metrics"]["baseline"]["fid"] == pytest.approx(trained_fid, rel=1e-3)


def test_data_stages_rerun_exactly_what_changed(prefect_server, source, tmp_path):
    workdir = tmp_path / "work"
    only = ["--only", DATA_STAGES]
    first = _run(workdir, source, *only)
    assert _statuses(first) == {
        "download": ("completed", False),
        "filter": ("completed", False),
        "caption": ("completed", False),
        "autoencoder": ("skipped", False),
        "latents": ("skipped", False),
        "train": ("skipped", False),
        "evaluate": ("skipped", False),
    }
    report = Path(first["dataset_report"])  # the run's dataset report (tests/test_report.py)
    assert report.parent.name == first["run_id"]
    kept = first["stages"]["filter"]["counts"]["kept"]
    assert f'<td>kept by filter</td><td>filter</td><td class="n">{kept}</td>' in report.read_text()

    shutil.rmtree(first["stages"]["filter"]["output"])  # deleting an output reruns that stage only
    again = _run(workdir, source, *only)
    assert _statuses(again)["download"] == ("completed", True)
    assert _statuses(again)["filter"] == ("completed", False)
    assert _statuses(again)["caption"] == ("completed", True)  # same filter output: same key

    stricter = _run(workdir, source, *only, "--set", "filter.max_caption_chars=36")
    assert _statuses(stricter)["download"] == ("completed", True)
    assert _statuses(stricter)["filter"] == ("completed", False)
    assert _statuses(stricter)["caption"] == ("completed", False)
    assert (
        stricter["stages"]["filter"]["counts"]["kept"] < first["stages"]["filter"]["counts"]["kept"]
    )

    image = sorted((source / "images").glob("*.png"))[0]
    image.write_bytes((source / "images" / "00001.png").read_bytes())  # same name, new bytes
    edited = _run(workdir, source, *only)
    assert _statuses(edited)["download"] == ("completed", False)
    assert edited["stages"]["download"]["output"] != first["stages"]["download"]["output"]
    assert _info(edited, "download")["rows_fetched"] == 1  # only the edited image is processed
    assert _info(edited, "caption")["rows_computed"] == 1  # and captioned again


def _info(summary: dict, stage: str) -> dict:
    return json.loads((Path(summary["stages"][stage]["output"]) / "MANIFEST.json").read_text())[
        "info"
    ]


def test_only_a_later_stage_uses_cached_upstream(prefect_server, source, tmp_path):
    workdir = tmp_path / "work"
    _run(workdir, source, "--only", DATA_STAGES)
    filtered = _run(workdir, source, "--only", "filter", "--refresh", "filter")
    assert _statuses(filtered)["download"] == ("skipped", True)
    assert _statuses(filtered)["filter"] == ("completed", False)
    # the rebuilt filter output is identical, so caption's cached output still matches it
    assert _statuses(filtered)["caption"] == ("skipped", True)
    assert _statuses(filtered)["train"] == ("skipped", False)
