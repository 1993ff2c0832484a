"""`sdflow export RUN DEST` on a real tiny run (train, then evaluate): one folder with the model,
its single-file export and the final card, which huggingface_hub, PIL and diffusers read back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from fixtures.sd_layout import layout_latents
from fixtures.stages import BROKEN, caption_stage, samples
from huggingface_hub import ModelCard
from PIL import Image

from sdflow.cli import main
from sdflow.models.formats.card import EVALUATION_PENDING
from sdflow.models.formats.export_folder import export_folder
from sdflow.profiles import load_profile
from sdflow.store.stageio import StageBuild, output_dir
from tasks.evaluate import evaluate
from tasks.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = ["model.init=pretrained", "download.resolution=64", "train.max_steps=1",
       "train.checkpoint_every=1", "train.batch_size=2", "train.export_dtype=float32",
       "train.export_formats=[single_file]", "eval.num_prompts=2", "eval.images_per_prompt=1",
       "eval.num_inference_steps=2", "eval.fid_samples=4", "eval.batch_size=4",
       "eval.held_out_fraction=0.5"]  # fmt: skip
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def tiny_run(sd15_layout, tmp_path_factory) -> dict:
    """A full fine-tune of the SD 1.x layout, evaluated against its base; its run directory holds
    a summary.json naming the two outputs, as the pipeline flow writes it."""
    workdir = tmp_path_factory.mktemp("work").resolve()
    config = load_profile("tiny-test", [*RUN, f"model.pretrained={sd15_layout}"])
    caption = caption_stage(workdir, [r for r in samples(16) if r["id"] != BROKEN])
    latents = layout_latents(workdir, sd15_layout)
    upstream = {"latents": latents, "autoencoder": None, "caption": caption}
    trained = train(config, upstream, str(workdir))
    evaluated = evaluate(config, {"train": trained, "caption": caption}, str(workdir))
    outputs = {"train": trained, "evaluate": evaluated}
    run = workdir / "runs" / "20260101-000000-test"
    run.mkdir(parents=True)
    stages = {name: {"output": str(output_dir(workdir, m))} for name, m in outputs.items()}
    (run / "summary.json").write_text(json.dumps({"stages": stages}))
    return {"run": run, "workdir": workdir, **outputs}


def test_the_exported_folder_holds_the_model_its_single_file_and_the_evaluated_card(
    tiny_run, tmp_path, capsys
):
    dest = tmp_path / "upload"
    assert main(["export", str(tiny_run["run"]), str(dest)]) == 0
    assert f"huggingface-cli upload <user>/<name> {dest} ." in capsys.readouterr().out
    train_dir = output_dir(tiny_run["workdir"], tiny_run["train"])
    evaluate_dir = output_dir(tiny_run["workdir"], tiny_run["evaluate"])
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())

    card = ModelCard.load(dest / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-to-image" and data["library_name"] == "diffusers"
    assert "base_model" not in data  # a local base folder is named in the body only
    assert {"stable-diffusion", "sdflow"} <= set(data["tags"])
    # the model-index holds every trained-model metric that has a value, exactly
    expected = {
        k: m["value"] for k, m in metrics["trained"]["metrics"].items() if m["value"] is not None
    }
    assert {"fid", "kid"} <= expected.keys() and "clip_score" not in expected
    assert "| CLIP score | n/a | n/a |" in card.text  # no CLIP model: no value, the reason
    assert "- CLIP score: not computed: eval.clip_model not set" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == expected
    assert {r.task_type for r in card.data.eval_results} == {"text-to-image"}
    # the body's table: trained and base model side by side, as metrics.json has them
    row = next(line for line in card.text.splitlines() if line.startswith("| FID |"))
    trained, base = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
    assert trained == pytest.approx(metrics["trained"]["fid"], rel=1e-5)
    assert base == pytest.approx(metrics["baseline"]["fid"], rel=1e-5)
    assert (
        EVALUATION_PENDING not in card.text
        and "`pipeline.safetensors` (in this folder)" in card.text
    )
    # every image the card shows is in the folder and opens; the grid is the evaluate stage's
    images = IMAGE.findall(card.text)
    assert "evaluation-grid.png" in images and "loss.png" in images
    for name in images:
        with Image.open(dest / name) as image:
            image.load()
    grid, original = Image.open(dest / "evaluation-grid.png"), Image.open(evaluate_dir / "grid.png")
    assert grid.size == original.size and grid.tobytes() == original.convert(grid.mode).tobytes()
    # diffusers loads the folder: the trained UNet, not the base's; the single file is beside it
    pipe = StableDiffusionPipeline.from_pretrained(dest, safety_checker=None)
    stage_unet = UNet2DConditionModel.from_pretrained(train_dir / "pipeline" / "unet")
    for name, value in stage_unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], value), name
    single = (dest / "pipeline.safetensors").read_bytes()
    assert single == (train_dir / "pipeline.safetensors").read_bytes()
    # the train stage's own card is untouched (its output is immutable)
    assert EVALUATION_PENDING in (train_dir / "pipeline" / "README.md").read_text()


def test_without_an_evaluation_the_train_card_goes_and_a_full_folder_is_refused(
    tiny_run, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    train_dir = output_dir(tiny_run["workdir"], tiny_run["train"])
    (run / "summary.json").write_text(json.dumps({"stages": {"train": {"output": str(train_dir)}}}))
    dest = tmp_path / "linked"
    assert main(["export", str(run), str(dest), "--link"]) == 0
    assert "no evaluation in this run" in capsys.readouterr().out
    assert EVALUATION_PENDING in (dest / "README.md").read_text()
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (dest / weights).stat().st_ino == (train_dir / "pipeline" / weights).stat().st_ino
    assert (dest / "README.md").stat().st_ino != (
        train_dir / "pipeline" / "README.md"
    ).stat().st_ino
    assert main(["export", str(run), str(dest)]) == 2  # never over a folder that has files
    assert "has files" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "other")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_the_evaluated_model_and_its_own_exports_are_exported(tmp_path):
    """With `train.keep_best`, a train output holds two models; the one the evaluate stage scored
    (`final-lora/`) goes, with its own kohya file, under the evaluate stage's card."""
    workdir = tmp_path / "work"
    files = {"lora": "lora", "kohya_lora": "lora-kohya.safetensors",
             "final_lora": "final-lora", "final_kohya_lora": "final-lora-kohya.safetensors"}  # fmt: skip
    build = StageBuild(workdir, "train", "keep-best")
    for model in ("lora", "final-lora"):
        (build.path / model).mkdir(parents=True)
        (build.path / model / "pytorch_lora_weights.safetensors").write_bytes(model.encode())
        (build.path / model / "README.md").write_text(f"card of {model}")
        (build.path / f"{model}-kohya.safetensors").write_bytes(f"kohya {model}".encode())
    trained = build.finish(counts={}, files=files)
    build = StageBuild(workdir, "evaluate", "scored-final")
    (build.path / "card").mkdir(parents=True)
    (build.path / "card" / "README.md").write_text("final card")
    info = {"trained_model": {"choice": "final", "path": "final-lora", "step": 3}}
    evaluated = build.finish(counts={}, files={"card": "card"}, info=info)
    stages = {n: {"output": str(output_dir(workdir, m))} for n, m in
              (("train", trained), ("evaluate", evaluated))}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps({"stages": stages}))
    dest = tmp_path / "dest"
    export_folder(tmp_path / "summary.json", dest)
    assert sorted(p.name for p in dest.iterdir()) == [
        "README.md", "final-lora-kohya.safetensors", "pytorch_lora_weights.safetensors"
    ]  # fmt: skip
    assert (dest / "pytorch_lora_weights.safetensors").read_bytes() == b"final-lora"
    assert (dest / "README.md").read_text() == "final card"
