"""The evaluate stage on a tiny scratch pipeline (32 px, 8x8 latents) and a tiny caption stage."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from fixtures.pipelines import save_tiny_sd
from PIL import Image, ImageDraw

from sdflow.config import EvalConfig, RunConfig
from sdflow.errors import UserError
from sdflow.evaluation import results, sampling
from sdflow.evaluation.features import to_uint8
from sdflow.models.components import (
    build_unet,
)
from sdflow.profiles import load_profile
from sdflow.store.splits import is_held_out
from sdflow.store.stageio import Manifest, StageBuild, failures_table, output_dir
from tasks import evaluate as ev

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220)}
SHAPES = ("circle", "square")
HELD_OUT = 0.5


def make_config(**changes) -> RunConfig:
    config = load_profile("tiny-test")
    settings = dict(held_out_fraction=HELD_OUT, num_prompts=3, images_per_prompt=2, seed=5)
    settings.update(num_inference_steps=2, fid_samples=6, batch_size=4, fid_features="random-cnn")
    settings.update(changes)
    return config.model_copy(update={"eval": EvalConfig(**settings)})


def shape_png(color: str, shape: str, size: int = 32) -> bytes:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((6, 6, 26, 26), fill=COLORS[color])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        color, shape = list(COLORS)[i % 3], SHAPES[(i // 3) % 2]
        data = shape_png(color, shape)
        rows.append(
            dict(id=f"s{i:03d}", image=data, width=32, height=32, orig_width=32, orig_height=32,
                 content_hash=hashlib.sha256(data).hexdigest(), caption=f"a {color} {shape}",
                 source=f"row {i}", source_caption=f"a {color} {shape}")
        )  # fmt: skip
    return rows


def write_caption_stage(workdir: Path, shards: list[list[dict]]) -> Manifest:
    build = StageBuild(workdir, "caption", "fixture")
    build.path.mkdir(parents=True)
    names = [
        build.write_shard(i, pa.Table.from_pylist(rows), failures_table([]))
        for i, rows in enumerate(shards)
    ]
    total = sum(len(rows) for rows in shards)
    return build.finish(
        counts={"input": total, "kept": total, "failed": 0},
        shards=names,
        files={"failures": "failures"},
    )


def write_train_stage(
    workdir: Path, config: RunConfig, captions: list[str], key: str = "fixture", offset: int = 1
) -> Manifest:
    """A scratch 'trained' pipeline: the tiny-test components, UNet seeded differently (model.seed
    + offset) from the baseline's, so trained and baseline samples differ as after training."""
    build = StageBuild(workdir, "train", key)
    build.path.mkdir(parents=True)
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    save_tiny_sd(build.path, captions, scheduler, unet_seed_offset=offset)
    return build.finish(counts={}, files={"pipeline": "pipeline"}, info={"mode": "full"})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> tuple[Path, dict[str, Manifest]]:
    """One workdir for the module: two caption shards (about half held out) and a train stage."""
    workdir = tmp_path_factory.mktemp("work").resolve()
    rows = caption_rows(30)
    caption = write_caption_stage(workdir, [rows[:16], rows[16:]])
    train = write_train_stage(workdir, make_config(), [r["caption"] for r in rows])
    return workdir, {"train": train, "caption": caption}


def held_out_rows() -> list[dict]:
    return [r for r in caption_rows(30) if is_held_out(r["id"], HELD_OUT)]


