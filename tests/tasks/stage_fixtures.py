"""Finished stage outputs for stage tests, written through the real stage contract."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from sdflow.sources import SAMPLE_SCHEMA
from sdflow.stageio import Manifest, build_stage, discard_stage


def write_stage(
    workdir: Path, stage: str, shards: list[list[dict]], key: str = "fixture"
) -> Manifest:
    """A finished data-stage output (download / filter / caption shard schema), nothing failed."""

    def work(build):
        names = [
            build.write_shard(i, pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
            for i, rows in enumerate(shards)
        ]
        n = sum(len(rows) for rows in shards)
        counts = {"input": n, "kept": n, "failed": 0, "failed_by_reason": {}}
        return build.finish(counts=counts, shards=names, files={"failures": "failures"})

    return build_stage(workdir, stage, key, work)


def fresh_fingerprint(workdir: str | Path, manifest: Manifest, rebuild) -> str:
    """The fingerprint of the same stage output built again from nothing (for resume tests).

    Removes `manifest`'s output and calls `rebuild()`; the stage key is unchanged, so the new build
    starts over in an empty partial directory.
    """
    discard_stage(workdir, manifest["stage"], manifest["key"])
    fresh = rebuild()
    assert fresh["reused"] is False
    return fresh["fingerprint"]


def crash_on_second_call(monkeypatch, module, name: str) -> list[int]:
    """Patch `module.name` so its second call raises RuntimeError("killed") (a stage dying in its
    second shard); returns the list that counts the calls."""
    real, calls = getattr(module, name), []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crash_on_second)
    return calls


def crash_at_checkpoint(monkeypatch, step: int):
    """Patch `sdflow.training.save_checkpoint` so saving the checkpoint of `step` raises
    OSError("node lost") (a training process dying there); returns `undo`, which restores it."""
    import sdflow.training as training

    real = training.save_checkpoint

    def crash(root, at, state, keep):
        if at == step:
            raise OSError("node lost")
        return real(root, at, state, keep)

    monkeypatch.setattr(training, "save_checkpoint", crash)
    return lambda: monkeypatch.setattr(training, "save_checkpoint", real)
