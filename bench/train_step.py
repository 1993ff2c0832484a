"""Training throughput: sdflow's loop against diffusers' reference script, and cached vs on the fly.

    python bench/train_step.py --vs-reference [--steps 60] [--repeats 3] [--ema] [--cprofile]
        [--reference-script PATH/train_text_to_image.py] [--threads N]
    python bench/train_step.py [--profile tiny-cpu] [--steps 60] [--images 600]

`--vs-reference` builds a tiny pretrained pipeline (the tiny-test architectures, saved with
`save_pipeline`) and the demo images, runs the data stages and the latents stage on them, then
alternates sdflow's train loop (`train_unet`, cached latents, 32 px, batch 16) with
`bench/reference_loop.py` (a minimal equivalent of diffusers'
`examples/text_to_image/train_text_to_image.py`, which encodes every batch with the VAE and text
encoder) for `--repeats` rounds and prints the median steps/s of each and their ratio. With
`--reference-script` the peer is diffusers' own script, given by path (a diffusers checkout's
`examples/text_to_image/train_text_to_image.py`; never copied here), run unmodified in a child
process by `bench/step_timer.py` on the same pipeline folder and images, with the script's own
options set to the same work (32 px, batch 16, the profile's lr, constant, no checkpoints); both
sides are then timed by the same `StepTimer` (step ends at the optimizer step; seconds inside the
UNet's forward and `Accelerator.backward`), which also gives each side's share of the step
outside the UNet's forward and backward. `--threads N` sets torch's threads on both sides (the
script's through OMP_NUM_THREADS): on a machine with other work running, two threads per side
spend much of a step waiting for each other (the script measured 1.2 steps/s with 2 threads and
10.6 with 1, under one other busy process on 2 cores), so compare like with like. sdflow's
figures are steady rates of the whole loop (data, step, logging, progress, checkpoints) from the
end of step `--warmup` to the end of the last step, so one-off costs (first allocations, a
`train.compile` build) stay out of both. `--cprofile` prints the top entries of a cProfile of one
sdflow loop.

Without `--vs-reference`:

Builds the demo dataset, runs the data stages, the autoencoder (briefly) and the latents stage with
the profile's architectures, then trains the same UNet for `--steps` steps twice: from the latents
stage's cache (`train.cache_latents: true`, the default) and encoding every batch with the VAE and
text encoder (`false`). mosaicml/diffusion reports on-the-fly encoding 1.4x slower for SD2 at 512 px;
the ratio grows with the VAE's share of the step.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from diffusers import DDPMScheduler
from reference_loop import reference_step_ends  # bench/, beside this script
from results import comparison, save
from step_timer import StepTimer

from sdflow.data.sources.demo import make_demo_dataset
from sdflow.models.components import build_text_encoder, build_unet, build_vae
from sdflow.models.files import save_pipeline
from sdflow.models.tokenizer import train_tokenizer
from sdflow.profiles import load_profile
from sdflow.training import loop as training
from tasks.autoencoder import train_autoencoder
from tasks.caption import caption_samples
from tasks.download import download
from tasks.filter import filter_samples
from tasks.latents import cache_latents
from tasks.train import train


def prepare(workdir: Path, profile: str, data: Path, overrides: list[str]) -> tuple:
    config = load_profile(profile, [f"source.path={data}", "autoencoder.steps=50", *overrides])
    up: dict = {}
    up["download"] = download(config, {}, str(workdir))
    up["filter"] = filter_samples(config, {"download": up["download"]}, str(workdir))
    up["caption"] = caption_samples(config, {"filter": up["filter"]}, str(workdir))
    up["autoencoder"] = train_autoencoder(config, {"caption": up["caption"]}, str(workdir))
    up["latents"] = cache_latents(
        config, {"caption": up["caption"], "autoencoder": up["autoencoder"]}, str(workdir)
    )
    return config, up


def samples_per_second(config, upstream, workdir: Path, steps: int, cached: bool) -> float:
    config = config.model_copy(deep=True)
    config.train.warmup_steps = 0  # first: each assignment is validated against max_steps
    config.train.max_steps = steps
    config.train.checkpoint_every = steps
    config.train.cache_latents = cached
    manifest = train(
        config, {k: upstream[k] for k in ("caption", "autoencoder", "latents")}, str(workdir)
    )
    return float(manifest["info"]["samples_per_second"])


def tiny_pipeline(data: Path, out: Path) -> Path:
    """The tiny-test architectures as a pretrained pipeline folder, tokenizer trained on `data`."""
    model = load_profile("tiny-test").model
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer([r["caption"] for r in rows], model, out / "tokenizer")
    text_encoder = build_text_encoder(model, len(tokenizer))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    save_pipeline(
        out / "pipeline", build_unet(model), build_vae(model), text_encoder, tokenizer, scheduler
    )
    return out / "pipeline"


def steady_rate(ends: list[float], warmup: int) -> float:
    """Steps per second between the end of step `warmup` and the end of the last step."""
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def sdflow_loop(config, upstream, workdir: Path, run: int, warmup: int, profile: bool) -> float:
    """Steady steps/s of sdflow's whole loop (`fit`: data, step, logging, progress, checkpoint
    cadence), from the end of step `warmup` on, in a fresh train output folder."""
    ends: list[float] = []
    fit, run_step = training.fit, training.run_step

    def timed_step(*args, **kwargs):
        loss = run_step(*args, **kwargs)
        ends.append(time.perf_counter())
        return loss

    def profiled(*args, **kwargs) -> None:
        if not profile:
            return fit(*args, **kwargs)
        profiler = cProfile.Profile()
        profiler.runcall(fit, *args, **kwargs)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    upstream = {k: upstream[k] for k in ("caption", "autoencoder", "latents")}
    with (
        mock.patch.object(training, "fit", profiled),
        mock.patch.object(training, "run_step", timed_step),
    ):
        training.train_unet(config, upstream, str(workdir), workdir / f"sdflow-run-{run}")
    return steady_rate(ends, warmup)


def timed_sdflow(config, upstream, workdir: Path, run: int) -> StepTimer:
    """sdflow's loop under the same `StepTimer` as the reference script."""
    timer = StepTimer()
    upstream = {k: upstream[k] for k in ("caption", "autoencoder", "latents")}
    with timer.patches():
        training.train_unet(config, upstream, str(workdir), workdir / f"sdflow-run-{run}")
    return timer


