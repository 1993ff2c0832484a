"""Masked loss and tag shuffling through the data stages: a folder with masks and alpha, downloaded
(max_area), cached in buckets, the masks checked against PIL; the bad masks are failure rows."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import torch
from fixtures.masks import TAGS, masked_folder, reference_mask
from fixtures.stages import GRID, autoencoder_stage, caption_stage
from fixtures.training import sd_scheduler
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.models.components import component_sources
from sdflow.profiles import load_profile
from sdflow.store.stageio import output_dir, read_shards
from sdflow.training.latent_data import CachedLatents, captions_path
from sdflow.training.objective import draw_inputs
from sdflow.training.schedules import CachedBatches, collate
from sdflow.training.tag_shuffle import with_caption_shuffle
from tasks.download import download
from tasks.latents import cache_latents

RESOLUTION = 32
VAE_SCALE = 4  # the tiny-test VAE: three blocks


def test_masks_are_cropped_with_their_image_and_cached_beside_its_latent(tmp_path):
    folder = masked_folder(tmp_path / "images")
    options = [
        f"source.path={folder}",
        "download.resize_mode=max_area",
        GRID,
        "eval.held_out_fraction=0",
        "train.masked_loss=true",
        "train.caption_shuffle=true",
        "train.keep_tokens=1",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.checkpoint_every=2",
    ]
    config = load_profile("tiny-test", options)
    workdir = str(tmp_path / "work")
    downloaded = download(config, {}, workdir)
    failures = pa.concat_tables(
        pa.parquet.read_table(p)
        for p in (output_dir(workdir, downloaded) / "failures").glob("*.parquet")
    ).to_pylist()
    reasons = {f["id"]: f["reason"] for f in failures}
    assert reasons == {"broken.png": "undecodable_mask", "wrong.png": "mask_size"}
    assert "20x20" in next(f["detail"] for f in failures if f["id"] == "wrong.png")
    rows = [r for t in read_shards(workdir, downloaded) for r in t.to_pylist()]
    assert {r["id"]: r["mask"] is None for r in rows} == {
        "alpha.png": False,
        "half.png": False,
        "plain.png": True,  # no mask: every pixel counts
    }

    upstream = {
        "caption": caption_stage(tmp_path / "work", [r | {"source_caption": None} for r in rows]),
        "autoencoder": autoencoder_stage(tmp_path / "work", config.model, seed=0),
    }
    latents = cache_latents(config, upstream, workdir)
    cached = CachedLatents(workdir, latents)
    masks = {cached[i]["id"]: cached[i]["mask"][0].float().numpy() for i in range(len(cached))}
    alpha = Image.open(folder / "alpha.png").getchannel("A")
    expected = {  # bucket by hand: 64x32 -> 45x22 -> 40x24; 40x48 -> 29x35 -> 32x32
        "half.png": reference_mask(Image.open(folder / "half.mask.png"), 32, (40, 24), VAE_SCALE),
        "alpha.png": reference_mask(alpha, RESOLUTION, (32, 32), VAE_SCALE),
        "plain.png": np.ones((8, 8), dtype=np.float32),
    }
    assert masks.keys() == expected.keys()
    for name, mask in masks.items():
        assert mask.shape == expected[name].shape, name
        np.testing.assert_allclose(mask, expected[name], atol=1.5 / 255, err_msg=name)
    half = masks["half.png"]
    assert half[:, :2].min() > 0.99 and half[:, -2:].max() < 0.01  # the left half counts

    # the training shards keep their captions (for the per-step shuffle), in row order
    shard = output_dir(workdir, latents) / latents["shards"][0]
    assert json.loads(captions_path(shard).read_text()) == [TAGS] * len(cached)

    # the train stage's batch source on this cache: captions shuffled and encoded by the run's
    # (scratch) text encoder at each step, the masks in the loss
    sources = component_sources(config, {**upstream, "latents": latents}, workdir)
    source = with_caption_shuffle(
        config, CachedBatches(workdir, latents), sources, torch.device("cpu"), torch.float32
    )
    square = [i for i in range(len(cached)) if cached[i]["id"] != "half.png"]  # one bucket
    batch = collate([source.dataset[i] for i in square])
    assert batch["mask"] is not None
    generator = torch.Generator().manual_seed(0)
    inputs = draw_inputs(sd_scheduler(), source, batch, generator, config.train)
    tokenizer = CLIPTokenizer.from_pretrained(output_dir(workdir, latents) / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(output_dir(workdir, latents) / "text_encoder")
    head, *tail = TAGS.split(", ")
    orders = [", ".join([head, *order]) for order in itertools.permutations(tail)]
    with torch.no_grad():
        ids = tokenizer(orders, padding="max_length", max_length=16, truncation=True)
        candidates = encoder(torch.tensor(ids.input_ids))[0]
    drawn = [
        [i for i, c in enumerate(candidates) if torch.allclose(row, c, atol=1e-5)]
        for row in inputs.text
    ]
    assert all(len(found) == 1 for found in drawn)  # each row: one order of its tags, encoded
    assert any(found != [0] for found in drawn)  # and not only the caption's own order
    assert inputs.mask.shape == (len(square), 1, *inputs.latents.shape[-2:])
