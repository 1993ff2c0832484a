"""Thresholds on the source's metadata columns (LAION `similarity`, `pwatermark`, `punsafe`, ...).

`filter.metadata: {similarity: {min: 0.28}, punsafe: {max: 0.5}}` reads the shards' `metadata` JSON
column. A value below `min` or above `max` is rejected as `metadata:<field>`; a row without the field
(or without a numeric value for it) is kept or rejected as `metadata_missing:<field>` by
`filter.metadata_missing`.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from sdflow.data.filters import BatchCheck, Rejection, Row, per_row, register

if TYPE_CHECKING:
    from sdflow.config import FilterConfig


@register("metadata", cost=0)
def metadata_filter(cfg: FilterConfig) -> list[BatchCheck]:
    if not cfg.metadata:
        return []
    return [per_row(lambda row: check_metadata(row, cfg))]


def check_metadata(row: Row, cfg: FilterConfig) -> Rejection | None:
    """The first configured field (in key order) that is out of bounds or missing."""
    fields = _fields(row.get("metadata"))
    for name in sorted(cfg.metadata):
        bounds = cfg.metadata[name]
        value = _number(fields.get(name))
        if value is None:
            if cfg.metadata_missing == "reject":
                shown = "absent" if name not in fields else f"not a number: {fields[name]!r}"
                return Rejection(f"metadata_missing:{name}", shown[:300])
            continue
        if bounds.min is not None and value < bounds.min:
            return Rejection(f"metadata:{name}", f"{name}={value:g} < min {bounds.min:g}")
        if bounds.max is not None and value > bounds.max:
            return Rejection(f"metadata:{name}", f"{name}={value:g} > max {bounds.max:g}")
    return None


def _fields(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        fields = json.loads(text)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _number(value: Any) -> float | None:
    """A finite int or float (JSON numbers; numeric strings too); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None
