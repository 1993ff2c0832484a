"""Latents stage: encode every training image (VAE) and caption (text encoder) once, into shards.

Run it with `sdflow run tiny-cpu --only latents`. Held-out samples (`eval.held_out_fraction`) never
enter the training shards: they are cached apart, in `validation/latents-XXXXX.safetensors` (the
same format, plus the captions in the metadata), for the train stage's validation loss and grid.
Each caption shard becomes one or more `latents-XXXXX.safetensors` (at most
`latents.shard_size` rows) holding the latent distribution (`mean`, `std`, and with `latents.flip`
the flipped image's `mean_flip`, `std_flip`) and the caption embedding `text` (SDXL: both
encoders' penultimate states, and the pooled projection `pooled`; see `sdflow.models.families`), with the
row ids in the metadata. `empty_prompt.safetensors` holds the empty caption's embeddings for caption
dropout. With `latents.mixed_precision: fp16` an SDXL VAE whose config sets `force_upcast` encodes
in float32 (an fp16-safe `model.vae` without the flag encodes in fp16).
A run that trains the text encoder (`train.text_encoder` lora or full) caches the captions' token ids
`input_ids` instead (and the empty caption's), since its embeddings change at every step.
With `train.caption_shuffle` every training shard keeps its captions beside it
(`captions-XXXXX.json`) for the per-step shuffle; with `train.masked_loss` every row caches its
mask (`mask`, cropped with its image, at latent size). See docs/tags-and-masks.md.
For scratch models the tokenizer is trained here on the training captions and the (frozen, seeded)
text encoder is built here; both are saved beside the shards for the train and evaluate stages.

Images are resized to cover their bucket and centre-cropped (`sdflow.data.buckets`; with
`latents.buckets: none` one square bucket at `download.resolution`); every row records its
`original_size` and `crop_top_left`, and with buckets its `bucket` (the shard layout is in
`sdflow.training.latent_data`). The manifest's `info.buckets` counts the training samples per bucket.

The stage key holds the weights hashes of the VAE and text encoder, the resolution, the held-out
fraction and this section with its bucket set (and, when the text encoder trains, that token ids
are cached): swapping an encoder, the resolution or the buckets re-encodes, never reuses.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.config import RunConfig
from sdflow.data.buckets import Bucket, bucket_name, bucket_set
from sdflow.errors import UserError
from sdflow.models.components import (
    absolute_source,
    build_text_encoder,
    component_sources,
    load_component,
)
from sdflow.models.families import TextEncoders, family_of
from sdflow.models.files import save_component, weights_hash
from sdflow.models.tokenizer import train_tokenizer
from sdflow.ops.artifacts import report_progress
from sdflow.ops.gpuslots import torch_device
from sdflow.ops.orchestration import stage_task
from sdflow.store.fingerprint import code_version
from sdflow.store.reuse import record_rows, row_keys, shared_memo
from sdflow.store.splits import is_held_out
from sdflow.store.stageio import (
    FAILURES,
    Manifest,
    StageBuild,
    build_stage,
    failures_table,
    read_shards,
    shard_name,
    shard_paths,
    stage_key,
    write_json,
)
from sdflow.training import encoding
from sdflow.training.latent_data import (
    EMPTY_PROMPT,
    ShardRows,
    caption_key,
    captions_path,
    latent_shard_name,
    pack_rows,
    save_tensors,
    write_latent_shard,
)

log = logging.getLogger(__name__)
# per-shard counts and seconds, so a resumed build reports the same numbers; under logs/, which
# holds run history and stays out of the fingerprint (the seconds differ between runs)
STATS = "logs/shards"
TEXT_PARTS = ("tokenizer", "text_encoder")  # a scratch run's, trained and saved by this stage
VALIDATION = "validation/"  # the held-out split's latents shards, for the train stage's validation
# what a row's tensors are computed from (its reuse key); the original size feeds `original_size`
ROW_COLUMNS = ("id", "image", "caption", "orig_width", "orig_height")


def row_columns(config: RunConfig) -> tuple[str, ...]:
    """ROW_COLUMNS, and with `train.masked_loss` the download stage's `mask` (PNG bytes)."""
    return (*ROW_COLUMNS, "mask") if config.train.masked_loss else ROW_COLUMNS


