"""Caption stage: training captions from source captions, template or rejection, resume, keys."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

import tasks.caption as caption_stage
from sdflow.config import CaptionConfig, RunConfig
from sdflow.errors import UserError
from sdflow.sources import SAMPLE_SCHEMA
from sdflow.stageio import Manifest, build_stage, read_failures, read_shards
from tasks.caption import CAPTIONERS, caption_key, caption_samples, make_captioner
from tasks.filter import filter_samples

SCHEMA = SAMPLE_SCHEMA  # the download / filter / caption shard schema
LONG = "word " * 20  # 99 chars after clean-up: over max_caption_chars=60


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def sample(sid: str, caption: str | None, color: tuple[int, int, int] = (255, 0, 0)) -> dict:
    return {
        "id": sid,
        "image": png(color),
        "width": 32,
        "height": 32,
        "orig_width": 64,
        "orig_height": 64,
        "content_hash": hashlib.sha256(f"{sid}{color}".encode()).hexdigest(),
        "caption": caption,
        "source": f"/data/{sid}.png",
    }


SHARDS = [
    [
        sample("c0", "  a red   circle\n", (255, 0, 0)),
        sample("c1", None, (0, 255, 0)),
        sample("c2", "cat", (0, 0, 255)),
    ],
    [
        sample("c3", "a blue square", (0, 0, 255)),
        sample("c4", LONG, (255, 255, 0)),
        sample("c5", "a green triangle\ton black", (0, 255, 0)),
    ],
]
CLEAN = {"c0": "a red circle", "c3": "a blue square", "c5": "a green triangle on black"}
SOURCE = {r["id"]: r["caption"] for rows in SHARDS for r in rows}


def make_config(**caption) -> RunConfig:
    return RunConfig(
        source={"kind": "folder", "path": "unused"},
        filter={"min_caption_words": 2, "min_caption_chars": 5, "max_caption_chars": 60},
        caption=caption,
    )


def write_stage(
    workdir: Path, stage: str, shards: list[list[dict]], key: str = "fixture"
) -> Manifest:
    """A finished stage output written through the real stage contract."""

    def work(build):
        names = [
            build.write_shard(i, pa.Table.from_pylist(rows, schema=SCHEMA))
            for i, rows in enumerate(shards)
        ]
        n = sum(len(rows) for rows in shards)
        counts = {"input": n, "kept": n, "failed": 0, "failed_by_reason": {}}
        return build.finish(counts=counts, shards=names, files={"failures": "failures"})

    return build_stage(workdir, stage, key, work)


def output_rows(workdir: Path, manifest: Manifest) -> dict[str, dict]:
    return {r["id"]: r for t in read_shards(workdir, manifest) for r in t.to_pylist()}


def failure_reasons(workdir: Path, manifest: Manifest) -> dict[str, str]:
    return {f["id"]: f["reason"] for f in read_failures(workdir, manifest).to_pylist()}


@pytest.fixture
def filtered(tmp_path: Path) -> Manifest:
    """A filter output that still holds unusable captions (as when the filter kept them)."""
    return write_stage(tmp_path, "filter", SHARDS)


def test_keep_cleans_captions_and_applies_prefix_suffix(tmp_path: Path, filtered: Manifest) -> None:
    config = make_config(prefix="sks, ", suffix=", photo")
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    rows = output_rows(tmp_path, manifest)
    assert {sid: r["caption"] for sid, r in rows.items()} == {
        sid: f"sks, {text}, photo" for sid, text in CLEAN.items()
    }
    assert all(r["source_caption"] == SOURCE[sid] for sid, r in rows.items())
    inputs = {r["id"]: r for shard in SHARDS for r in shard}
    assert all(r["image"] == inputs[sid]["image"] for sid, r in rows.items())
    assert failure_reasons(tmp_path, manifest) == {
        "c1": "missing_caption",
        "c2": "caption_too_short",
        "c4": "caption_too_long",
    }
    counts = manifest["counts"]
    assert counts["input"] == 6 and counts["kept"] == 3 and counts["failed"] == 3
    assert counts["templated"] == 0 and counts["images_per_second"] > 0
    schema = next(read_shards(tmp_path, manifest)).schema
    assert schema.names == [*SCHEMA.names[:8], "source_caption", "source"]


def test_template_fills_unusable_captions(tmp_path: Path, filtered: Manifest) -> None:
    config = make_config(on_missing="template", template="a shape", prefix="sks ")
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    rows = output_rows(tmp_path, manifest)
    expected = {sid: f"sks {t}" for sid, t in CLEAN.items()}
    expected.update({sid: "sks a shape" for sid in ("c1", "c2", "c4")})
    assert {sid: r["caption"] for sid, r in rows.items()} == expected
    assert rows["c1"]["source_caption"] is None and rows["c4"]["source_caption"] == LONG
    assert manifest["counts"]["templated"] == 3 and manifest["counts"]["failed"] == 0
    assert [t.num_rows for t in read_shards(tmp_path, manifest)] == [3, 3]


def test_filter_and_caption_agree_on_the_rules(tmp_path: Path) -> None:
    download = write_stage(tmp_path, "download", SHARDS)
    for on_missing, kept in (("fail", 3), ("template", 6)):
        config = make_config(on_missing=on_missing)
        filtered = filter_samples(config, {"download": download}, str(tmp_path))
        manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
        assert manifest["counts"]["kept"] == kept and manifest["counts"]["failed"] == 0
        assert filtered["counts"]["kept"] == kept


class RecordingCaptioner:
    """A stand-in for a generative backend: sees decoded images, captions some, gives up on one."""

    needs_images = True
    calls: list[tuple[list, list]] = []

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg

    def caption(self, images, existing):
        RecordingCaptioner.calls.append((images, existing))
        return [
            None if image.getpixel((0, 0)) == (0, 255, 0) else f"rgb {image.getpixel((0, 0))}"
            for image in images
        ]


def test_captioner_gets_images_in_batches(
    tmp_path: Path, filtered: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CAPTIONERS, "keep", RecordingCaptioner)
    monkeypatch.setattr(RecordingCaptioner, "calls", [])
    config = make_config(batch_size=2, on_missing="template", template="green thing")
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    calls = RecordingCaptioner.calls
    assert [len(images) for images, _ in calls] == [2, 1, 2, 1]
    assert all(i.mode == "RGB" and i.size == (32, 32) for images, _ in calls for i in images)
    assert [e for _, existing in calls for e in existing] == [
        "a red circle",
        None,
        None,
        "a blue square",
        None,
        "a green triangle on black",
    ]
    captions = {sid: r["caption"] for sid, r in output_rows(tmp_path, manifest).items()}
    assert captions["c0"] == "rgb (255, 0, 0)" and captions["c3"] == "rgb (0, 0, 255)"
    assert captions["c1"] == captions["c5"] == "green thing"
    assert manifest["counts"]["templated"] == 2


def test_resume_keeps_finished_shards(
    tmp_path: Path, filtered: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(on_missing="template")
    real, calls = caption_stage.caption_shard, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(caption_stage, "caption_shard", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        caption_samples(config, {"filter": filtered}, str(tmp_path))
    partial = (
        tmp_path / "stages" / "caption" / f".{caption_key(config, {'filter': filtered})}.partial"
    )
    assert sorted(p.name for p in partial.glob("*.parquet")) == ["shard-00000.parquet"]
    before = (partial / "shard-00000.parquet").stat()

    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    after = (tmp_path / manifest["path"] / "shard-00000.parquet").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(calls) == 3  # shard 0 once, shard 1 crashed then done: shard 0 was not redone
    counts = manifest["counts"]
    assert counts["input"] == 6 and counts["kept"] == 6 and counts["templated"] == 3
    assert len(output_rows(tmp_path, manifest)) == 6


def test_finished_output_is_reused(tmp_path: Path, filtered: Manifest) -> None:
    first = caption_samples(make_config(), {"filter": filtered}, str(tmp_path))
    second = caption_samples(make_config(), {"filter": filtered}, str(tmp_path))
    assert first["reused"] is False and second["reused"] is True


def test_key_follows_caption_section_and_caption_rules(tmp_path: Path, filtered: Manifest) -> None:
    up = {"filter": filtered}
    key = caption_key(make_config(), up)
    for change in ({"prefix": "x "}, {"suffix": " x"}, {"on_missing": "template"}):
        assert caption_key(make_config(**change), up) != key, change
    stricter = make_config()
    stricter.filter.min_caption_words = 3
    assert caption_key(stricter, up) != key
    other_size = make_config()
    other_size.filter.min_size = 100  # reaches the caption stage only through the filter output
    assert caption_key(other_size, up) == key
    other = write_stage(tmp_path, "filter", SHARDS[:1], key="other")
    assert caption_key(make_config(), {"filter": other}) != key


def test_nothing_left_is_a_user_error(tmp_path: Path) -> None:
    upstream = {"filter": write_stage(tmp_path, "filter", [[sample("n0", None)]])}
    with pytest.raises(UserError, match="kept none of the 1 .*missing_caption: 1"):
        caption_samples(make_config(), upstream, str(tmp_path))


def test_unknown_backend_is_a_user_error() -> None:
    with pytest.raises(UserError, match="known backends are keep"):
        make_captioner(CaptionConfig.model_construct(backend="blip"))