def timed_script(
    script: Path, pipeline: Path, data: Path, out: Path, args, seed: int, lr: float
) -> StepTimer:
    """diffusers' train_text_to_image.py, unmodified, in a child process under `StepTimer`."""
    options = {
        "pretrained_model_name_or_path": pipeline, "train_data_dir": data,
        "image_column": "image", "caption_column": "caption", "resolution": 32,
        "train_batch_size": 16, "max_train_steps": args.steps, "learning_rate": lr,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "output_dir": out, "seed": seed,
        "dataloader_num_workers": 0, "checkpointing_steps": 10**9, "report_to": "tensorboard",
    }  # fmt: skip
    flags = [f"--{k}={v}" for k, v in options.items()] + ["--center_crop", "--random_flip"]
    flags += ["--use_ema"] if args.ema else []
    times = out.with_suffix(".json")
    timer_script = Path(__file__).with_name("step_timer.py")
    command = [sys.executable, str(timer_script), str(times), str(script), *flags]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return StepTimer(**json.loads(times.read_text()))


def versus_script(args, config, upstream, workdir: Path, pipeline: Path, data: Path) -> dict:
    """Alternate sdflow and the real script `--repeats` times; medians of the steady rates."""
    ours, theirs = [], []
    for run in range(args.repeats):
        ours.append(timed_sdflow(config, upstream, workdir, run).summary(args.warmup))
        script = timed_script(
            args.reference_script, pipeline, data, workdir / f"script-{run}", args, run,
            config.train.lr,
        )  # fmt: skip
        theirs.append(script.summary(args.warmup))
    median = {
        side: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for side, runs in (("sdflow", ours), ("script", theirs))
    }
    ratio = median["sdflow"]["steps_per_second"] / median["script"]["steps_per_second"]
    for side, values in median.items():
        shares = ", ".join(f"{k} {v:.1%}" for k, v in values.items() if k.endswith("share"))
        print(f"{side}: {values['steps_per_second']:.2f} steps/s; {shares}")
    print(f"-> {ratio:.2f}x (medians of {args.repeats} alternated rounds)")
    extra = ", EMA" if args.ema else ""
    row = comparison(
        f"train step vs the real train_text_to_image.py, 32 px, batch 16{extra}, "
        f"median of {args.repeats}", "steps/s", round(median["sdflow"]["steps_per_second"], 2),
        "train_text_to_image.py", round(median["script"]["steps_per_second"], 2), goal=1.0,
    )  # fmt: skip
    result = {"bench": "train_step vs diffusers' script", "steps": args.steps, "ema": args.ema,
              "threads": args.threads or torch.get_num_threads(),
              "rounds": {"sdflow": ours, "script": theirs}, "median": median,
              "ratio": round(ratio, 3)}  # fmt: skip
    save("train-step-script" + ("-ema" if args.ema else ""), "train_step", [row], result)
    return result


