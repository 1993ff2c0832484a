"""Class-images stage: DreamBooth's regularization images, generated once per base and class prompt.

Run it with `sdflow run PROFILE --only class_images` (it runs only with `train.prior_preservation`).
It sits between caption and latents and reads no upstream stage: its key is the base model's
weights (and `model.vae`), the class prompt, the number of images and the generation settings
(`sdflow.training.class_images.generation_settings`), or the content of the images chosen from
`class_images_dir`, plus how they are encoded; never the instance data. So every run with the same
base and class prompt (another subject, other instance images, other training settings) reuses
the same output. Generation is resumable per image: a killed build keeps `images/` and generates
only the missing ones next time. An output encoded otherwise (another `latents` section, or a
trained text encoder's token ids) copies the images of an earlier output generated alike
(`info.generation`) instead of generating them again.

Output: `images/class-XXXXX.png` (generated ones), `latents-XXXXX.safetensors` (the class rows in
the latents stage's format: latent distribution, class-prompt embedding or token ids) and
`empty_prompt.safetensors`; the manifest's `info` is what the train stage's `CachedBatches` reads.
"""

from __future__ import annotations

from sdflow.config import RunConfig
from sdflow.ops.orchestration import stage_task
from sdflow.store.fingerprint import code_version
from sdflow.store.stageio import Manifest, StageBuild, build_stage, stage_key
from sdflow.training.class_images import (
    IMAGES,
    copy_earlier_images,
    encode_class_images,
    encoding_settings,
    folder_images,
    generate_class_images,
    generation_key,
    generation_settings,
    image_name,
    prior_of,
    read_images,
)
from sdflow.training.latent_data import EMPTY_PROMPT


def class_images_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    settings = {"generation": generation_settings(config), "encoding": encoding_settings(config)}
    return stage_key("class_images", settings, [], code_version(__name__))


def make_class_images(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    prior_of(config)  # refused before any work when prior preservation is off
    key = class_images_key(config, upstream)
    return build_stage(workdir, "class_images", key, lambda b: _build(b, config))


class_images_task = stage_task("class_images", class_images_key)(make_class_images)


def _build(build: StageBuild, config: RunConfig) -> Manifest:
    prior = prior_of(config)
    if prior.class_images_dir:
        paths, generated, copied = folder_images(prior), 0, 0
    else:
        copied = copy_earlier_images(config, build.workdir, build.path)
        generated = generate_class_images(config, build.path)
        paths = [build.path / image_name(i) for i in range(prior.num_class_images)]
    shards, rows, info = encode_class_images(config, build.path, read_images(paths))
    info |= {"rows_per_shard": rows, "generated_now": generated, "copied": copied}
    info["generation"] = generation_key(config) if not prior.class_images_dir else None
    files = {"empty_prompt": EMPTY_PROMPT}
    if not prior.class_images_dir:
        files["images"] = IMAGES
    counts = {"class_images": sum(rows), "generated": generated}
    return build.finish(counts=counts, shards=shards, files=files, info=info)
