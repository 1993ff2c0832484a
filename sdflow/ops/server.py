"""`sdflow server`: a Prefect server with its UI on 127.0.0.1, its SQLite database under the workdir.

    sdflow server [--workdir DIR] [--port 4200]

Runs `prefect server start` in the foreground (Ctrl-C stops it). Point runs and workers at it with
`export PREFECT_API_URL=http://127.0.0.1:4200/api`. SQLite suits one machine; for several workers set
PREFECT_API_DATABASE_CONNECTION_URL to a Postgres URL before starting (see the README); it is kept.

A web page the user happens to open can send requests to 127.0.0.1 too, so the server also turns on
Prefect's CSRF protection (every POST/PUT/PATCH/DELETE needs a token that Prefect's client and UI
fetch) and lets only the UI's own origin make cross-origin calls, so no other page can read a token.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the UI and API have no authentication
DATABASE_URL = "PREFECT_API_DATABASE_CONNECTION_URL"
CSRF = "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"
CORS_ORIGINS = "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"


def server_env(workdir: Path, port: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: SQLite under WORKDIR/prefect unless a database URL is set."""
    env = dict(os.environ if environ is None else environ)
    database = workdir / "prefect" / "prefect.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    env.setdefault(DATABASE_URL, f"sqlite+aiosqlite:///{database}")
    # The UI calls the API at this URL; Prefect derives it from its settings, not from --port.
    env.setdefault("PREFECT_UI_API_URL", f"{ui_url(port)}/api")
    env.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    env.setdefault("DO_NOT_TRACK", "1")  # no telemetry; it also races SQLite writes
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault(CSRF, "true")
    env.setdefault(CORS_ORIGINS, ",".join(ui_origins(port)))
    return env


def ui_origins(port: int) -> list[str]:
    """The origins the UI is opened from: the printed URL, and `localhost` for the same socket."""
    return [ui_url(port), f"http://localhost:{port}"]


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def ui_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def serve(workdir: Path, port: int) -> int:
    """Start the server in the foreground; returns its exit code."""
    own_database = DATABASE_URL in os.environ
    env = server_env(workdir, port)
    where = f"${DATABASE_URL}" if own_database else env[DATABASE_URL]
    print(f"Prefect UI:  {ui_url(port)}", flush=True)
    print(f"database:    {where}", flush=True)
    print(f"runs and workers: export PREFECT_API_URL={ui_url(port)}/api", flush=True)
    return subprocess.call(server_command(port), env=env)
