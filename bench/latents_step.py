"""Images/s of the latents stage (VAE and text encoder over every training image) per option.

    python bench/latents_step.py [--images 320] [--profile tiny-test] [--set K=V ...]

Runs the data stages on the demo images with a tiny pretrained pipeline (as
`bench/train_step.py --vs-reference`), then the latents stage once per variant: float32 (batched,
`latents.batch_size`), `latents.channels_last`, bf16 autocast (`latents.mixed_precision`), and fp16
autocast where CUDA is present. Each variant is another stage key, so each encodes every image;
the figure is the stage's own `images_per_second` (encoding only, no model loading).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from train_step import prepare, tiny_pipeline  # bench/, beside this script

from sdflow.data.sources.demo import make_demo_dataset
from tasks.latents import cache_latents


def variants(cuda: bool) -> dict[str, dict]:
    found = {
        "float32": {},
        "channels_last": {"channels_last": True},
        "bf16 autocast": {"mixed_precision": "bf16"},
    }
    if cuda:
        found["fp16 autocast"] = {"mixed_precision": "fp16"}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--profile", default="tiny-test")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sdflow-bench-latents-"))
    data = make_demo_dataset(workdir / "demo-data", count=args.images, size=32)
    pipeline = tiny_pipeline(data, workdir)
    options = ["model.init=pretrained", f"model.pretrained={pipeline}", *args.overrides]
    config, upstream = prepare(workdir, args.profile, data, options)
    results = {}
    for name, values in variants(torch.cuda.is_available()).items():
        variant = config.model_copy(deep=True)
        for key, value in values.items():
            setattr(variant.latents, key, value)
        manifest = cache_latents(variant, upstream, str(workdir))
        results[name] = round(float(manifest["info"]["images_per_second"]), 1)
        print(f"latents stage, {name}: {results[name]} images/s")
    print(json.dumps({"bench": "latents", "images": args.images, "images_per_second": results}))


if __name__ == "__main__":
    main()