def versus_reference(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="sdflow-bench-ref-"))
    data = make_demo_dataset(workdir / "demo-data", count=args.images, size=32)
    pipeline = tiny_pipeline(data, workdir)
    overrides = [
        "model.init=pretrained",
        f"model.pretrained={pipeline}",
        "train.batch_size=16",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=10",
        f"train.ema={str(args.ema).lower()}",
        *args.overrides,
    ]
    config, upstream = prepare(workdir, "tiny-test", data, overrides)
    if args.reference_script:
        return versus_script(args, config, upstream, workdir, pipeline, data)
    ours, theirs = [], []
    for run in range(args.repeats):
        profile = args.cprofile and run == 0
        ours.append(sdflow_loop(config, upstream, workdir, run, args.warmup, profile))
        ends = reference_step_ends(
            pipeline, data, workdir / f"reference-{run}", args.steps, 16, 32, ema=args.ema
        )
        theirs.append(steady_rate(ends, args.warmup))
    result = {
        "bench": "train_step vs diffusers train_text_to_image.py",
        "steps": args.steps,
        "batch_size": 16,
        "resolution": 32,
        "ema": args.ema,
        "overrides": args.overrides,
        "warmup_steps": args.warmup,
        "sdflow_steps_per_second": [round(v, 2) for v in ours],
        "reference_steps_per_second": [round(v, 2) for v in theirs],
        "ratio": round(statistics.median(ours) / statistics.median(theirs), 2),
    }
    print(
        f"sdflow {statistics.median(ours):.1f} steps/s, reference {statistics.median(theirs):.1f} "
        f"steps/s (medians of {args.repeats}) -> {result['ratio']}x"
    )
    extra = ", EMA" if args.ema else ""
    extra += "".join(f", {o}" for o in args.overrides)
    row = comparison(
        f"train step, tiny pipeline, 32 px, batch 16{extra}, median of {args.repeats}",
        "steps/s", round(statistics.median(ours), 2), "train_text_to_image.py",
        round(statistics.median(theirs), 2), goal=1.5,
    )  # fmt: skip
    save("train-step" + ("-ema" if args.ema else ""), "train_step", [row], result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="tiny-cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--vs-reference", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    parser.add_argument("--ema", action="store_true", help="--vs-reference: EMA on in both")
    parser.add_argument("--cprofile", action="store_true", help="--vs-reference: profile sdflow")
    parser.add_argument("--threads", type=int, help="torch threads on both sides")
    parser.add_argument(
        "--reference-script",
        type=Path,
        help="--vs-reference: diffusers' examples/text_to_image/train_text_to_image.py (a path)",
    )
    args = parser.parse_args()
    if args.vs_reference:
        print(json.dumps(versus_reference(args)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="sdflow-bench-train-"))
    data = make_demo_dataset(workdir / "demo-data", count=args.images)
    config, upstream = prepare(workdir, args.profile, data, args.overrides)
    cached = samples_per_second(config, upstream, workdir, args.steps, cached=True)
    on_the_fly = samples_per_second(config, upstream, workdir, args.steps, cached=False)
    result = {
        "profile": args.profile,
        "steps": args.steps,
        "batch_size": config.train.batch_size,
        "cached_samples_per_second": round(cached, 1),
        "on_the_fly_samples_per_second": round(on_the_fly, 1),
        "cached_speedup": round(cached / on_the_fly, 2),
    }
    print(
        f"cached latents: {result['cached_samples_per_second']} samples/s, on the fly: "
        f"{result['on_the_fly_samples_per_second']} samples/s -> {result['cached_speedup']}x"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
