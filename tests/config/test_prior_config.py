"""`train.prior_preservation` and the DreamBooth caption keys: bad values are refused at load,
naming the key, the value and what to change."""

from __future__ import annotations

import pytest

from sdflow.profiles import ConfigError, load_profile

PRETRAINED = ["model.init=pretrained", "model.pretrained=/nowhere"]
PRIOR = "train.prior_preservation.class_prompt=a photo of a dog"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([PRIOR], "from-scratch model knows nothing"),  # tiny-test is model.init: scratch
        ([*PRETRAINED, PRIOR, "train.prior_preservation.num_class_images=0"], "num_class_images"),
        ([*PRETRAINED, PRIOR, "train.prior_preservation.class_images_dir=/no/such"], "/no/such"),
        ([*PRETRAINED, "train.prior_preservation.num_class_images=5"], "class_prompt"),
        (["caption.trigger=sks"], "has a {trigger} placeholder"),
        (["caption.instance_prompt=a photo of {trigger} dog"], "caption.trigger is unset"),
        (["caption.caption_template=sks"], "has no {caption}"),
        (["caption.caption_template={caption} {who}"], "only {trigger} and {caption}"),
        (
            ["caption.instance_prompt=a dog", "caption.caption_template='{caption}, sks'"],
            "set one",
        ),
    ],
)
def test_bad_prior_settings_are_refused_at_load(options, expected):
    with pytest.raises(ConfigError) as raised:
        load_profile("tiny-test", options)
    assert expected in str(raised.value)


def test_a_good_section_loads_with_its_defaults(tmp_path):
    config = load_profile(
        "tiny-test", [*PRETRAINED, PRIOR, f"train.prior_preservation.class_images_dir={tmp_path}"]
    )
    prior = config.train.prior_preservation
    assert (prior.loss_weight, prior.num_class_images, prior.class_images_dir) == (
        1.0,
        100,
        str(tmp_path),
    )
    assert load_profile("tiny-test").train.prior_preservation is None
