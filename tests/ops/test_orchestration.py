"""The Prefect side of the contract: cached across runs while the output exists, no retry on user errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from prefect import flow

from sdflow.errors import UserError
from sdflow.ops.orchestration import cache_key, stage_task
from sdflow.profiles import load_profile
from sdflow.store.stageio import build_stage, discard_stage, stage_key

CALLS: list[str] = []


def _key(config, upstream) -> str:
    return stage_key("probe", config.filter.model_dump(), list(upstream.values()))


@stage_task("probe", _key, retries=1, retry_delay_seconds=0)
def probe(config, upstream, workdir):
    CALLS.append("probe")

    def work(build):
        name = build.write_shard(0, pa.table({"id": ["a"]}))
        return build.finish(counts={"kept": 1}, shards=[name])

    return build_stage(workdir, "probe", _key(config, upstream), work)


ATTEMPTS: list[int] = []


@stage_task("fails", lambda config, upstream: "k", retries=2, retry_delay_seconds=0)
def fails_for_the_user(config, upstream, workdir):
    ATTEMPTS.append(1)
    raise UserError("no data left after filtering")


@flow(persist_result=True)
def probe_flow(workdir: str, min_size: int):
    config = load_profile("tiny-test", [f"filter.min_size={min_size}"])
    return probe(config, {}, workdir, return_state=True)


def test_cached_across_runs_until_output_is_deleted(prefect_server, tmp_path):
    CALLS.clear()
    first = probe_flow(str(tmp_path), 5)
    assert first.is_completed() and CALLS == ["probe"]
    second = probe_flow(str(tmp_path), 5)  # the fresh output was recorded under its stage key
    assert second.name == "Cached" and CALLS == ["probe"]
    assert second.result()["fingerprint"] == first.result()["fingerprint"]

    config = load_profile("tiny-test", ["filter.min_size=5"])
    discard_stage(tmp_path, "probe", _key(config, {}))
    CALLS.clear()
    fourth = probe_flow(str(tmp_path), 5)
    assert fourth.name != "Cached" and CALLS == ["probe"]
    assert fourth.result()["reused"] is False

    CALLS.clear()
    other = probe_flow(str(tmp_path), 6)  # a config change is a new key
    assert other.name != "Cached" and CALLS == ["probe"]


def test_user_errors_are_not_retried(prefect_server, tmp_path):
    ATTEMPTS.clear()

    @flow
    def failing():
        config = load_profile("tiny-test")
        state = fails_for_the_user(config, {}, str(tmp_path), return_state=True)
        return state.is_failed(), type(state.result(raise_on_failure=False)).__name__

    assert failing() == (True, "UserError")
    assert len(ATTEMPTS) == 1


def test_a_record_is_used_only_for_the_content_on_disk(prefect_server, tmp_path):
    CALLS.clear()
    first = probe_flow(str(tmp_path), 7)
    config = load_profile("tiny-test", ["filter.min_size=7"])
    key = _key(config, {})

    def other_content(build):  # e.g. rebuilt by hand or by another version under the same key
        name = build.write_shard(0, pa.table({"id": ["b", "c"]}))
        return build.finish(counts={"kept": 2}, shards=[name])

    discard_stage(tmp_path, "probe", key)
    rebuilt = build_stage(tmp_path, "probe", key, other_content)
    assert rebuilt["fingerprint"] != first.result()["fingerprint"]

    second = probe_flow(str(tmp_path), 7)
    assert second.name != "Cached"  # the old record describes other content
    assert second.result()["fingerprint"] == rebuilt["fingerprint"]
    third = probe_flow(str(tmp_path), 7)
    assert third.name == "Cached" and third.result()["fingerprint"] == rebuilt["fingerprint"]


def test_cache_records_are_json_not_pickles(prefect_server, tmp_path):
    state = probe_flow(str(tmp_path), 8)
    manifest = state.result()
    name = cache_key("probe", manifest["key"], manifest["fingerprint"])
    record = Path(os.environ["PREFECT_HOME"]) / "storage" / name
    stored = json.loads(record.read_text())
    assert stored["metadata"]["serializer"]["type"] == "sdflow-json"  # sdflow.ops.results
    assert json.loads(stored["result"])["fingerprint"] == manifest["fingerprint"]


@stage_task("train", lambda config, upstream: "k", retries=2, retry_delay_seconds=0)
def failing_stage(config, upstream, workdir):
    ATTEMPTS.append(1)
    raise ERRORS[0]


ERRORS: list[BaseException] = []


@pytest.mark.parametrize(
    ("error", "attempts", "says"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/work/stages/x.tmp"), 1, "disk is full"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/stages"), 1, "/mnt/ro/stages"),
        (PermissionError(errno.EACCES, "Permission denied", "/srv/w"), 1, "permission denied"),
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
            1,
            "train.batch_size",
        ),
        (OSError(errno.EIO, "Input/output error", "/nfs/x"), 3, "Input/output error"),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), 3, "reset by peer"),
    ],
)
def test_only_failures_a_retry_can_fix_are_retried(prefect_server, tmp_path, error, attempts, says):
    ATTEMPTS.clear()
    ERRORS[:] = [error]

    @flow
    def failing():
        config = load_profile("tiny-test")
        state = failing_stage(config, {}, str(tmp_path), return_state=True)
        raised = state.result(raise_on_failure=False)
        return state.is_failed(), isinstance(raised, UserError), str(raised)

    failed, user_error, message = failing()
    assert failed and len(ATTEMPTS) == attempts
    assert user_error == (attempts == 1)
    assert says in message
