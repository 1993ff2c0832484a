"""What `train.caption_shuffle` costs: the cache and the step, against N cached shuffles per caption.

    python bench/tag_shuffle.py [--profile tiny-test] [--images 200] [--steps 40] [--shuffles 8]

Builds the demo images with tag-style captions (each caption's words as comma-separated tags),
runs the data stages and the latents stage twice (caption_shuffle off, on), then times training
steps (draws, caption encoding, UNet forward and backward, AdamW) from each cache in one process,
`--steps` of each in turn for `--repeats` rounds (interleaved, so a busy machine slows both alike),
and reports the median steps/s of each (one torch thread).

sdflow's way (the captions kept beside the shards, the frozen text encoder run on the
shuffled caption at every step) costs the encoder's forward pass per step and a few bytes of JSON
per row. The alternative, N shuffles encoded once per caption and one picked per step, costs no
step time (a lookup, as the plain cache) but N x the cached text tensors (`text`, and `pooled`
where the family has one) per row, and N text-encoder passes per row in the latents stage. Its
figures are computed from the measured per-row bytes of the plain cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from train_step import prepare  # bench/, beside this script

from sdflow.data.sources.demo import make_demo_dataset
from sdflow.models.components import build_unet, component_sources
from sdflow.store.stageio import output_dir
from sdflow.training.objective import diffusion_loss
from sdflow.training.schedules import CachedBatches, collate
from sdflow.training.tag_shuffle import with_caption_shuffle
from tasks.latents import cache_latents


def tag_captions(data: Path) -> None:
    """Each demo caption as tags: "a red circle" -> "a, red, circle" (a .txt beside each image)."""
    for line in (data / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        tags = ", ".join(row["caption"].split())
        (data / row["file_name"]).with_suffix(".txt").write_text(tags)


def cache_bytes(workdir: Path, manifest: dict) -> dict[str, float]:
    """Per training row: bytes of the shards, of their text tensors, of the caption sidecars."""
    base = output_dir(workdir, manifest)
    rows = sum(manifest["info"]["rows_per_shard"])
    shards = [base / name for name in manifest["shards"]]
    text = 0
    for path in shards:
        with safe_open(str(path), framework="pt") as fh:
            for key in ("text", "pooled"):
                if key in fh.keys():  # noqa: SIM118
                    text += fh.get_tensor(key).nbytes
    sidecars = sum(p.stat().st_size for p in base.glob("captions-*.json"))
    return {
        "shard_bytes_per_row": sum(p.stat().st_size for p in shards) / rows,
        "text_bytes_per_row": text / rows,
        "caption_json_bytes_per_row": sidecars / rows,
    }


def step_rates(runs: dict, workdir: Path, args) -> dict[str, float]:
    """Median steps/s of each run's training step (one thread), the runs' rounds interleaved."""
    torch.set_num_threads(1)
    sources, unets, optimizers, generator = {}, {}, {}, torch.Generator().manual_seed(0)
    for name, (config, upstream) in runs.items():
        cached = CachedBatches(str(workdir), upstream["latents"])
        parts = component_sources(config, upstream, str(workdir))
        sources[name] = with_caption_shuffle(config, cached, parts, torch.device("cpu"), None)
        unets[name] = build_unet(config.model).train()
        optimizers[name] = torch.optim.AdamW(unets[name].parameters(), lr=1e-4)
    scheduler = DDPMScheduler()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (config, _) in runs.items():
            source = sources[name]
            order = source.order(0, 16)
            started = time.perf_counter()
            for step in range(args.steps):
                batch = collate([source.dataset[i] for i in order.batch(step)])
                loss = diffusion_loss(
                    unets[name], scheduler, source, batch, generator, config.train, "cpu"
                )
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad()
            rates[name].append(args.steps / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="tiny-test")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and run")
    parser.add_argument("--shuffles", type=int, default=8, help="N of the alternative")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of --steps each")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sdflow-bench-tags-"))
    data = make_demo_dataset(workdir / "demo-data", count=args.images, size=32)
    tag_captions(data)
    plain, upstream = prepare(workdir, args.profile, data, ["train.batch_size=16"])
    shuffled = plain.model_copy(deep=True)
    shuffled.train.caption_shuffle = True
    inputs = {"caption": upstream["caption"], "autoencoder": upstream["autoencoder"]}
    shuffled_up = {**inputs, "latents": cache_latents(shuffled, inputs, str(workdir))}
    sizes = cache_bytes(workdir, upstream["latents"])
    shuffled_sizes = cache_bytes(workdir, shuffled_up["latents"])
    rates = step_rates(
        {"plain": (plain, upstream), "shuffle": (shuffled, shuffled_up)}, workdir, args
    )
    extra = (args.shuffles - 1) * sizes["text_bytes_per_row"]
    result = {
        "profile": args.profile,
        "images": args.images,
        "steps": args.steps,
        "batch_size": 16,
        "repeats": args.repeats,
        "plain_steps_per_second": round(rates["plain"], 2),
        "shuffle_steps_per_second": round(rates["shuffle"], 2),
        "step_time_ratio": round(rates["plain"] / rates["shuffle"], 2),
        "plain_cache_bytes_per_row": round(sizes["shard_bytes_per_row"]),
        "shuffle_cache_bytes_per_row": round(
            shuffled_sizes["shard_bytes_per_row"] + shuffled_sizes["caption_json_bytes_per_row"]
        ),
        "text_bytes_per_row": round(sizes["text_bytes_per_row"]),
        f"n{args.shuffles}_cache_bytes_per_row": round(sizes["shard_bytes_per_row"] + extra),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
