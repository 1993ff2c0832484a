"""Where a run's wall time goes: timestamps of the run's phases, for `bench/startup.py`.

When the environment variable SDFLOW_PHASES names a file, `mark(name)` appends one JSON line
`{"phase": name, "t": <epoch seconds>}` to it; otherwise it does nothing (one dictionary look-up).
`sdflow run` marks: `cli` (the command parsed), `imported` (the flow module loaded), `api` (the
Prefect API chosen and answering), `flow` (the flow body started: Prefect set up the flow run),
`stages` (the last stage returned), `report` (dataset report built and shown), `summary`
(summary.json and its artifact), `returned` (the flow run ended in Prefect). The process's exit
is what the bench itself sees.
"""

from __future__ import annotations

import json
import os
import time

PHASES_ENV = "SDFLOW_PHASES"


def mark(name: str) -> None:
    path = os.environ.get(PHASES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"phase": name, "t": time.time()}) + "\n")
