"""One table of every bench's ratios against its peers, from the results the benches left.

    .venv/bin/python bench/summary.py [DIR]      # DIR: $SDFLOW_BENCH_RESULTS, else bench-results

Reads `DIR/*.json` (the convention in `bench/results.py`), in name order, and prints a Markdown
table: bench, case, sdflow's figure, the peer's, the ratio (> 1: sdflow faster), the goal and
whether the ratio meets it. Exits 1 when DIR holds no results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from results import RESULTS_ENV  # bench/, beside this script

HEADER = ("bench", "case", "sdflow", "peer", "ratio", "goal", "met")


def load(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """(bench, row) for every comparison row of every result file, files in name order."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        rows.extend((result["bench"], row) for row in result["rows"])
    return rows


def figure(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def cells(bench: str, row: dict[str, Any]) -> tuple[str, ...]:
    peer = row["peer_value"]
    ratio, goal = row["ratio"], row["goal"]
    met = "" if ratio is None or goal is None else ("yes" if ratio >= goal else "no")
    return (
        bench,
        row["case"],
        figure(row["sdflow"], row["unit"]),
        "—" if peer is None else f"{row['peer']}: {figure(peer, row['unit'])}",
        "—" if ratio is None else f"{ratio:.2f}×",
        "" if goal is None else f"≥ {goal:g}×",
        met,
    )


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(bench, row)) + " |" for bench, row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get(RESULTS_ENV, "bench-results")
    parser.add_argument("folder", nargs="?", type=Path, default=Path(default))
    rows = load(parser.parse_args().folder)
    if not rows:
        sys.exit(f"no bench results in {parser.parse_args().folder} (run `make bench`)")
    print(table(rows))


if __name__ == "__main__":
    main()
