"""The `subsets` section: bad input fails before any work naming key, value and what is allowed;
a subset's data stages see its own source and caption settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdflow.cli import main
from sdflow.config.subsets import subset_plan, subset_view
from sdflow.profiles import ConfigError, load_profile
from tasks.caption import caption_key
from tasks.download import download_key


def subsets(*items: str) -> list[str]:
    return ["source=null", f"subsets=[{', '.join(items)}]"]


@pytest.fixture()
def two(tmp_path) -> tuple[Path, Path]:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / name / "one.png")
    return tmp_path / "a", tmp_path / "b"


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["{name: a, source: {path: A}, repeats: 0}"], r"subsets.0.repeats = 0: .*greater than"),
        (["{name: a, source: {path: A}, weight: 0}"], r"subsets.0.weight = 0: .*greater than"),
        (
            ["{name: a, source: {path: A}}", "{name: a, source: {path: B}}"],
            r"duplicate name\(s\) \['a'\]; allowed: unique names",
        ),
        (
            ["{name: a, source: {path: A}, repeats: 2, weight: 1}"],
            r"subset 'a' sets repeats \(2\) and weight \(1.0\); allowed: one of them",
        ),
        (
            ["{name: a, source: {path: A}, weight: 2}", "{name: b, source: {path: B}}"],
            r"\['a'\] set a weight but \['b'\] do not",
        ),
        (["{name: 'a b', source: {path: A}}"], r"subsets.0.name = 'a b'"),
        (["{name: a, source: {path: A}, caption: {backend: blip}}"], r"caption.backend: unknown"),
    ],
)
def test_bad_subsets_fail_with_key_value_and_what_is_allowed(two, items, message):
    a, b = two
    items = [i.replace("A}", f"{a}}}").replace("B}", f"{b}}}") for i in items]
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny-test", subsets(*items))


def test_a_missing_subset_folder_stops_the_run_before_any_work(two, tmp_path, capsys):
    """Like `source.path`, checked when a run starts (a profile names its data before it exists)."""
    missing = tmp_path / "missing"
    items = [
        f"{{name: a, source: {{path: {two[0]}}}}}",
        f"{{name: b, source: {{path: {missing}}}}}",
    ]
    sets = [x for item in subsets(*items) for x in ("--set", item)]
    assert main(["run", "tiny-test", "--workdir", str(tmp_path / "work"), *sets]) == 2
    assert f"subsets[b].source.path '{missing}' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "work" / "stages").exists()


def test_source_and_subsets_together_or_neither_are_refused(two):
    with pytest.raises(ConfigError, match="source and subsets are both set"):
        load_profile("tiny-test", [f"subsets=[{{name: a, source: {{path: {two[0]}}}}}]"])
    with pytest.raises(ConfigError, match="source: required, but missing"):
        load_profile("tiny-test", ["source=null"])


def test_a_subset_sees_its_own_source_and_captions(two, tmp_path):
    a, b = two
    config = load_profile(
        "tiny-test",
        subsets(
            f"{{name: a, source: {{path: {a}}}, repeats: 3}}",
            f"{{name: b, source: {{path: {b}, limit: 5}}, caption: {{prefix: 'sks, '}}}}",
        ),
    )
    first, second = (subset_view(config, s) for s in config.subsets)
    assert (first.source.path, second.source.limit) == (str(a), 5)
    assert (first.caption.prefix, second.caption.prefix) == ("", "sks, ")
    assert second.caption.template == config.caption.template  # the profile's where unset
    # the same keys as a one-source profile with these settings: a subset shares its cache
    alone = load_profile(
        "tiny-test", [f"source.path={b}", "source.limit=5", "caption.prefix='sks, '"]
    )
    assert download_key(second, {}) == download_key(alone, {})
    upstream = {"filter": {"fingerprint": "f"}}
    assert caption_key(second, upstream) == caption_key(alone, upstream)
    assert caption_key(first, upstream) != caption_key(second, upstream)
    plan = subset_plan(config)
    assert (plan.names, plan.repeats, plan.weights) == (("a", "b"), (3, 1), None)
