"""Caption stage: source captions, policies, a tiny BLIP through the stage, template or
rejection, token limit, resume (also after kill -9), keys that follow the captioner's model."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.stages import crash_on_second_call, fresh_fingerprint, write_stage
from PIL import Image

import tasks.caption as caption_stage
from sdflow.config import CaptionConfig, ModelConfig, RunConfig
from sdflow.data.captioners.random_init import save_random_blip, tiny_blip_config
from sdflow.data.sources import SAMPLE_SCHEMA
from sdflow.errors import UserError
from sdflow.models.tokenizer import train_tokenizer
from sdflow.store.stageio import Manifest, read_failures, read_shards
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


def make_config(model_section: dict | None = None, **caption) -> RunConfig:
    if not caption.get("model", "").startswith("/"):  # the default BLIP is a hub name: pin it,
        caption.setdefault("revision", "0" * 40)  # as tests run offline (see tests/test_hub.py)
    return RunConfig(
        source={"kind": "folder", "path": "unused"},
        filter={"min_caption_words": 2, "min_caption_chars": 5, "max_caption_chars": 60},
        caption=caption,
        model=model_section or {},
    )


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
    assert counts["templated"] == 0
    schema = next(read_shards(tmp_path, manifest)).schema
    assert schema.names == [*SCHEMA.names[:8], "source_caption", *SCHEMA.names[8:]]


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


def test_boilerplate_is_stripped_before_the_rules(tmp_path: Path) -> None:
    rows = [
        sample("b0", "arafed man sitting on a bench, stock photo"),
        sample("b1", "IMG_1234.JPG DSC0042.png"),  # file names for a caption: nothing left
        sample("b2", "there is a cat on a mat"),
    ]
    upstream = {"filter": write_stage(tmp_path, "filter", [rows])}
    config = make_config(on_missing="template", template="a photo")
    captions = {
        sid: (r["caption"], r["source_caption"])
        for sid, r in output_rows(
            tmp_path, caption_samples(config, upstream, str(tmp_path))
        ).items()
    }
    assert captions == {
        "b0": ("man sitting on a bench", rows[0]["caption"]),
        "b1": ("a photo", "IMG_1234.JPG DSC0042.png"),
        "b2": ("a cat on a mat", rows[2]["caption"]),
    }
    kept_as_is = caption_samples(make_config(boilerplate=[]), upstream, str(tmp_path))
    assert output_rows(tmp_path, kept_as_is)["b1"]["caption"] == "IMG_1234.JPG DSC0042.png"


class RecordingCaptioner:
    """A stand-in for a generative backend: sees decoded images, captions some, gives up on one."""

    needs_images = True
    calls: list[tuple[list, list]] = []

    def __init__(self, cfg: CaptionConfig, cache_dir: Path):
        self.cfg = cfg

    def caption(self, images, existing):
        RecordingCaptioner.calls.append((images, existing))
        return [
            None if image.getpixel((0, 0)) == (0, 255, 0) else f"rgb {image.getpixel((0, 0))}"
            for image in images
        ]


RED, BLUE, YELLOW = "rgb (255, 0, 0)", "rgb (0, 0, 255)", "rgb (255, 255, 0)"
POLICIES = {  # policy -> (images per captioner call, training captions); green gets no caption
    "missing": (
        [2, 1],
        {"c0": "a red circle", "c1": "green", "c2": BLUE, "c3": "a blue square", "c4": YELLOW}
        | {"c5": "a green triangle on black"},
    ),
    "all": (
        [2, 1, 2, 1],
        {"c0": RED, "c1": "green", "c2": BLUE, "c3": BLUE, "c4": YELLOW}
        | {"c5": "a green triangle on black"},  # nothing generated: the usable source stays
    ),
    "append": (
        [2, 1, 2, 1],
        {"c0": f"a red circle; {RED}", "c1": "green", "c2": BLUE, "c3": f"a blue square; {BLUE}"}
        | {"c4": YELLOW, "c5": "a green triangle on black"},
    ),
}


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_decides_which_rows_are_captioned_and_how(
    tmp_path: Path, filtered: Manifest, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    monkeypatch.setitem(CAPTIONERS, "blip", RecordingCaptioner)
    monkeypatch.setattr(RecordingCaptioner, "calls", [])
    config = make_config(
        backend="blip", policy=policy, batch_size=2, on_missing="template", template="green"
    )
    config.caption.separator = "; "
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    sizes, expected = POLICIES[policy]
    calls = RecordingCaptioner.calls
    assert [len(images) for images, _ in calls] == sizes
    assert all(i.mode == "RGB" and i.size == (32, 32) for images, _ in calls for i in images)
    if policy == "missing":  # only rows without a usable caption, so no source caption to pass
        assert [e for _, existing in calls for e in existing] == [None, None, None]
    else:
        assert [e for _, existing in calls for e in existing] == [
            CLEAN.get(f"c{i}") for i in range(6)
        ]
    rows = output_rows(tmp_path, manifest)
    assert {sid: r["caption"] for sid, r in rows.items()} == expected
    assert all(r["source_caption"] == SOURCE[sid] for sid, r in rows.items())
    assert manifest["counts"]["templated"] == 1 and manifest["info"]["policy"] == policy
    assert manifest["counts"]["generated"] == sum(len(i) for i, _ in calls) - sizes.count(1)


def test_no_generated_caption_is_a_failure_with_its_reason(
    tmp_path: Path, filtered: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CAPTIONERS, "blip", RecordingCaptioner)
    manifest = caption_samples(make_config(backend="blip"), {"filter": filtered}, str(tmp_path))
    assert failure_reasons(tmp_path, manifest) == {"c1": "no_caption_generated"}  # green
    assert manifest["counts"]["kept"] == 5


# --- a real (tiny, random) BLIP through the stage --------------------------------------------

WORDS = ["a", "photograph", "of", "zebra", "quartz", "violet", "ember", "lagoon", "maple"]


def blip_words(caption: str) -> list[str]:
    """The caption's words, all of which must come from the tiny BLIP's vocabulary."""
    words = caption.split(" ")
    assert set(words) <= set(WORDS), caption
    return words


def save_blip(path: Path, seed: int = 0) -> Path:
    return save_random_blip(path, tiny_blip_config(len(WORDS) + 6), WORDS, seed=seed)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_blip(tmp_path_factory.mktemp("blip") / "model")


def test_blip_captions_the_rows_without_a_usable_caption(
    tmp_path: Path, filtered: Manifest, tiny_blip: Path
) -> None:
    config = make_config(backend="blip", model=str(tiny_blip), batch_size=2, max_new_tokens=4)
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    rows = output_rows(tmp_path, manifest)
    assert {sid: rows[sid]["caption"] for sid in CLEAN} == CLEAN
    for sid in ("c1", "c2", "c4"):
        assert len(blip_words(rows[sid]["caption"])) == 4
        assert rows[sid]["source_caption"] == SOURCE[sid]
    counts = manifest["counts"]
    assert counts["generated"] == 3 and counts["kept"] == 6 and counts["failed"] == 0
    assert manifest["info"]["model"] == str(tiny_blip)

    prompted = make_config(
        backend="blip", policy="all", model=str(tiny_blip), prompt="a photograph of", num_beams=2
    )
    rows = output_rows(tmp_path, caption_samples(prompted, {"filter": filtered}, str(tmp_path)))
    assert all(r["caption"].startswith("a photograph of ") for r in rows.values())
    assert all(blip_words(r["caption"]) for r in rows.values())


def test_blip_append_keeps_the_source_caption_first(
    tmp_path: Path, filtered: Manifest, tiny_blip: Path
) -> None:
    config = make_config(backend="blip", policy="append", model=str(tiny_blip), max_new_tokens=3)
    rows = output_rows(tmp_path, caption_samples(config, {"filter": filtered}, str(tmp_path)))
    for sid, row in rows.items():
        source, _, generated = row["caption"].rpartition(", ")
        assert source == CLEAN.get(sid, "") and len(blip_words(generated)) == 3


def test_another_caption_model_recaptions_and_nothing_upstream_reruns(
    tmp_path: Path, tiny_blip: Path
) -> None:
    download = write_stage(tmp_path, "download", SHARDS)
    first_config = make_config(backend="blip", policy="all", model=str(tiny_blip))
    filtered = filter_samples(first_config, {"download": download}, str(tmp_path))
    first = caption_samples(first_config, {"filter": filtered}, str(tmp_path))

    other = save_blip(tmp_path / "other-blip", seed=1)
    config = make_config(backend="blip", policy="all", model=str(other))
    refiltered = filter_samples(config, {"download": download}, str(tmp_path))
    assert refiltered["reused"] is True and refiltered["path"] == filtered["path"]
    second = caption_samples(config, {"filter": refiltered}, str(tmp_path))
    assert second["reused"] is False and second["path"] != first["path"]
    before, after = output_rows(tmp_path, first), output_rows(tmp_path, second)
    assert any(before[sid]["caption"] != after[sid]["caption"] for sid in before)

    # the same directory with new weights is another model too: its content hash is in the key
    key = caption_key(config, {"filter": filtered})
    shutil.rmtree(other)
    save_blip(other, seed=2)
    assert caption_key(config, {"filter": filtered}) != key


KILLED_CHILD = """
import json, os, signal, sys
import tasks.caption as stage
from sdflow.data.captioners.blip import BlipCaptioner
from sdflow.config import RunConfig

