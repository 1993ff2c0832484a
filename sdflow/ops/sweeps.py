"""Hyperparameter sweeps: which settings a sweep tries, and how their results compare.

    sdflow sweep tiny-cpu --grid train.lr=1e-3,3e-4 --grid train.lora_rank=4,16 --metric fid

A sweep is a list of settings (each a list of `--set` overrides on top of the profile's): the full
product of `--grid` values, or `--random N` draws from it (a value `low:high` is a range, drawn
log-uniformly when both ends are positive). Each setting is an ordinary pipeline run, so the stages
whose keys do not depend on the swept keys are built by the first setting and are cache hits for the
others, and a rerun skips every stage a finished setting built. This module is plain Python; the
flow that runs the settings is `flows/sweep.py`.
"""

from __future__ import annotations

import itertools
import math
import random as random_module
from collections.abc import Mapping, Sequence
from typing import Any

from sdflow.errors import UserError
from sdflow.store.fingerprint import hash_json

# Which way is better, per metric a sweep can rank by.
DIRECTIONS = {
    "fid": "min",
    "kid": "min",
    "cmmd": "min",
    "val_loss": "min",
    "clip_score": "max",
    "precision": "max",
    "recall": "max",
    "density": "max",
    "coverage": "max",
}


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`--grid KEY=V1,V2` items as {key: [values]}; a key may not repeat."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not parts:
            raise UserError(
                f"--grid {item!r}: write KEY=VALUE[,VALUE...], e.g. train.lr=1e-4,3e-5."
            )
        if key.strip() in grid:
            raise UserError(f"--grid names {key.strip()!r} twice: give all its values at once.")
        grid[key.strip()] = parts
    if not grid:
        raise UserError("A sweep needs at least one --grid KEY=VALUES.")
    return grid


def expand(
    grid: Mapping[str, Sequence[str]], draws: int | None = None, seed: int = 0
) -> list[dict]:
    """The settings to run: every combination, or `draws` seeded random ones (ranges drawn)."""
    keys = list(grid)
    if draws is None:
        ranges = [k for k in keys if any(_is_range(v) for v in grid[k])]
        if ranges:
            raise UserError(f"{ranges[0]} has a range ({grid[ranges[0]]}): ranges need --random N.")
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if draws < 1:
        raise UserError(f"--random {draws}: draw at least one setting.")
    rng = random_module.Random(seed)
    settings: list[dict] = []
    for _ in range(draws * 20):  # distinct settings; a small grid may have fewer than `draws`
        setting = {k: _draw(rng.choice(list(grid[k])), rng) for k in keys}
        if setting not in settings:
            settings.append(setting)
        if len(settings) == draws:
            break
    return settings


def _is_range(value: str) -> bool:
    low, sep, high = value.partition(":")
    return bool(sep) and _number(low) is not None and _number(high) is not None


def _draw(value: str, rng: random_module.Random) -> str:
    if not _is_range(value):
        return value
    low, high = (_number(v) for v in value.split(":"))
    if isinstance(low, int) and isinstance(high, int):
        return str(rng.randint(min(low, high), max(low, high)))
    if low > 0 and high > 0:  # scales such as learning rates: log-uniform
        return f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}"
    return f"{rng.uniform(low, high):.3g}"


def _number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


def plan(
    profile: str,
    grid: Mapping[str, Sequence[str]],
    metric: str,
    overrides: Sequence[str] = (),
    draws: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """The sweep's settings, each checked to be a valid config (all errors before any work)."""
    from sdflow.profiles import load_profile

    check_metric(metric)
    settings = expand(grid, draws, seed)
    for setting in settings:
        load_profile(profile, [*overrides, *overrides_of(setting)])
    return settings


def overrides_of(setting: Mapping[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in setting.items()]


def sweep_id(
    profile: str, overrides: Sequence[str], settings: Sequence[Mapping], metric: str
) -> str:
    return hash_json([profile, list(overrides), list(settings), metric])[:12]


def parallelism(requested: int | None, gpu_slots: int, cuda: bool) -> int:
    """Settings trained at once: `requested` (the sweep's `parallel`), else one per GPU slot
    (the `gpu-<i>` limits of `sdflow deploy --gpus N`) on a CUDA host, else one."""
    if requested is not None:
        if requested < 1:
            raise UserError(
                f"parallel {requested}: train at least one setting at a time (1: one after another)."
            )
        return requested
    return max(1, gpu_slots) if cuda else 1


def check_metric(metric: str) -> str:
    if metric not in DIRECTIONS:
        raise UserError(f"--metric {metric!r} is not one of {', '.join(sorted(DIRECTIONS))}.")
    return metric


def metric_value(result: Mapping[str, Any], metric: str) -> float | None:
    """A finished setting's value of `metric` (the trained model's), or None when it has none."""
    value = (result.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def best_setting(results: Sequence[Mapping[str, Any]], metric: str) -> int | None:
    """Index of the best finished setting by `metric` in its right direction (None: no values)."""
    scored = [(metric_value(r, metric), i) for i, r in enumerate(results)]
    scored = [(v, i) for v, i in scored if v is not None]
    if not scored:
        return None
    sign = 1 if DIRECTIONS[metric] == "min" else -1
    return min(scored, key=lambda pair: (sign * pair[0], pair[1]))[1]


def table_rows(results: Sequence[Mapping[str, Any]], best: int | None) -> list[dict[str, Any]]:
    """One row per setting: swept values, status, every metric, train seconds, model directory."""
    metric_names = sorted({m for r in results for m in (r.get("metrics") or {})})
    rows = []
    for index, result in enumerate(results):
        row = {
            "best": "★" if index == best else "",
            **result["setting"],
            "status": result["status"],
        }
        for name in metric_names:
            value = (result.get("metrics") or {}).get(name)
            row[name] = round(value, 4) if isinstance(value, float) else value
        row["train_seconds"] = result.get("train_seconds")
        row["model_dir"] = result.get("model_dir") or result.get("error")
        rows.append(row)
    return rows
