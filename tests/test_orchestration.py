"""The Prefect side of the contract: cached across runs while the output exists, no retry on user errors."""

from __future__ import annotations

import pyarrow as pa
from prefect import flow

from sdflow.errors import UserError
from sdflow.orchestration import stage_task
from sdflow.profiles import load_profile
from sdflow.stageio import build_stage, discard_stage, stage_key

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
