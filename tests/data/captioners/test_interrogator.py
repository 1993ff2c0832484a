"""clip-interrogator through sdflow: tiny open_clip + tiny BLIP handed in, small term lists, every
mode, no network; the optional extra missing; keys that follow the CLIP model and term lists."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from sdflow.config import CaptionConfig, RunConfig
from sdflow.data.captioners import require_backend
from sdflow.data.captioners.interrogator import (
    TERM_FILES,
    InterrogatorCaptioner,
    import_interrogator,
)
from sdflow.data.captioners.random_init import save_random_open_clip
from sdflow.data.sources import SAMPLE_SCHEMA
from sdflow.errors import UserError
from sdflow.profiles import ConfigError, load_profile
from sdflow.store.stageio import Manifest, build_stage, read_shards
from tasks.caption import caption_key, caption_samples

SOURCE_CAPTION = "a source caption kept in the row"


def interrogator_config(blip: Path, clip: Path, terms: Path, mode: str = "fast") -> dict:
    interrogator = {"mode": mode, "clip_model": str(clip), "data_path": str(terms)}
    return {"backend": "clip-interrogator", "model": str(blip), "max_new_tokens": 3} | {
        "interrogator": interrogator
    }


def write_filtered(workdir: Path, images: list) -> Manifest:
    """A finished filter output: one shard, every other row without a caption."""
    rows = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append(
            {"id": f"i{i}", "image": buf.getvalue(), "width": 32, "height": 32}
            | {"orig_width": 32, "orig_height": 32, "source": f"/data/{i}.png"}
            | {"content_hash": hashlib.sha256(buf.getvalue()).hexdigest()}
            | {"caption": None if i % 2 else SOURCE_CAPTION}
        )

    def work(build):
        name = build.write_shard(0, pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
        counts = {"input": len(rows), "kept": len(rows), "failed": 0, "failed_by_reason": {}}
        return build.finish(counts=counts, shards=[name], files={"failures": "failures"})

    return build_stage(workdir, "filter", "fixture", work)


def terms_of(captioner: InterrogatorCaptioner) -> set[str]:
    ci = captioner.interrogator
    tables = (ci.artists, ci.flavors, ci.mediums, ci.movements, ci.trendings, ci.negative)
    return {label for table in tables for label in table.labels}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_fast_mode_through_the_stage_without_the_network(
    tmp_path: Path,
    tiny_blip: Path,
    tiny_clip: Path,
    term_lists: Path,
    color_images: list,
    caption_words: list[str],
    no_network: list,
) -> None:
    with pytest.raises(OSError, match="offline test"):  # the guard is live
        socket.create_connection(("127.0.0.1", 9))
    no_network.clear()
    filtered = write_filtered(tmp_path, color_images[:4])
    caption = interrogator_config(tiny_blip, tiny_clip, term_lists) | {"policy": "all"}
    config = RunConfig(source={"kind": "folder", "path": "unused"}, caption=caption)
    manifest = caption_samples(config, {"filter": filtered}, str(tmp_path))

    universe = terms_of(InterrogatorCaptioner(config.caption, tmp_path / "cache"))
    rows = [r for t in read_shards(tmp_path, manifest) for r in t.to_pylist()]
    assert len(rows) == 4 and manifest["counts"]["generated"] == 4
    for row in rows:
        base, *terms = row["caption"].split(", ")
        assert len(base.split(" ")) == 3 and set(base.split(" ")) <= set(caption_words)
        assert terms and set(terms) <= universe, row["caption"]
        assert row["source_caption"] == (None if row["id"] in ("i1", "i3") else SOURCE_CAPTION)
    cached = sorted(p.name for p in (tmp_path / "cache" / "clip-interrogator").iterdir())
    assert len(cached) == 6 and all(n.startswith("sdflow-") for n in cached)  # one per table
    assert no_network == []


@pytest.mark.parametrize("mode", ["classic", "best", "negative"])
def test_modes(
    mode: str,
    cache_dir: Path,
    tiny_blip: Path,
    tiny_clip: Path,
    term_lists: Path,
    color_images: list,
    no_network: list,
) -> None:
    cfg = CaptionConfig(**interrogator_config(tiny_blip, tiny_clip, term_lists, mode))
    captioner = InterrogatorCaptioner(cfg, cache_dir)
    (caption,) = captioner.caption(color_images[:1], [None])
    parts = caption.split(", ")
    terms = {name: (term_lists / name).read_text().splitlines() for name in TERM_FILES}
    if mode == "negative":  # terms only: the least similar flavors and negative terms
        assert captioner.blip is None and len(parts) > 1
        assert set(parts) <= set(terms["flavors.txt"]) | set(terms["negative.txt"])
    else:
        base = captioner.blip.caption(color_images[:1], [None])[0]
        assert caption.startswith(f"{base}, ") and len(parts) > 2
        assert captioner.interrogate(color_images[0], None) is None  # BLIP said nothing
    if mode == "classic":  # "caption, <medium> by <artist>, <trending>, <movement>, <flavors>"
        medium, artist = parts[1].split(" by ")
        assert medium.removesuffix(" inspired") in terms["mediums.txt"]
        assert artist in terms["artists.txt"] and parts[3] in terms["movements.txt"]
    if mode == "best":  # a chain of terms from every table
        assert set(parts[1:]) <= terms_of(captioner)
    assert no_network == []


def test_key_follows_the_clip_model_and_the_term_lists(
    tmp_path: Path, tiny_blip: Path, tiny_clip: Path, term_lists: Path, color_images: list
) -> None:
    filtered = write_filtered(tmp_path, color_images[:1])

    def key(clip: Path, terms: Path, mode: str = "fast") -> str:
        caption = interrogator_config(tiny_blip, clip, terms, mode)
        config = RunConfig(source={"kind": "folder", "path": "unused"}, caption=caption)
        return caption_key(config, {"filter": filtered})

    base = key(tiny_clip, term_lists)
    assert key(tiny_clip, term_lists, "classic") != base
    model_cfg = json.loads((tiny_clip / "open_clip_config.json").read_text())["model_cfg"]
    other_clip = save_random_open_clip(tmp_path / "other-clip", model_cfg, seed=1)
    assert key(other_clip, term_lists) != base
    other_terms = tmp_path / "terms"
    shutil.copytree(term_lists, other_terms)
    before = key(tiny_clip, other_terms)
    with (other_terms / "flavors.txt").open("a") as fh:  # the same directory, one term more
        fh.write("dramatic lighting\n")
    assert key(tiny_clip, other_terms) != before


def test_without_the_extra_the_backend_fails_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "clip_interrogator", None)  # as if not installed
    install = r"pip install -e '\.\[caption\]'"
    with pytest.raises(ValidationError, match=install):
        CaptionConfig(backend="clip-interrogator")
    with pytest.raises(ConfigError, match=f"clip_interrogator not installed.*{install}"):
        load_profile("clip-interrogator-fast")  # what `sdflow check` and `sdflow run` load
    cfg = CaptionConfig.model_construct(backend="clip-interrogator")
    with pytest.raises(UserError, match=f"clip_interrogator is not installed.*{install}"):
        require_backend(cfg)  # the caption stage's first line
    with pytest.raises(UserError, match=install):
        import_interrogator()
    CaptionConfig(backend="blip")  # BLIP needs only transformers


def test_bad_clip_models_and_term_lists_are_user_errors(
    tmp_path: Path, tiny_blip: Path, tiny_clip: Path, term_lists: Path
) -> None:
    def build(clip: str, terms: Path) -> None:
        cfg = CaptionConfig(**interrogator_config(tiny_blip, tiny_clip, terms))
        cfg.interrogator.clip_model = clip
        InterrogatorCaptioner(cfg, tmp_path)

    with pytest.raises(UserError, match="neither a local open_clip directory nor"):
        build("not a model name", term_lists)
    with pytest.raises(UserError, match="is not an open_clip model directory"):
        build(str(tmp_path), term_lists)
    partial = tmp_path / "partial-terms"
    partial.mkdir()
    (partial / "flavors.txt").write_text("blurry\n")
    with pytest.raises(UserError, match="lacks artists.txt, mediums.txt, movements.txt, negative"):
        build(str(tiny_clip), partial)