def _encoder_identity(config: RunConfig, upstream: dict[str, Manifest | None]) -> dict[str, Any]:
    """What decides the encoders' outputs: weights hashes, or the scratch config they are built from."""
    model = config.model
    sources = component_sources(config, upstream, workdir=".")
    identity: dict[str, Any] = {"init": model.init, "variant": model.variant}
    if not upstream.get("autoencoder"):  # a trained VAE is covered by the upstream fingerprint
        from_pipeline = model.pretrained and sources.vae == absolute_source(model.pretrained)
        revision = model.revision if from_pipeline else None
        identity["vae"] = weights_hash(sources.vae, sources.vae_subfolder, revision)
    if model.init == "pretrained":  # every text part of the family (SDXL: both encoders)
        for part in family_of(config).text_parts:
            identity[part] = weights_hash(model.pretrained, part, model.revision)
    else:
        identity["scratch_text"] = model.model_dump(
            include={"text_encoder", "tokenizer_vocab_size", "max_token_length", "seed"}
        )
    return identity


def latents_settings(config: RunConfig, upstream: dict[str, Manifest | None]) -> dict[str, Any]:
    settings = {
        "latents": config.latents.model_dump(),
        "resolution": config.download.resolution,
        "held_out_fraction": config.eval.held_out_fraction,
        "encoders": _encoder_identity(config, upstream),
    }
    if caption_key(config.train) == "input_ids":  # embeddings: the key stays as it was
        settings["captions"] = "input_ids"
    for key in ("caption_shuffle", "masked_loss"):  # captions beside the shards; masks in them
        if getattr(config.train, key):
            settings[key] = True
    if config.model.max_sequence_length is not None:  # T5's length (sd3, flux)
        settings["max_sequence_length"] = config.model.max_sequence_length
    if config.model.quantize_text_encoder:  # T5's states from quantized weights
        settings["text_quantize"] = config.model.quantize
    if config.latents.buckets != "none":
        settings["bucket_set"] = bucket_set(config.latents, config.download.resolution)
    return settings


def latents_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    inputs = [upstream.get("caption"), upstream.get("autoencoder")]
    return stage_key("latents", latents_settings(config, upstream), inputs, code_version(__name__))


def rows_salt(config: RunConfig, upstream: dict[str, Manifest | None], build: StageBuild) -> str:
    """What a latents row's key holds besides its id, image and caption: the settings that shape
    the tensors (not how rows are grouped into shards), the trained VAE, and the tokenizer and
    text encoder this build uses (a scratch run's are trained on the captions, so they change
    when captions are added), and the code."""
    settings = latents_settings(config, upstream)
    settings["latents"].pop("shard_size")
    if config.model.init == "scratch":
        settings["built"] = [weights_hash(str(build.path / p), None) for p in TEXT_PARTS]
    return stage_key("latents", settings, [upstream.get("autoencoder")], code_version(__name__))


