"""Where each bench leaves its result for `bench/summary.py`, which prints them as one table.

When the environment variable `SDFLOW_BENCH_RESULTS` names a directory (`make bench` sets it), a
bench writes `<dir>/<name>.json` (a name per bench and case, e.g. `download-5000-small-host`):

    {"bench": "download", "rows": [<comparison>, ...], "detail": <the bench's own JSON result>}

A comparison row (built by `comparison`) holds `case`, `unit`, `sdflow`, `peer` (who is compared
against: a peer program, a target figure, an earlier commit), `peer_value`, `higher_is_better`,
`ratio` (how many times faster sdflow is: sdflow / peer for rates, peer / sdflow for seconds) and
`goal` (the least ratio asked for, or null). A row with no peer (`peer_value` null) is a figure of
sdflow's own. Any bench, in any language, can join the table by writing such a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_ENV = "SDFLOW_BENCH_RESULTS"


def comparison(
    case: str,
    unit: str,
    sdflow: float,
    peer: str | None = None,
    peer_value: float | None = None,
    goal: float | None = None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """One row of the summary table; `ratio` > 1 means sdflow is faster (or smaller) than the peer."""
    ratio = None
    if peer_value is not None and sdflow and peer_value:
        ratio = sdflow / peer_value if higher_is_better else peer_value / sdflow
    return {
        "case": case,
        "unit": unit,
        "sdflow": sdflow,
        "peer": peer,
        "peer_value": peer_value,
        "higher_is_better": higher_is_better,
        "ratio": None if ratio is None else round(ratio, 2),
        "goal": goal,
    }


def save(name: str, bench: str, rows: list[dict[str, Any]], detail: Any) -> Path | None:
    """Write `<$SDFLOW_BENCH_RESULTS>/<name>.json`; nothing (None) when the variable is unset."""
    folder = os.environ.get(RESULTS_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": bench, "rows": rows, "detail": detail}, indent=1))
    return path
