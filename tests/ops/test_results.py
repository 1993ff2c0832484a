"""Prefect result records hold plain JSON and never import what they name (sdflow.ops.results)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.results import resolve_serializer

from sdflow.ops.orchestration import stage_task
from sdflow.ops.results import PLAIN_JSON, UnsafeRecord

MANIFEST = {"stage": "filter", "key": "k", "counts": {"kept": 3}, "shards": ["a"], "info": {}}


@pytest.fixture()
def planted_module(tmp_path, monkeypatch):
    """A module on the path that records being imported: what a hostile record would name."""
    (tmp_path / "planted_by_record.py").write_text(
        "import builtins\nbuiltins.PLANTED_IMPORTED = True\nclass Thing:\n"
        "    def __init__(self, *a, **k): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "planted_by_record"
    sys.modules.pop("planted_by_record", None)
    import builtins

    vars(builtins).pop("PLANTED_IMPORTED", None)


def stage_serializer():
    task = stage_task("filter", lambda *a: "key")(lambda config, upstream, workdir: MANIFEST)
    return resolve_serializer(task.result_serializer)


def test_stage_results_refuse_a_record_that_names_a_class(planted_module):
    import builtins

    blob = json.dumps({"__class__": f"{planted_module}.Thing", "data": {}}).encode()
    with pytest.raises(UnsafeRecord, match="planted_by_record.Thing"):
        stage_serializer().loads(blob)
    assert planted_module not in sys.modules
    assert not hasattr(builtins, "PLANTED_IMPORTED")


def test_stage_results_round_trip_through_a_prefect_record():
    serializer = stage_serializer()
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=serializer), result=MANIFEST)
    back = ResultRecord.deserialize(record.serialize())
    assert back.result == MANIFEST
    assert back.metadata.serializer == PLAIN_JSON  # Prefect found the serializer by its type


def test_a_tampered_record_on_disk_is_refused(planted_module):
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=PLAIN_JSON), result=MANIFEST)
    envelope = json.loads(record.serialize())
    envelope["result"] = json.dumps({"__class__": f"{planted_module}.Thing"})
    with pytest.raises(UnsafeRecord):
        ResultRecord.deserialize(json.dumps(envelope).encode())
    assert planted_module not in sys.modules


def test_only_plain_json_types_are_written():
    with pytest.raises(TypeError):
        PLAIN_JSON.dumps({"output": Path("/tmp/x")})
    with pytest.raises(ValueError):
        PLAIN_JSON.dumps({"loss": float("nan")})
    assert json.loads(PLAIN_JSON.dumps(MANIFEST)) == MANIFEST
