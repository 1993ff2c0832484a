"""Caption-backend throughput: BLIP-base batched vs clip-interrogator `fast`, in images/s.

    .venv/bin/python bench/caption.py --images 8                           # CPU smoke run
    .venv/bin/python bench/caption.py --images 512 --batch-size 64 --terms 0   # a GPU, full lists

Both run through sdflow's own captioners (`BlipCaptioner`, `InterrogatorCaptioner`) on randomly
initialised models of the real architectures, saved to a temporary directory first (no hub):
BLIP-base (`BlipConfig()` defaults: ViT-B/16 at 384 px, BERT-base decoder) and, for
clip-interrogator, the same BLIP plus open_clip ViT-L-14 (`pretrained=None`). Random weights make
nonsense captions but the same compute; special tokens are banned from BLIP's output, so every
caption is exactly --tokens long instead of stopping at a random early end token.

Rows: BLIP-base at --batch-size, BLIP-base one image per call (how clip-interrogator captions), and
clip-interrogator fast (batched BLIP captions + per-image CLIP ranking). The term-embedding setup
is timed apart (it is computed once and cached): --terms N keeps the first N terms of each bundled
list (0 = all ~100k flavors; minutes on a GPU, hours on a CPU). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch
from PIL import Image
from transformers import BlipConfig

from sdflow.config import CaptionConfig
from sdflow.data.captioners import select_device, select_dtype
from sdflow.data.captioners.blip import BlipCaptioner
from sdflow.data.captioners.interrogator import TERM_FILES, InterrogatorCaptioner
from sdflow.data.captioners.random_init import save_random_blip, save_random_open_clip

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "man",
    "woman",
    "on",
    "with",
    "in",
    "red",
    "blue",
    "green",
    "white",
    "black",
]


def noise_images(count: int, size: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


def write_terms(out_dir: Path, limit: int) -> Path | None:
    """The first `limit` terms of each bundled clip-interrogator list (None: all of them)."""
    if limit == 0:
        return None
    out_dir.mkdir(parents=True)
    bundled = files("clip_interrogator") / "data"
    for name in TERM_FILES:
        terms = (bundled / name).read_text(encoding="utf-8", errors="replace").splitlines()
        (out_dir / name).write_text("\n".join(terms[:limit]) + "\n")
    return out_dir


def time_captions(captioner, images: list[Image.Image], batch: int) -> float:
    """Images per second over all images, after one warm-up batch."""
    captioner.caption(images[:batch], [None] * min(batch, len(images)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        captions = captioner.caption(chunk, [None] * len(chunk))
        assert all(captions), "a benchmark caption came back empty"
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - started)


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    started = time.perf_counter()
    save_random_blip(work / "blip", BlipConfig(), WORDS, never_end=True)
    print(f"saved random BLIP-base in {time.perf_counter() - started:.1f} s", flush=True)
    images = noise_images(args.images, args.resolution)
    settings = {"model": str(work / "blip"), "max_new_tokens": args.tokens, "dtype": args.dtype}
    blip = BlipCaptioner(CaptionConfig(backend="blip", batch_size=args.batch_size, **settings))
    rows = [
        {"backend": "blip-base", "batch": args.batch_size},
        {"backend": "blip-base", "batch": 1},
    ]
    for row in rows:
        row["images_per_s"] = time_captions(blip, images, row["batch"])
        print(f"{row['backend']} batch {row['batch']}: {row['images_per_s']:.2f} img/s", flush=True)
    if args.skip_interrogator:
        return rows
    del blip
    started = time.perf_counter()
    save_random_open_clip(work / "clip", "ViT-L-14")
    print(f"saved random ViT-L-14 in {time.perf_counter() - started:.1f} s", flush=True)
    terms = write_terms(work / "terms", args.terms)
    interrogator = {"mode": "fast", "clip_model": str(work / "clip")}
    interrogator["data_path"] = str(terms) if terms else None
    cfg = CaptionConfig(backend="clip-interrogator", interrogator=interrogator, **settings)
    started = time.perf_counter()
    captioner = InterrogatorCaptioner(cfg, work / "cache")
    setup = time.perf_counter() - started
    row = {"backend": "clip-interrogator fast", "batch": args.batch_size, "setup_s": setup}
    row["images_per_s"] = time_captions(captioner, images, args.batch_size)
    print(f"clip-interrogator fast: {row['images_per_s']:.2f} img/s (setup {setup:.0f} s)")
    return [*rows, row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20, help="caption length in tokens")
    parser.add_argument("--resolution", type=int, default=512, help="stored image side, px")
    parser.add_argument("--terms", type=int, default=8, help="terms per list; 0 = all")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--skip-interrogator", action="store_true")
    args = parser.parse_args()
    device = select_device()
    dtype = select_dtype(args.dtype, device)
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory(prefix="sdflow-caption-bench-") as tmp:
        rows = run(args, Path(tmp))
    print(f"\n{name}, {dtype}, {args.images} images, {args.tokens}-token captions")
    for row in rows:
        print(f"  {row['backend']:<24} batch {row['batch']:>4}  {row['images_per_s']:8.2f} img/s")
    summary = {**vars(args), "device": name, "dtype": str(dtype), "results": rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