def test_evaluate_writes_samples_grid_and_metrics(upstream) -> None:
    workdir, manifests = upstream
    config = make_config()
    manifest = ev.evaluate(config, manifests, str(workdir))
    out = output_dir(workdir, manifest)
    assert manifest["files"] == {
        "grid": "grid.png",
        "metrics": "metrics.json",
        "samples": "samples",
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert manifest["info"] == metrics  # the flow copies the info into summary.json

    held = held_out_rows()
    assert len(held) >= 6, "fixture: enough held-out rows for 6 real images"
    distinct = list(dict.fromkeys(r["caption"] for r in held))
    assert metrics["prompts"] == distinct[:3]  # distinct held-out captions, in shard order
    assert metrics["num_generated"] == 6 and metrics["num_real"] == 6
    assert metrics["trained"]["fid"] != metrics["baseline"]["fid"]  # two UNets, two scores
    label = "random-cnn (offline; not comparable to published FID)"
    for name in ("trained", "baseline"):
        scores = metrics[name]
        # the values themselves: tests/evaluation/test_metrics.py, against independent references
        for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
            detail = scores["metrics"][key]
            assert detail["value"] == scores[key] and detail["reason"] is None
            assert detail["features"] == label
            assert (detail["num_generated"], detail["num_real"]) == (6, 6)
        assert scores["metrics"]["kid"]["details"]["subset_size"] == 6  # adapted to 6 samples
        assert scores["metrics"]["precision"]["details"] == {"k": 5}
        for key in ("clip_score", "cmmd"):  # no CLIP model: null with the reason
            assert scores[key] is None
            assert scores["metrics"][key]["reason"] == "eval.clip_model not set"
        assert scores["clip_score_per_prompt"] == []
        assert name in scores["name"]
    assert metrics["trained"]["fid"] != metrics["baseline"]["fid"]
    assert metrics["training_helped"] == (metrics["trained"]["fid"] < metrics["baseline"]["fid"])
    assert (
        metrics["fid_feature_extractor"] == "random-cnn (offline; not comparable to published FID)"
    )
    assert metrics["comparable_to_published"] is False
    assert "never compare with published FIDs" in metrics["fid_note"]
    expected = dict(
        guidance_scale=5.0, num_inference_steps=2, scheduler="ddim", resolution=32, seed=5
    )
    assert {k: metrics[k] for k in expected} == expected

    for name in ("trained", "baseline"):
        files = sorted(p.name for p in (out / "samples" / name).iterdir())
        assert files == [f"p{i:03d}-{j}.png" for i in range(3) for j in range(2)]
    trained = np.asarray(Image.open(out / "samples/trained/p000-0.png"))
    baseline = np.asarray(Image.open(out / "samples/baseline/p000-0.png"))
    assert trained.shape == (32, 32, 3) and not np.array_equal(trained, baseline)

    grid = Image.open(out / "grid.png")
    # 3 prompt columns; 2 models x 2 images per prompt as rows; 32 px upscaled x3 to 96 px
    assert 3 * 96 < grid.width < 3 * 96 + 80
    assert grid.height > 4 * 96 + 3 * 11
    cell = np.asarray(grid.convert("RGB"))
    assert len(np.unique(cell.reshape(-1, 3), axis=0)) > 50  # images, not a blank canvas


def test_samples_use_the_documented_seeds(upstream) -> None:
    """Image j of prompt i is exactly what the pipeline gives with seed eval.seed + i*1000 + j."""
    workdir, manifests = upstream
    config = make_config()
    out = output_dir(workdir, ev.evaluate(config, manifests, str(workdir)))
    prompts = json.loads((out / "metrics.json").read_text())["prompts"]
    pipe = ev.load_trained(config, manifests["train"], str(workdir))
    i, j = 2, 1
    image = pipe(
        prompt=[prompts[i]],
        generator=[torch.Generator().manual_seed(5 + i * 1000 + j)],
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="np",
    ).images
    saved = np.asarray(Image.open(out / f"samples/trained/p{i:03d}-{j}.png"))
    assert np.abs(to_uint8(image)[0].permute(1, 2, 0).numpy().astype(int) - saved).max() <= 1


def test_baseline_is_the_untrained_seeded_unet(upstream) -> None:
    workdir, manifests = upstream
    config = make_config()
    baseline = ev.load_baseline(config, manifests["train"], str(workdir))
    fresh = build_unet(config.model)
    for (name, got), want in zip(
        baseline.unet.state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    assert isinstance(baseline.scheduler, DDIMScheduler)


def test_explicit_prompts_no_baseline_and_few_real_images(upstream) -> None:
    workdir, manifests = upstream
    config = make_config(
        prompts=["a green square"], images_per_prompt=1, baseline=False, scheduler="euler"
    )
    config.eval.fid_samples = 40  # more than the held-out rows: reals run out, prompts cycle
    out = output_dir(workdir, ev.evaluate(config, manifests, str(workdir)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == ["a green square"]
    assert metrics["num_generated"] == 40 and metrics["num_real"] == len(held_out_rows()) < 40
    assert metrics["baseline"] is None and metrics["training_helped"] is None
    assert "eval.baseline" in metrics["training_helped_reason"]
    assert not (out / "samples" / "baseline").exists()
    single = Image.open(out / "grid.png")  # one prompt column, one trained band
    assert single.height < 2 * 96 + 120


def test_fid_prompts_cycle_the_held_out_captions_with_distinct_seeds() -> None:
    jobs = sampling.fid_sample_jobs(["a", "b", "c"], 7, seed=5)
    assert [p for p, _, _ in jobs] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [s for _, s, _ in jobs] == [5, 1005, 2005, 6, 1006, 2006, 7]


def test_every_scheduler_samples(upstream) -> None:
    workdir, manifests = upstream
    for name, cls in sampling.SCHEDULERS.items():
        config = make_config(scheduler=name)
        pipe = ev.load_trained(config, manifests["train"], str(workdir))
        assert isinstance(pipe.scheduler, cls)
        [(batch, images)] = list(sampling.generate(pipe, [("a red circle", 0, None)], config))
        assert images.shape == (1, 3, 32, 32) and images.dtype == torch.uint8
    assert sampling.SCHEDULERS["euler"] is EulerDiscreteScheduler


def test_an_exported_v_prediction_sampler_keeps_its_prediction_type(upstream) -> None:
    """The train stage exports DDIM with the trained prediction type; the eval sampler keeps it."""
    workdir, manifests = upstream
    pipe = StableDiffusionPipeline.from_pretrained(
        output_dir(workdir, manifests["train"]) / "pipeline"
    )
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction"
    )
    build = StageBuild(workdir, "train", "v-fixture")
    build.path.mkdir(parents=True)
    pipe.save_pretrained(build.path / "pipeline")
    train = build.finish(counts={}, files={"pipeline": "pipeline"}, info={"mode": "full"})
    config = make_config(scheduler="euler")
    loaded = ev.load_trained(config, train, str(workdir))
    assert isinstance(loaded.scheduler, EulerDiscreteScheduler)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.beta_start == 0.00085
    [(_, images)] = list(sampling.generate(loaded, [("a red circle", 0, None)], config))
    assert images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("precision", "device", "dtype"),
    [
        ("fp16", "cuda", torch.float16),
        ("bf16", "cuda", torch.bfloat16),
        ("no", "cuda", torch.float32),
        ("fp16", "cpu", torch.float32),
        ("bf16", "cpu", torch.float32),
    ],
)
def test_pipelines_sample_in_the_training_precision_on_a_gpu(precision, device, dtype) -> None:
    assert sampling.pipeline_dtype(precision, torch.device(device)) is dtype


def test_a_cpu_samples_in_float32_whatever_the_training_precision(upstream) -> None:
    workdir, manifests = upstream
    config = make_config()
    config.train.mixed_precision = "bf16"
    pipe = ev.load_trained(config, manifests["train"], str(workdir))
    if pipe.device.type == "cpu":
        assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    else:
        assert pipe.unet.dtype == torch.bfloat16


def test_clip_score_with_a_local_model(upstream, tmp_path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    workdir, manifests = upstream
    tokenizer = CLIPTokenizer.from_pretrained(workdir / manifests["train"]["path"] / "tokenizer")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(tmp_path / "clip")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")

    config = make_config(clip_model=str(tmp_path / "clip"), baseline=False)
    metrics = ev.evaluate(config, manifests, str(workdir))["info"]
    score = metrics["trained"]["clip_score"]
    assert isinstance(score, float)  # its value: test_metrics, against torchmetrics and CLIPModel
    clip = metrics["trained"]["metrics"]["clip_score"]
    assert clip["reason"] is None and clip["num_generated"] == 3 * 2 + 6
    rows = metrics["trained"]["clip_score_per_prompt"]
    assert [r["clip_score"] for r in rows] == sorted(r["clip_score"] for r in rows)  # worst first
    assert [r["prompt"] for r in rows] != [] and {r["prompt"] for r in rows} == set(
        metrics["prompts"]
    )  # the evaluation prompts, each with its grid images and its FID-set images
    fid_captions = [r["caption"] for r in held_out_rows()[:6]]
    for row in rows:
        assert row["num_images"] == 2 * metrics["prompts"].count(
            row["prompt"]
        ) + fid_captions.count(row["prompt"])
    cmmd = metrics["trained"]["metrics"]["cmmd"]
    assert cmmd["reason"] is None and isinstance(cmmd["value"], float)
    assert (cmmd["num_generated"], cmmd["num_real"]) == (6, 6)
    assert cmmd["details"] == {"sigma": 10.0, "scale": 1000.0}


def test_missing_clip_directory_is_a_user_error(upstream, tmp_path) -> None:
    workdir, manifests = upstream
    config = make_config(clip_model=str(tmp_path / "missing-clip"))
    with pytest.raises(UserError, match="eval.clip_model"):
        ev.evaluate(config, manifests, str(workdir))


def test_inception_without_weights_fails_before_sampling(upstream, tmp_path, monkeypatch) -> None:
    from sdflow.evaluation import features

    workdir, manifests = upstream
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(features, "INCEPTION_URL", "http://127.0.0.1:9/weights.pth")
    monkeypatch.setattr(ev, "load_trained", lambda *a: pytest.fail("sampled before the check"))
    with pytest.raises(UserError, match="eval.fid_features"):
        ev.evaluate(make_config(fid_features="inception"), manifests, str(workdir))


def test_no_held_out_samples_is_a_user_error(upstream) -> None:
    workdir, manifests = upstream
    with pytest.raises(UserError, match="eval.held_out_fraction"):
        ev.evaluate(make_config(held_out_fraction=0.0), manifests, str(workdir))


def test_rerun_after_a_crash_keeps_the_finished_model(upstream, monkeypatch) -> None:
    workdir, manifests = upstream
    config = make_config(num_prompts=2, images_per_prompt=1)
    real_score = results.score_model
    calls: list[str] = []

    def crash_once_on_baseline(pipe, sample_dir, *args):
        calls.append(sample_dir.name)
        if calls == ["trained", "baseline"]:
            raise RuntimeError("killed")
        return real_score(pipe, sample_dir, *args)

    monkeypatch.setattr(ev, "score_model", crash_once_on_baseline)
    with pytest.raises(RuntimeError, match="killed"):
        ev.evaluate(config, manifests, str(workdir))
    (saved,) = (workdir / "stages" / "evaluate").glob(".*.partial/scores-trained.json")
    first_attempt = json.loads(saved.read_text())
    manifest = ev.evaluate(config, manifests, str(workdir))
    assert calls == ["trained", "baseline", "baseline"]  # trained was not sampled again
    assert manifest["reused"] is False
    trained = manifest["info"]["trained"]
    assert {k: trained[k] for k in first_attempt} == first_attempt  # its scores were reused
    assert ev.evaluate(config, manifests, str(workdir))["reused"] is True


def test_key_follows_inputs(upstream) -> None:
    _, manifests = upstream
    config = make_config()
    key = ev.evaluate_key(config, manifests)
    assert key == ev.evaluate_key(make_config(), manifests)
    assert key != ev.evaluate_key(make_config(guidance_scale=3.0), manifests)
    resized = config.model_copy(
        update={"download": config.download.model_copy(update={"resolution": 64})}
    )
    assert key != ev.evaluate_key(resized, manifests)
    retrained = {**manifests, "train": {**manifests["train"], "fingerprint": "other"}}
    assert key != ev.evaluate_key(config, retrained)
    recaptioned = {**manifests, "caption": {**manifests["caption"], "fingerprint": "other"}}
    assert key != ev.evaluate_key(config, recaptioned)


def test_lora_is_loaded_on_the_base_model(upstream, tmp_path) -> None:
    """LoRA: trained = base + adapter, baseline = the base model (model.pretrained)."""
    from peft import LoraConfig, get_peft_model_state_dict

    workdir, manifests = upstream
    base = output_dir(workdir, manifests["train"]) / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    build = StageBuild(workdir, "train", "lora-fixture")
    build.path.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(
        build.path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    train = build.finish(counts={}, files={"lora": "lora"}, info={"base_model": str(base)})

    config = make_config(num_prompts=1, images_per_prompt=1)
    data = config.model_dump()
    data["model"].update(init="pretrained", pretrained=str(base))
    data["train"].update(mode="lora")
    config = RunConfig.model_validate(data)
    metrics = ev.evaluate(config, {**manifests, "train": train}, str(workdir))["info"]
    assert "LoRA" in metrics["trained"]["name"] and str(base) in metrics["baseline"]["name"]
    assert metrics["trained"]["fid"] != metrics["baseline"]["fid"]  # the adapter changed the UNet


def test_grid_upscales_with_nearest_and_labels_every_column() -> None:
    from sdflow.evaluation.grids import Block, render_grid

    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    red.putpixel((0, 0), (0, 255, 0))  # one odd pixel: nearest upscaling keeps it a hard block
    blocks = [Block("baseline", [[red], [red]]), Block("trained", [[blue], [blue]])]
    prompts = ["a red square", "a much longer prompt " * 6]
    grid = render_grid(prompts, blocks, ["settings", "trained: x", "baseline: y"]).convert("RGB")
    pixels = np.asarray(grid)
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours
    # the odd pixel became a 6x6 block (16 px x 6 = 96 px cells), without blended edges
    green = np.argwhere((pixels == (0, 255, 0)).all(-1))
    assert len(green) == 2 * 36
    assert grid.height > 2 * 96 and grid.width < 2 * 96 + 200
    # baseline above trained in each prompt's column
    reds, blues = (
        np.argwhere((pixels == (255, 0, 0)).all(-1)),
        np.argwhere((pixels == (0, 0, 255)).all(-1)),
    )
    assert reds[:, 0].max() < blues[:, 0].min()
    # dark text pixels above the first band, over each column: the prompts are drawn
    top = int(reds[:, 0].min())
    for x in (int(green[0][1]), int(green[-1][1])):
        above = pixels[top - 40 : top, x : x + 90]
        assert (above.sum(-1) < 200).any()


def test_baseline_is_scored_once_for_two_trained_models(upstream, monkeypatch) -> None:
    workdir, manifests = upstream
    captions = [r["caption"] for r in caption_rows(30)]
    other = write_train_stage(workdir, make_config(), captions, key="fixture-2", offset=2)
    config = make_config(num_prompts=2, images_per_prompt=1, seed=11)  # a baseline of its own
    loads: list[str] = []
    load_baseline = ev.load_baseline

    def counted(*args):
        loads.append("baseline")
        return load_baseline(*args)

    monkeypatch.setattr(ev, "load_baseline", counted)
    first = ev.evaluate(config, manifests, str(workdir))
    second = ev.evaluate(config, {**manifests, "train": other}, str(workdir))
    assert loads == ["baseline"]  # one pipeline load for two trained models
    assert first["key"] != second["key"]
    a, b = first["info"], second["info"]
    assert a["trained"]["fid"] != b["trained"]["fid"]  # two different trained models ...
    assert a["baseline"] == b["baseline"]  # ... against the same baseline scores
    assert a["baseline"]["fid"] != a["trained"]["fid"]
    key = ev.baseline_key(config, manifests, str(workdir))
    assert key == ev.baseline_key(config, {**manifests, "train": other}, str(workdir))
    assert (workdir / "stages" / "baseline" / key / "scores.json").is_file()
    for manifest in (first, second):  # each evaluate output holds the baseline's grid samples
        samples = output_dir(workdir, manifest) / "samples" / "baseline"
        assert sorted(p.name for p in samples.iterdir()) == ["p000-0.png", "p001-0.png"]
    shared = workdir / "stages" / "baseline" / key / "samples" / "baseline" / "p000-0.png"
    assert shared.read_bytes() == (samples / "p000-0.png").read_bytes()


def test_baseline_key_follows_base_settings_and_reference_set(upstream) -> None:
    workdir, manifests = upstream
    config, train = make_config(), manifests["train"]
    key = ev.baseline_key(config, manifests, str(workdir))
    same = [make_config(checkpoints="all"), make_config(baseline=False)]  # not the baseline's
    assert all(ev.baseline_key(c, manifests, str(workdir)) == key for c in same)
    assert key != ev.baseline_key(make_config(guidance_scale=2.0), manifests, str(workdir))
    assert key != ev.baseline_key(make_config(fid_samples=8), manifests, str(workdir))
    recaptioned = {**manifests, "caption": {**manifests["caption"], "fingerprint": "other"}}
    assert key != ev.baseline_key(config, recaptioned, str(workdir))  # prompts and real images
    reseeded = config.model_copy(
        update={"model": config.model.model_copy(update={"seed": config.model.seed + 7})}
    )
    assert key != ev.baseline_key(reseeded, manifests, str(workdir))  # another scratch UNet
    # another VAE in the trained pipeline: another starting model
    build = StageBuild(workdir, "train", "other-vae")
    shutil.copytree(output_dir(workdir, train) / "pipeline", build.path / "pipeline")
    vae = build.path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-4] + b"\0\0\0\0")
    other = build.finish(counts={}, files={"pipeline": "pipeline"}, info={"mode": "full"})
    assert key != ev.baseline_key(config, {**manifests, "train": other}, str(workdir))


def test_checkpoints_all_scores_every_kept_checkpoint(upstream) -> None:
    """Checkpoint 1 holds the baseline's UNet, 2 and 3 the trained one: their scores must equal
    the baseline's and the trained model's, which are computed on other paths."""
    from sdflow.store.checkpoints import save_checkpoint

    workdir, manifests = upstream
    config = make_config(num_prompts=1, images_per_prompt=1, checkpoints="all", seed=21)
    trained_dir = output_dir(workdir, manifests["train"]) / "pipeline"
    build = StageBuild(workdir, "train", "checkpoints-fixture")
    shutil.copytree(trained_dir, build.path / "pipeline")
    trained = UNet2DConditionModel.from_pretrained(trained_dir / "unet").state_dict()
    weights = {1: build_unet(config.model).state_dict(), 2: trained, 3: trained}
    for step, state in weights.items():
        save_checkpoint(build.path / "checkpoints", step, {"model": state}, keep=5)
    files = {"pipeline": "pipeline", "checkpoints": "checkpoints"}
    train = build.finish(counts={"steps": 3}, files=files, info={"mode": "full"})

    manifest = ev.evaluate(config, {**manifests, "train": train}, str(workdir))
    metrics = manifest["info"]
    rows = metrics["checkpoints"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["fid"] == pytest.approx(metrics["baseline"]["fid"], rel=1e-6)
    assert rows[1]["fid"] == pytest.approx(metrics["trained"]["fid"], rel=1e-6)
    assert rows[1]["recall"] == metrics["trained"]["recall"] and rows[2] == {
        "step": 3,
        **{k: metrics["trained"][k] for k in rows[2] if k != "step"},
    }
    assert metrics["checkpoints_note"] == "scored 3 kept checkpoint(s) of the train stage"
    assert manifest["files"]["metric_curve"] == "metric_curve.png"
    curve = Image.open(output_dir(workdir, manifest) / "metric_curve.png")
    assert curve.width == 640 and curve.height >= 2 * 180  # fid, kid, precision, recall, coverage


def test_checkpoints_all_says_when_checkpoints_are_not_kept(upstream, caplog) -> None:
    workdir, manifests = upstream  # the fixture's train stage kept no checkpoint
    config = make_config(num_prompts=1, images_per_prompt=1, checkpoints="all", baseline=False)
    metrics = ev.evaluate(config, manifests, str(workdir))["info"]
    assert metrics["checkpoints"] == []
    assert "only 0 checkpoint(s) kept" in metrics["checkpoints_note"]
    assert "eval.checkpoints is 'all'" in caplog.text


def test_each_image_goes_through_the_feature_network_once(upstream, monkeypatch) -> None:
    """Six metrics from one pass: 6 real + 6 generated images, not 6 x 12."""
    from sdflow.evaluation.features import FeatureNet

    workdir, manifests = upstream
    seen: list[int] = []
    forward = FeatureNet.__call__

    def counted(self, images):
        seen.append(len(images))
        return forward(self, images)

    monkeypatch.setattr(FeatureNet, "__call__", counted)
    config = make_config(num_prompts=1, images_per_prompt=1, baseline=False, seed=31)
    metrics = ev.evaluate(config, manifests, str(workdir))["info"]
    assert sum(seen) == 6 + 6  # the grid image is CLIP-scored only; no CLIP model here
    for name in ("fid", "kid", "precision", "recall", "density", "coverage"):
        assert metrics["trained"][name] is not None
        assert metrics["trained"]["metrics"][name]["num_generated"] == 6


def test_checkpoints_best_scores_the_best_model_and_final_the_last(upstream) -> None:
    """A keep_best train output: `pipeline/` holds the fixture's trained UNet (best, step 2),
    `final-pipeline/` the untrained one (last, step 3). `best` must score like the fixture's
    trained model, `final` like the baseline; both are computed on other paths."""
    workdir, manifests = upstream
    settings = dict(num_prompts=1, images_per_prompt=1, seed=31)
    reference = ev.evaluate(make_config(**settings), manifests, str(workdir))["info"]
    build = StageBuild(workdir, "train", "keep-best-fixture")
    shutil.copytree(output_dir(workdir, manifests["train"]) / "pipeline", build.path / "pipeline")
    shutil.copytree(build.path / "pipeline", build.path / "final-pipeline")
    untrained = build_unet(make_config().model)
    shutil.rmtree(build.path / "final-pipeline" / "unet")
    untrained.save_pretrained(build.path / "final-pipeline" / "unet")
    files = {"pipeline": "pipeline", "final_pipeline": "final-pipeline"}
    info = {"mode": "full", "validation": {"best_step": 2, "best_loss": 0.1}}
    train = build.finish(counts={"steps": 3}, files=files, info=info)

    scored = {
        choice: ev.evaluate(make_config(**settings, checkpoints=choice), {**manifests, "train": train}, str(workdir))["info"]
        for choice in ("best", "final")
    }  # fmt: skip
    assert scored["best"]["trained_model"] == {"choice": "best", "path": "pipeline", "step": 2}
    assert scored["best"]["trained"]["fid"] == pytest.approx(reference["trained"]["fid"], rel=1e-6)
    assert "best validation loss at step 2 of 3" in scored["best"]["trained"]["name"]
    final = scored["final"]
    assert final["trained_model"] == {"choice": "final", "path": "final-pipeline", "step": 3}
    assert final["trained"]["fid"] == pytest.approx(reference["baseline"]["fid"], rel=1e-6)
    assert reference["trained"]["fid"] != reference["baseline"]["fid"]
    # a train output without a best model, and a config that cannot have one, are refused
    with pytest.raises(UserError, match="has no best model"):
        ev.evaluate(make_config(**settings, checkpoints="best"), manifests, str(workdir))
    with pytest.raises(UserError, match="eval.checkpoints is 'best' but train.keep_best is false"):
        load_profile("tiny-test", ["eval.checkpoints=best"])
