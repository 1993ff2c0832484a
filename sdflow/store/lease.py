"""Run leases: a running run's claim on the workdir, honoured by `sdflow gc`.

gc keeps what the newest runs' `runs/<id>/summary.json` point to, but a run writes its summary
when it ends: until then the outputs it has finished or reused are referenced nowhere. So a run
holds `runs/<id>/LEASE` from its start to its end: an exclusive `flock` on that file (its content,
pid, host and start time, is for people). The kernel drops the lock when the process exits, however
it exits, so a killed run never holds a stale lease and no heartbeat is needed; a lease file nobody
locks is debris.

While any lease is held, gc removes no unreferenced stage output (the running run may be using
any of them); partial builds, debris and old checkpoints go as usual, each under its stage lock.
gc checks the leases again just before each output it removes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LEASE = "LEASE"


class RunLease:
    """The lease of one run; `release()` (or the process ending) gives it back."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LEASE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps(info).encode())

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __del__(self) -> None:  # a run object dropped without `release` still lets go
        self.release()


def held_leases(workdir: str | Path) -> list[Path]:
    """The lease files under `workdir/runs/` that a live process holds."""
    return [path for path in sorted(Path(workdir).glob(f"runs/*/{LEASE}")) if _held(path)]


def _held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False  # released (deleted) since the glob, or not a plain file
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
