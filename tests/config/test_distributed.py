"""The multi-node and sharding keys: bad combinations fail before any work, naming key and value."""

from __future__ import annotations

import pytest

from sdflow.profiles import ConfigError, load_profile

PRETRAINED = ["model.init=pretrained", "model.pretrained=/models/base"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.nodes=9"], "train.nodes is 9 but the local launcher runs at most 8"),
        (
            ["train.nodes=5", "runner.train_launcher=slurm", "runner.slurm={max_nodes: 4}"],
            "train.nodes is 5 but runner.slurm.max_nodes is 4",
        ),
        (
            [*PRETRAINED, "train.mode=lora", "train.sharding=fsdp"],
            "train.sharding is 'fsdp' but train.mode is 'lora': .* saves nothing",
        ),
        (["train.sharding=fsdp", "train.ema=true"], "the EMA copy is not sharded"),
        (["train.sharding=fsdp", "train.fsdp_strategy=hybrid"], "'hybrid' but train.nodes is 1"),
        (["runner.train_launcher=kubernetes"], "runner.kubernetes is not set"),
        (["runner.rendezvous_port=80"], "rendezvous_port"),
    ],
)
def test_impossible_multinode_settings_fail_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny-test", overrides)


def test_a_cluster_launcher_places_more_nodes_than_one_host():
    config = load_profile(
        "tiny-test",
        [
            "train.nodes=16",
            "train.sharding=fsdp",
            "train.fsdp_strategy=hybrid",
            "runner.train_launcher=kubernetes",
            "runner.kubernetes={image: img, workdir_claim: work, max_nodes: 16}",
        ],
    )
    assert (config.train.nodes, config.runner.kubernetes.max_nodes) == (16, 16)