real, calls = BlipCaptioner.caption, []

def caption_then_die(self, images, existing):
    calls.append(len(images))
    if len(calls) == 5:  # shard 1's second image: shard 0 is done, shard 1 half captioned
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, images, existing)

BlipCaptioner.caption = caption_then_die
config = RunConfig.model_validate_json(sys.argv[1])
stage.caption_samples(config, {"filter": json.loads(sys.argv[2])}, sys.argv[3])
"""


@pytest.mark.slow
def test_kill_9_mid_stage_keeps_finished_shards(
    tmp_path: Path, filtered: Manifest, tiny_blip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(backend="blip", policy="all", model=str(tiny_blip), batch_size=1)
    args = [config.model_dump_json(), json.dumps(filtered), str(tmp_path)]
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, *args], cwd=Path(__file__).parents[2], check=False
    )
    assert child.returncode == -signal.SIGKILL
    key = caption_key(config, {"filter": filtered})
    partial = tmp_path / "stages" / "caption" / f".{key}.partial"
    assert sorted(p.name for p in partial.glob("*.parquet")) == ["shard-00000.parquet"]
    before = (partial / "shard-00000.parquet").stat()

    real, shards = caption_stage.caption_outcomes, []
    monkeypatch.setattr(
        caption_stage, "caption_outcomes", lambda table, *a: shards.append(1) or real(table, *a)
    )
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))
    after = (tmp_path / manifest["path"] / "shard-00000.parquet").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(shards) == 1  # only shard 1 was captioned again
    assert manifest["counts"]["generated"] == 6 and manifest["counts"]["kept"] == 6
    assert all(blip_words(r["caption"]) for r in output_rows(tmp_path, manifest).values())


def test_resume_keeps_finished_shards(
    tmp_path: Path, filtered: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(on_missing="template")
    calls = crash_on_second_call(monkeypatch, caption_stage, "caption_outcomes")
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
    assert manifest["info"]["shards_timed"] == 1  # shard 1 alone ran in this build
    assert 0 < manifest["info"]["shard_busy_seconds"] <= manifest["seconds"]
    rebuild = lambda: caption_samples(config, {"filter": filtered}, str(tmp_path))  # noqa: E731
    assert fresh_fingerprint(tmp_path, manifest, rebuild) == manifest["fingerprint"]


def test_finished_output_is_reused(tmp_path: Path, filtered: Manifest) -> None:
    first = caption_samples(make_config(), {"filter": filtered}, str(tmp_path))
    second = caption_samples(make_config(), {"filter": filtered}, str(tmp_path))
    assert first["reused"] is False and second["reused"] is True


# --- token limit ------------------------------------------------------------------------------


def test_max_tokens_counts_clip_pieces_when_the_tokenizer_is_not_trained_yet(
    tmp_path: Path, filtered: Manifest
) -> None:
    config = make_config(prefix="sks, ", max_tokens=4, on_missing="template", template="a shape")
    rows = output_rows(tmp_path, caption_samples(config, {"filter": filtered}, str(tmp_path)))
    # pieces: "sks" "," "a" "red" | "circle": the cut is at a word, prefix and suffix kept
    assert rows["c0"]["caption"] == "sks, a red"
    assert rows["c5"]["caption"] == "sks, a green" and rows["c1"]["caption"] == "sks, a shape"
    with pytest.raises(UserError, match="prefix and caption.suffix alone take 4 tokens"):
        caption_samples(
            make_config(prefix="a b c d ", max_tokens=4), {"filter": filtered}, str(tmp_path)
        )


def test_max_tokens_uses_the_pretrained_tokenizer(tmp_path: Path, filtered: Manifest) -> None:
    pipeline = tmp_path / "pipeline"
    tokenizer = train_tokenizer(
        ["a red circle", "a blue square", "a green triangle on black"],
        ModelConfig(tokenizer_vocab_size=600),
        pipeline / "tokenizer",
    )
    pretrained = {"init": "pretrained", "pretrained": str(pipeline)}
    config = make_config(pretrained, max_tokens=6, on_missing="template")
    rows = output_rows(tmp_path, caption_samples(config, {"filter": filtered}, str(tmp_path)))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    for sid, full in CLEAN.items():  # the longest cut at a word that fits
        caption = rows[sid]["caption"]
        assert full.startswith(caption) and count(caption) <= 6
        longer = full.split(" ")[: len(caption.split(" ")) + 1]
        assert caption == full or count(" ".join(longer)) > 6
    assert rows["c5"]["caption"] != "a green triangle on"  # 4 pieces, but more BPE tokens
    key = caption_key(config, {"filter": filtered})
    train_tokenizer(["other captions entirely"], ModelConfig(), pipeline / "tokenizer")
    assert caption_key(config, {"filter": filtered}) != key


# --- keys and errors --------------------------------------------------------------------------


def test_key_follows_caption_section_and_caption_rules(tmp_path: Path, filtered: Manifest) -> None:
    up = {"filter": filtered}
    key = caption_key(make_config(), up)
    changes = (
        {"prefix": "x "},
        {"suffix": " x"},
        {"on_missing": "template"},
        {"backend": "blip"},
        {"max_tokens": 70},
        {"boilerplate": []},
    )
    for change in changes:
        assert caption_key(make_config(**change), up) != key, change
    blip = caption_key(make_config(backend="blip"), up)
    assert caption_key(make_config(backend="blip", revision="abc123" * 6 + "abcd"), up) != blip
    assert caption_key(make_config(backend="blip", policy="all"), up) != blip
    stricter = make_config()
    stricter.filter.min_caption_words = 3
    assert caption_key(stricter, up) != key
    other_size = make_config()
    other_size.filter.min_size = 100  # reaches the caption stage only through the filter output
    assert caption_key(other_size, up) == key
    other = write_stage(tmp_path, "filter", SHARDS[:1], key="other")
    assert caption_key(make_config(), {"filter": other}) != key


def test_a_missing_model_directory_is_a_user_error(tmp_path: Path, filtered: Manifest) -> None:
    config = make_config(backend="blip", model=str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="no-such-model does not exist"):
        caption_samples(config, {"filter": filtered}, str(tmp_path))


def test_policies_need_a_generative_backend() -> None:
    with pytest.raises(ValueError, match="policy 'all' needs a generative backend"):
        make_config(policy="all")


def test_nothing_left_is_a_user_error(tmp_path: Path) -> None:
    upstream = {"filter": write_stage(tmp_path, "filter", [[sample("n0", None)]])}
    with pytest.raises(UserError, match="kept none of the 1 .*missing_caption: 1"):
        caption_samples(make_config(), upstream, str(tmp_path))


def test_unknown_backend_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="known backends are blip, clip-interrogator, keep"):
        make_captioner(CaptionConfig.model_construct(backend="nope"), tmp_path)


# --- incremental: only new or changed rows are captioned ---------------------------------------


def test_a_grown_dataset_captions_only_its_new_and_changed_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CAPTIONERS, "blip", RecordingCaptioner)
    monkeypatch.setattr(RecordingCaptioner, "calls", [])
    config = make_config(backend="blip", policy="all", batch_size=2, on_missing="template")
    nightly = tmp_path / "nightly"
    first = write_stage(nightly, "filter", SHARDS, key="night-1")
    caption_samples(config, {"filter": first}, str(nightly))
    assert sum(len(images) for images, _ in RecordingCaptioner.calls) == 6

    grown = [list(SHARDS[0]), [*SHARDS[1], sample("c6", "a new row", (9, 9, 9))]]
    grown[0][2] = sample("c2", "cat", (1, 2, 3))  # same id and caption, other image bytes
    second = write_stage(nightly, "filter", grown, key="night-2")
    RecordingCaptioner.calls.clear()
    incremental = caption_samples(config, {"filter": second}, str(nightly))
    asked = [image.getpixel((0, 0)) for images, _ in RecordingCaptioner.calls for image in images]
    assert asked == [(1, 2, 3), (9, 9, 9)]  # the edited image and the new row, nothing else

    scratch = tmp_path / "scratch"
    fresh = caption_samples(
        config, {"filter": write_stage(scratch, "filter", grown, key="night-2")}, str(scratch)
    )
    assert incremental["key"] == fresh["key"] and incremental["counts"] == fresh["counts"]
    assert incremental["fingerprint"] == fresh["fingerprint"]  # byte for byte the same output

    narrowed = [grown[0][:2], grown[1]]  # a stricter filter upstream dropped c2
    RecordingCaptioner.calls.clear()
    third = caption_samples(
        config, {"filter": write_stage(nightly, "filter", narrowed, "n3")}, str(nightly)
    )
    assert RecordingCaptioner.calls == [] and third["info"]["rows_computed"] == 0
    assert third["counts"]["input"] == 6
