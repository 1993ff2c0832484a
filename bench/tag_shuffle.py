"""What `train.caption_shuffle` costs: the cache and the step, against N cached shuffles per caption.

    python bench/tag_shuffle.py [--profile tiny-test] [--images 200] [--steps 40] [--shuffles 8]

Builds the demo images with tag-style captions (each caption's words as comma-separated tags),
runs the data stages and the latents stage twice (caption_shuffle off, on), then trains `--steps`
steps from each cache and reports the steady steps/s of the loop (as `bench/train_step.py`).

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
import tempfile
from pathlib import Path

from safetensors import safe_open
from train_step import prepare, sdflow_loop  # bench/, beside this script

from sdflow.data.sources.demo import make_demo_dataset
from sdflow.store.stageio import output_dir
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="tiny-test")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shuffles", type=int, default=8, help="N of the alternative")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sdflow-bench-tags-"))
    data = make_demo_dataset(workdir / "demo-data", count=args.images, size=32)
    tag_captions(data)
    steps = [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}"]
    plain, upstream = prepare(workdir, args.profile, data, ["train.batch_size=16", *steps])
    shuffled = plain.model_copy(deep=True)
    shuffled.train.caption_shuffle = True
    inputs = {"caption": upstream["caption"], "autoencoder": upstream["autoencoder"]}
    shuffled_up = {**inputs, "latents": cache_latents(shuffled, inputs, str(workdir))}
    sizes = cache_bytes(workdir, upstream["latents"])
    shuffled_sizes = cache_bytes(workdir, shuffled_up["latents"])
    rates = {
        name: sdflow_loop(config, ups, workdir, run, args.warmup, False)
        for run, (name, config, ups) in enumerate(
            [("plain", plain, upstream), ("shuffle", shuffled, shuffled_up)]
        )
    }
    extra = (args.shuffles - 1) * sizes["text_bytes_per_row"]
    result = {
        "profile": args.profile,
        "images": args.images,
        "steps": args.steps,
        "batch_size": 16,
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