def cache_latents(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    key = latents_key(config, upstream)
    return build_stage(workdir, "latents", key, lambda b: _build(b, config, upstream, workdir))


cache_latents_task = stage_task("latents", latents_key)(cache_latents)


# ------------------------------------------------------------------------------------------ build


def _build(
    build: StageBuild, config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    caption = upstream.get("caption")
    if not caption:
        raise UserError("The latents stage needs the caption stage's output; run it first.")
    encoders = _load_encoders(build, config, upstream, workdir)
    files = {"empty_prompt": _save_empty_prompt(build, config, encoders), "failures": FAILURES}
    if config.model.init == "scratch":
        files |= {part: part for part in TEXT_PARTS}
    salt = rows_salt(config, upstream, build)
    inputs = held_count = computed = 0
    shards: list[str] = []
    held_out: list[str] = []  # the held-out split's shards, under validation/
    for path in shard_paths(workdir, caption):
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        held = [is_held_out(i, config.eval.held_out_fraction) for i in ids]
        inputs, held_count = inputs + len(ids), held_count + sum(held)
        reader = _TableReader(path, row_columns(config))
        splits = ((_rows(held, False), shards, ""), (_rows(held, True), held_out, VALIDATION))
        for rows, names, folder in splits:
            size = config.latents.shard_size
            for chunk in (rows[a : a + size] for a in range(0, len(rows), size)):
                # numbered in input order, so a rerun finds the same names
                name = f"{folder}{latent_shard_name(len(names))}"
                if not build.has(name):
                    samples = reader.rows(chunk)
                    computed += _encode_shard(build, config, encoders, samples, name, salt)
                names.append(name)
        report_progress("latents", inputs, caption["counts"].get("kept"), "images")
    if held_out:
        files["validation"] = VALIDATION.rstrip("/")
    counts = {"input": inputs, "held_out": held_count}
    counts["validation"] = sum(_read_stats(build, name)["encoded"] for name in held_out)
    manifest_info = {"rows_computed": computed}  # this build; the other rows came from earlier ones
    return _finish(build, config, encoders, shards, counts, files, manifest_info)


def _rows(held: list[bool], value: bool) -> list[int]:
    return [r for r, h in enumerate(held) if h is value]


class _TableReader:
    """A caption shard's rows, read only when a latents shard of it is still missing."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path, self.columns = path, columns
        self.table = None

    def rows(self, rows: list[int]) -> list[dict]:
        if self.table is None:
            self.table = pq.read_table(self.path, columns=[*self.columns, "source"])
        return self.table.take(rows).to_pylist()


def _load_encoders(
    build: StageBuild, config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> encoding.Encoders:
    model = config.model
    family = family_of(config)
    family.check(config)
    sources = component_sources(config, upstream, workdir)
    vae = load_component(sources.vae, sources.vae_subfolder, AutoencoderKL, model)
    if model.init == "scratch":
        tokenizer, text_encoder = _scratch_text(build, config, upstream["caption"], workdir)
        text = TextEncoders([tokenizer], [text_encoder])
    else:
        text = family.load_text(sources, config)
    device = torch_device()
    for module in (vae, *text.encoders):
        module.requires_grad_(False).eval().to(device)
    if config.latents.channels_last:
        vae.to(memory_format=torch.channels_last)
    buckets = bucket_set(config.latents, config.download.resolution)
    encoding.check_patching(config, buckets, vae, family)
    return encoding.Encoders(vae, text, family, device, buckets)


def _scratch_text(
    build: StageBuild, config: RunConfig, caption: Manifest, workdir: str
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """Train the tokenizer on the training captions; build the seeded, frozen text encoder."""
    if not build.has("tokenizer"):
        captions = _training_captions(workdir, caption, config.eval.held_out_fraction)
        train_tokenizer(captions, config.model, build.path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(build.path / "tokenizer")
    if not build.has("text_encoder"):
        save_component(
            build_text_encoder(config.model, len(tokenizer)), build.path / "text_encoder"
        )
    # read back what train/evaluate will load, so the cache is encoded by exactly those weights
    return tokenizer, CLIPTextModel.from_pretrained(build.path / "text_encoder")


def _training_captions(workdir: str, caption: Manifest, fraction: float) -> Iterator[str]:
    for table in read_shards(workdir, caption, columns=["id", "caption"]):
        for sample_id, text in zip(
            table["id"].to_pylist(), table["caption"].to_pylist(), strict=True
        ):
            if not is_held_out(sample_id, fraction):
                yield text or ""


def _save_empty_prompt(build: StageBuild, config: RunConfig, encoders: encoding.Encoders) -> str:
    if not build.has(EMPTY_PROMPT):
        empty = {k: v[0] for k, v in encoding.encode_captions(config, encoders, [""]).items()}
        dtypes = {"text": encoders.family.text_cache_dtype(config)}
        tensors = {k: encoding.to_stored(v, config, dtypes.get(k)) for k, v in empty.items()}
        save_tensors(build.path / EMPTY_PROMPT, tensors, {})
    return EMPTY_PROMPT


# ----------------------------------------------------------------------------------------- encode


def _encode_shard(
    build: StageBuild,
    config: RunConfig,
    encoders: encoding.Encoders,
    samples: list[dict],
    name: str,
    salt: str,
) -> int:
    """Encode one shard's samples, reusing the rows an earlier build encoded (`sdflow.store.reuse`);
    the record, failures and stats first, the shard last (its existence = done). Returns how many
    rows were encoded now. A held-out shard (under validation/), and every shard with
    `train.caption_shuffle`, keeps its captions too.
    """
    started = time.monotonic()
    captions = {s["id"]: s["caption"] or "" for s in samples}
    keys = row_keys([{k: s.get(k) for k in row_columns(config)} for s in samples], salt)
    memo = shared_memo(build.workdir, "latents", build.key)
    outcomes, encoded = memo.outcomes(
        keys,
        lambda todo: encoding.encode_rows(config, encoders, [samples[i] for i in todo]),
        ShardRows,
    )
    kept = [o.row for o in outcomes if o.kept]
    ids = [row["id"] for row in kept]
    failures = [o.row for o in outcomes if not o.kept]
    index = int(name.rsplit("-", 1)[1].split(".")[0])
    failures_name = shard_name(index) if "/" not in name else f"validation-{shard_name(index)}"
    names = (name, f"{FAILURES}/{failures_name}")
    record_rows(build, index, keys, [o.kept for o in outcomes], names=names)
    build.write_table(f"{FAILURES}/{failures_name}", failures_table(failures))
    stats = {
        "encoded": len(ids),
        "buckets": dict(Counter(encoding.bucket_of(row, encoders.buckets) for row in kept)),
        "failed_by_reason": dict(Counter(f["reason"] for f in failures)),
        "seconds": time.monotonic() - started,
    }
    (build.path / STATS / name).parent.mkdir(parents=True, exist_ok=True)
    write_json(build.path / STATS / f"{name}.json", stats)
    tensors = pack_rows([{k: v for k, v in row.items() if k != "id"} for row in kept])
    if name.startswith(VALIDATION) or config.train.caption_shuffle:  # shuffled at every step
        (build.path / name).parent.mkdir(exist_ok=True)
        write_json(captions_path(build.path / name), [captions[i] for i in ids])
    write_latent_shard(build.path / name, tensors, ids)
    log.info(
        "latents %s: %d kept (%d encoded now), %d failed", name, len(ids), encoded, len(failures)
    )
    return encoded


# ----------------------------------------------------------------------------------------- finish


def _finish(
    build: StageBuild,
    config: RunConfig,
    encoders: encoding.Encoders,
    shards: list[str],
    counts: dict[str, int],
    files: dict[str, str],
    extra_info: dict[str, Any],
) -> Manifest:
    stats = [_read_stats(build, name) for name in shards]
    encoded = sum(s["encoded"] for s in stats)
    reasons: Counter[str] = Counter()
    for s in stats:
        reasons.update(s["failed_by_reason"])
    if encoded == 0:
        raise UserError(
            f"No training images to encode: of {counts['input']} captioned samples, "
            f"{counts['held_out']} are held out (eval.held_out_fraction) and the rest failed "
            f"({dict(reasons) or 'none'})."
        )
    seconds = sum(s["seconds"] for s in stats)
    counts |= {
        "encoded": encoded,
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(reasons),
    }
    info = _shape_info(build, config, encoders, shards, stats)
    info["images_per_second"] = round(encoded / seconds, 2) if seconds > 0 else None
    info |= extra_info
    return build.finish(counts=counts, shards=shards, files=files, info=info)


def _shape_info(build, config, encoders, shards, stats) -> dict[str, Any]:
    first = next(name for name, s in zip(shards, stats, strict=True) if s["encoded"])
    with safe_open(str(build.path / first), framework="pt") as fh:
        mean = next(k for k in fh.keys() if k.split("@")[0] == "mean")  # noqa: SIM118
        _, channels, height, _ = fh.get_slice(mean).get_shape()
        if caption_key(config.train) == "text":
            _, seq_len, dim = fh.get_slice("text").get_shape()
        else:
            _, seq_len = fh.get_slice("input_ids").get_shape()
            dim = encoders.text.encoders[0].config.hidden_size
    vae_config = encoders.vae.config
    info = {"captions": "input_ids"} if caption_key(config.train) == "input_ids" else {}
    return info | {
        "family": encoders.family.name,
        "vae_scale_factor": 2 ** (len(vae_config.block_out_channels) - 1),
        "latent_channels": channels,
        # one square side without buckets; with them the sizes are those of `buckets`
        "latent_size": height if config.latents.buckets == "none" else None,
        "text_seq_len": seq_len,
        "text_dim": dim,
        "flip": config.latents.flip,
        "scaling_factor": vae_config.scaling_factor,
        "shift_factor": getattr(vae_config, "shift_factor", None),
        "dtype": config.latents.dtype,
        "resolution": config.download.resolution,
        "rows_per_shard": [s["encoded"] for s in stats],
        "buckets": _bucket_counts(encoders.buckets, stats),
    }


def _bucket_counts(buckets: list[Bucket], stats: list[dict[str, Any]]) -> dict[str, int]:
    """Training samples per bucket, every bucket of the set listed (0 where none landed)."""
    counts = Counter({bucket_name(b): 0 for b in buckets})
    for s in stats:
        counts.update(s.get("buckets", {}))
    return dict(counts)


def _read_stats(build: StageBuild, name: str) -> dict[str, Any]:
    return json.loads((build.path / STATS / f"{name}.json").read_text())
