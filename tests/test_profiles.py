"""Profiles load onto the one config; every bad value is reported with its key, value and what is allowed."""

from __future__ import annotations

import pytest

from sdflow.config import RunConfig
from sdflow.profiles import ConfigError, load_profile, profile_names


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_loads(name):
    config = load_profile(name)
    assert isinstance(config, RunConfig)
    assert config.description, f"profile {name} needs a one-line description"


def test_the_required_profiles_exist():
    assert {"tiny-cpu", "tiny-test"} <= set(profile_names())


def test_overrides_are_typed_by_the_schema():
    config = load_profile("tiny-test", ["train.lr=1e-5", "download.allow_private_network=false"])
    assert config.train.lr == pytest.approx(1e-5)
    assert config.download.allow_private_network is False


def test_all_problems_are_listed_at_once():
    with pytest.raises(ConfigError) as excinfo:
        load_profile(
            "tiny-test",
            [
                "train.lr=-1",
                "trian.steps=3",
                "download.resize_mode=stretch",
                "train.batch_size=abc",
            ],
        )
    message = str(excinfo.value)
    assert "4 problem(s)" in message
    assert "train.lr = -1" in message and "greater than 0" in message
    assert "trian: unknown key" in message and "allowed keys here: description, source" in message
    assert "download.resize_mode = 'stretch'" in message and "'center_crop'" in message
    assert "train.batch_size = 'abc'" in message


def test_unknown_nested_key_names_the_allowed_ones():
    with pytest.raises(
        ConfigError, match=r"train.learning_rate: unknown key .*allowed keys here: .*lr"
    ):
        load_profile("tiny-test", ["train.learning_rate=0.1"])


def test_impossible_combinations_fail():
    with pytest.raises(ConfigError, match="LoRA adapts a model"):
        load_profile("tiny-test", ["train.mode=lora"])
    with pytest.raises(ConfigError, match="model.pretrained is not set"):
        load_profile("tiny-test", ["model.init=pretrained"])


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="Known profiles: .*tiny-cpu"):
        load_profile("no-such-profile")


def test_profile_from_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "description: mine\nsource: {kind: folder, path: /data}\nfilter: {min_size: 7}\n"
    )
    config = load_profile(str(path))
    assert config.filter.min_size == 7
    assert config.source.path == "/data"


def test_malformed_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(str(path))


def test_a_warmup_the_schedule_would_drop_is_refused():
    # diffusers' `constant` schedule ignores num_warmup_steps
    with pytest.raises(ConfigError) as excinfo:
        load_profile("tiny-test", ["train.lr_scheduler=constant", "train.warmup_steps=5"])
    message = str(excinfo.value)
    assert "train.lr_scheduler 'constant' has no warmup" in message
    assert "train.warmup_steps is 5" in message and "constant_with_warmup" in message
    config = load_profile(
        "tiny-test", ["train.lr_scheduler=constant_with_warmup", "train.warmup_steps=5"]
    )
    assert (config.train.lr_scheduler, config.train.warmup_steps) == ("constant_with_warmup", 5)
    with pytest.raises(ConfigError, match="train.lr_scheduler = 'step'.*'cosine_with_restarts'"):
        load_profile("tiny-test", ["train.lr_scheduler=step"])
    with pytest.raises(ConfigError, match=r"'polynomial' decays to 1e-07, so train.lr \(1e-08\)"):
        load_profile("tiny-test", ["train.lr_scheduler=polynomial", "train.lr=1e-8"])


@pytest.mark.parametrize(
    "address",
    ["tls://10.0.0.5:8786", "tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786",
     "127.0.0.2:8786"],
)  # fmt: skip
def test_dask_on_tls_or_loopback_is_accepted(address):
    config = load_profile(
        "tiny-test", ["runner.task_runner=dask", f"runner.dask_address={address}"]
    )
    assert config.runner.dask_address == address


@pytest.mark.parametrize(
    "address", ["tcp://10.0.0.5:8786", "10.0.0.5:8786", "tcp://scheduler.internal:8786",
                "ws://0.0.0.0:8786", "tcp://127.0.0.1.evil.example:8786"],
)  # fmt: skip
def test_dask_on_the_network_needs_an_explicit_allow(address):
    overrides = ["runner.task_runner=dask", f"runner.dask_address={address}"]
    with pytest.raises(ConfigError) as excinfo:
        load_profile("tiny-test", overrides)
    message = str(excinfo.value)
    assert f"runner.dask_address = {address!r}" in message
    assert "tls://HOST:PORT" in message and "runner.allow_insecure_dask: true" in message
    allowed = load_profile("tiny-test", [*overrides, "runner.allow_insecure_dask=true"])
    assert allowed.runner.dask_address == address


def test_finetune_demo_prompts_fit_the_demo_tokenizer_uncut(tmp_path):
    """The fine-tune demo's new words are spelled in bytes by the tokenizer tiny-cpu trains on the
    demo captions; every prompt of its grid and caption of its data must fit tiny-cpu's context,
    uncut, with no special token inside (at 16 tokens "a purple cross ..." lost its last word)."""
    from itertools import product

    from sdflow.data.sources.demo import BACKGROUNDS, COLORS, FINETUNE_EXTRAS, SHAPES, demo_caption
    from sdflow.models.tokenizer import train_tokenizer

    demo = load_profile("tiny-cpu")
    captions = [demo_caption(c, s, b) for s, c, b in product(SHAPES, COLORS, BACKGROUNDS)]
    tokenizer = train_tokenizer(captions * 10, demo.model, tmp_path / "tokenizer")
    colours = [*COLORS, *FINETUNE_EXTRAS["extra_colors"]]
    shapes = [*SHAPES, *FINETUNE_EXTRAS["extra_shapes"]]
    new = [demo_caption(c, s, b) for s, c, b in product(shapes, colours, BACKGROUNDS)]
    prompts = load_profile("tiny-cpu-finetune").eval.prompts
    assert any("purple cross" in p for p in prompts) and any("red circle" in p for p in prompts)
    longest = 0
    for text in [*new, *prompts]:
        ids = tokenizer(text).input_ids
        longest = max(longest, len(ids))
        inner = ids[1:-1]
        assert tokenizer.decode(inner) == text, text
        assert not set(inner) & set(tokenizer.all_special_ids), text
    assert 16 < longest <= demo.model.max_token_length


def test_an_override_indexes_a_list_of_subsets(tmp_path):
    (tmp_path / "chars").mkdir()
    config = load_profile("character-lora", [f"subsets.0.source.path={tmp_path / 'chars'}"])
    assert config.subsets[0].source.path == str(tmp_path / "chars")
    assert config.subsets[0].repeats == 10  # the entry's other keys stay
    with pytest.raises(ConfigError, match="'1' is not an index of a list of 1 entries"):
        load_profile("character-lora", ["subsets.1.repeats=2"])
