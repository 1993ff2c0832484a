"""Every hub load reads the commit the stage key names (sdflow.models.hub.pinned), offline from a
fake cache: datasets, captioner, classifier, CLIP and the evaluation's base model."""

from __future__ import annotations

import pytest
from fixtures.hub import cache_download

from sdflow.errors import UserError

A = "a" * 40


class Loaded(Exception):
    """Raised by a stand-in loader once it has seen its arguments."""


def recorder(seen: list[dict]):
    def load(*args, **kwargs):
        seen.append(kwargs)
        raise Loaded

    return load


def test_a_hub_dataset_is_loaded_at_its_commit_and_never_at_main(hub_cache, monkeypatch):
    import datasets

    from sdflow.config import SourceConfig
    from sdflow.data.sources import hf

    seen: list[dict] = []
    monkeypatch.setattr(datasets, "load_dataset", recorder(seen))
    source = SourceConfig(kind="hf", path="org/pictures", revision="v1")
    with pytest.raises(UserError, match="'org/pictures' at revision 'v1' cannot be resolved"):
        hf.fingerprint(source)  # was "hub:org/pictures@v1": a moving name as a key
    with pytest.raises(UserError, match="cannot be resolved"):
        hf.load(source)
    assert seen == []
    cache_download(hub_cache, "org/pictures", "v1", A, "dataset")
    assert hf.fingerprint(source) == f"hub:org/pictures@{A}"
    with pytest.raises(Loaded):
        hf.load(source)
    assert seen[0]["revision"] == A


def test_the_captioner_loads_its_commit(hub_cache, monkeypatch):
    from sdflow.config import CaptionConfig
    from sdflow.data.captioners import blip

    seen: list[dict] = []
    monkeypatch.setattr(blip.AutoConfig, "from_pretrained", recorder(seen))
    cache_download(hub_cache, "org/blip", "v2", A)
    cfg = CaptionConfig(backend="blip", model="org/blip", revision="v2")
    with pytest.raises(Loaded):
        blip.load_blip(cfg, None, None)
    assert seen == [{"revision": A}]


def test_the_classifier_loads_its_commit(hub_cache, monkeypatch):
    import transformers

    from sdflow.data.filters import classifier

    seen: list[dict] = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recorder(seen))
    monkeypatch.setattr(transformers, "pipeline", recorder(seen))
    cache_download(hub_cache, "org/nsfw", "main", A)
    with pytest.raises(Loaded):
        classifier._config_labels("org/nsfw", f"hub:org/nsfw@{A}")
    with pytest.raises(Loaded):
        classifier.load_classifier.__wrapped__("org/nsfw", "cpu")
    assert [kwargs["revision"] for kwargs in seen] == [A, A]


def test_clip_and_the_base_model_load_their_commits(hub_cache, monkeypatch):
    import transformers

    from sdflow.evaluation import sampling
    from sdflow.models import clip
    from sdflow.profiles import load_profile

    seen: list[dict] = []
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", recorder(seen))
    cache_download(hub_cache, "org/clip", "main", A)
    cache_download(hub_cache, "org/base", "v3", "b" * 40)
    with pytest.raises(Loaded):
        clip.load_clip("org/clip")

    class Family:
        pipeline_class = type("Pipe", (), {"from_pretrained": staticmethod(recorder(seen))})

        def load_kwargs(self):
            return {}

    monkeypatch.setattr(sampling, "family_of", lambda config: Family())
    config = load_profile(
        "tiny-test", ["model.init=pretrained", "model.pretrained=org/base", "model.revision=v3"]
    )
    with pytest.raises(Loaded):
        sampling.load_base(config, {"info": {}})
    assert [kwargs["revision"] for kwargs in seen] == [A, "b" * 40]


def test_the_base_scheduler_config_is_read_at_its_commit(hub_cache, monkeypatch):
    from diffusers import DDPMScheduler

    from sdflow.models import schedulers
    from sdflow.profiles import load_profile

    seen: list[dict] = []
    monkeypatch.setattr(schedulers, "load_component", lambda *a, **k: None)
    monkeypatch.setattr(DDPMScheduler, "load_config", recorder(seen))
    cache_download(hub_cache, "org/base", "v3", "b" * 40)
    config = load_profile(
        "tiny-test", ["model.init=pretrained", "model.pretrained=org/base", "model.revision=v3"]
    )
    sources = type("Sources", (), {"scheduler": "org/base"})()
    with pytest.raises(Loaded):
        schedulers.base_scheduler_config(config, sources)
    assert seen == [{"subfolder": "scheduler", "revision": "b" * 40}]
