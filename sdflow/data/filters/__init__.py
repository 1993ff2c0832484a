"""Curation filters of the filter stage, registered by name.

A filter is one function of the filter settings (`FilterConfig`) that returns the batch checks it
configures (none when it is off). A batch check takes the rows that passed every check before it and
returns one verdict per row: None where the row passes, else a `Rejection` whose `reason` names the
filter and whose `detail` holds the measured value. `tasks/filter.py` runs the built-in checks
(decode, size, aspect ratio, caption rules) and then every registered filter, cheapest first,
and records each row's verdict so a later build reuses it (`sdflow.store.reuse`). Checks that need the
whole dataset (exact and near duplicates) run after these, in dataset order, in the stage itself.

Register a filter family in its own module with `@register("name", cost)` and import it below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdflow.config import FilterConfig

Row = dict[str, Any]


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str = ""


Check = Callable[[Row], Rejection | None]
BatchCheck = Callable[[list[Row]], list[Rejection | None]]
Filter = Callable[["FilterConfig"], list[BatchCheck]]

FILTERS: dict[str, tuple[int, Filter]] = {}


def register(name: str, cost: int) -> Callable[[Filter], Filter]:
    """Add a filter family under `name` (unique); cheaper families (lower `cost`) run first."""

    def add(build: Filter) -> Filter:
        if name in FILTERS:
            raise ValueError(f"filter {name!r} is registered twice")
        FILTERS[name] = (cost, build)
        return build

    return add


def per_row(check: Check) -> BatchCheck:
    """A batch check that applies a one-row check to each row."""
    return lambda rows: [check(row) for row in rows]


def configured_checks(cfg: FilterConfig) -> list[BatchCheck]:
    """The batch checks of every registered filter, cheapest family first."""
    ordered = sorted(FILTERS.items(), key=lambda item: (item[1][0], item[0]))
    return [check for _, (_, build) in ordered for check in build(cfg)]


def first_rejections(rows: list[Row], checks: list[BatchCheck]) -> list[Rejection | None]:
    """Each row's first rejection: every check sees only the rows that passed the ones before."""
    verdicts: list[Rejection | None] = [None] * len(rows)
    alive = list(range(len(rows)))
    for check in checks:
        if not alive:
            break
        for index, verdict in zip(alive, check([rows[i] for i in alive]), strict=True):
            verdicts[index] = verdict
        alive = [i for i in alive if verdicts[i] is None]
    return verdicts


from sdflow.data.filters import classifier, clip, metadata  # noqa: E402,F401  (register the families)
