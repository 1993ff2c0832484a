"""Prefect result records as plain JSON: written from plain JSON types only, read without ever
importing what a record names.

Prefect's own `json` serializer encodes any object as `{"__class__": "module.Name", "data": ...}`
and, reading a record back, imports `module` and builds `Name` from `data`: a record file someone
else wrote (a shared workdir, object storage) could make a run import and call any installed code.
sdflow's tasks return manifests and flows return paths as strings, which need nothing of the sort, so
`PLAIN_JSON` writes with the standard library's encoder alone (anything else fails the write, at
once) and refuses, on read, any object with a `__class__` key.

The record's envelope still names its serializer, and Prefect builds that one when it reads the
record: the result storage (`runner.result_storage`, the workdir by default) must be writable only
by whoever may run code as sdflow. This module removes the class-import path of JSON records.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from prefect.serializers import Serializer
from pydantic import Field

CLASS_KEY = "__class__"


class UnsafeRecord(ValueError):
    """A result record that names a class to import."""


class PlainJSONSerializer(Serializer):
    """Prefect serializer `sdflow-json`: the standard library's JSON, plain types both ways."""

    type: Literal["sdflow-json"] = Field(default="sdflow-json", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, allow_nan=False).encode()

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob.decode(), object_hook=_plain_object)


def _plain_object(value: dict[str, Any]) -> dict[str, Any]:
    if CLASS_KEY in value:
        raise UnsafeRecord(
            f"a result record names the class {value[CLASS_KEY]!r}; sdflow stores plain JSON "
            "only and imports nothing a record names. Delete the record (or the run's results "
            "folder) to recompute it."
        )
    return value


PLAIN_JSON = PlainJSONSerializer()
