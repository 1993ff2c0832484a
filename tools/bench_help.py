"""Run bench scripts as `python SCRIPT --help`, cheaply: their heavy imports once, then a fork each.

Most benches import torch before they parse their arguments, so `--help` costs seconds of imports per
script. This imports, once, every module the scripts import at their top (following their bench/
neighbours), then forks one child per script that runs it as `__main__` with `--help`. The script's
own imports really run there, so a broken one fails as it would from the shell. Used by
tools/docs_check.py.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import runpy
import sys
import tempfile
import traceback
import typing
from pathlib import Path


def _imports(script: Path, seen: set[Path]) -> set[str]:
    """Top-level modules a bench script imports, following its bench/ neighbours."""
    if script in seen or not script.is_file():
        return set()
    seen.add(script)
    modules = set()
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            local = script.parent / f"{name.split('.')[0]}.py"
            modules |= _imports(local, seen) if local.is_file() else {name}
    return modules - {"__future__"}


def preload(scripts: list[Path]) -> None:
    """Import once, before forking, what the scripts import at their top (failures left to them)."""
    seen: set[Path] = set()
    for module in sorted(set().union(*(_imports(s, seen) for s in scripts))):
        with contextlib.suppress(Exception):  # the child running the script reports it
            importlib.import_module(module)


def run_helps(scripts: list[Path]) -> dict[Path, tuple[int, str]]:
    """Each script run as `python SCRIPT --help`, in forked children, a few at a time."""
    preload(scripts)
    results, running = {}, {}
    pending = list(scripts)
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            script = pending.pop()
            output = tempfile.TemporaryFile()  # noqa: SIM115 - closed when its child is reaped
            sys.stdout.flush(), sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(script, output.fileno())
            running[pid] = (script, output)
        pid, status = os.wait()
        script, output = running.pop(pid)
        output.seek(0)
        results[script] = (
            os.waitstatus_to_exitcode(status),
            output.read().decode(errors="replace"),
        )
        output.close()
    return results


def _child(script: Path, fd: int) -> typing.NoReturn:
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.argv, sys.path[0] = [str(script), "--help"], str(script.parent)
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported to the parent through the exit status
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
