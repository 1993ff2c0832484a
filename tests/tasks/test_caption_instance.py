"""DreamBooth captions in the caption stage: `caption.instance_prompt` captions every image (sets
without captions), `caption.caption_template` puts the trigger into each row's own caption."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fixtures.filtering import png
from fixtures.stages import write_stage

from sdflow.config import RunConfig
from sdflow.store.stageio import read_failures, read_shards
from tasks.caption import caption_samples


def row(sid: str, caption: str | None) -> dict:
    return {
        "id": sid, "image": png((255, 0, 0)), "width": 32, "height": 32, "orig_width": 32,
        "orig_height": 32, "content_hash": hashlib.sha256(sid.encode()).hexdigest(),
        "caption": caption, "source": f"/data/{sid}.png",
    }  # fmt: skip


ROWS = [row("d0", None), row("d1", "a dog on grass"), row("d2", "")]


def captions_of(tmp_path: Path, **caption) -> tuple[dict[str, str], set[str]]:
    config = RunConfig(
        source={"kind": "folder", "path": "unused"},
        filter={"min_caption_words": 2},
        caption=caption,
    )
    filtered = write_stage(tmp_path, "filter", [ROWS])
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    kept = {r["id"]: r["caption"] for t in read_shards(tmp_path, manifest) for r in t.to_pylist()}
    failed = {f["id"] for f in read_failures(tmp_path, manifest).to_pylist()}
    return kept, failed


def test_the_instance_prompt_captions_every_image(tmp_path):
    prompt = "a photo of {trigger} dog"
    kept, failed = captions_of(tmp_path, instance_prompt=prompt, trigger="sks", suffix=", 4k")
    assert kept == {sid: "a photo of sks dog, 4k" for sid in ("d0", "d1", "d2")} and not failed


def test_the_template_puts_the_trigger_into_each_caption(tmp_path):
    kept, failed = captions_of(tmp_path, caption_template="{trigger}, {caption}", trigger="sks")
    assert kept == {"d1": "sks, a dog on grass"} and failed == {"d0", "d2"}
