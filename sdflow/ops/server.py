"""`sdflow server`: a Prefect server with its UI on 127.0.0.1, hardened against the browser.

    sdflow server [--workdir DIR] [--port 4200]      # foreground, Ctrl-C stops it
    sdflow server --background | --stop | --status   # the runs' own server (`sdflow.ops.background`)

The foreground server keeps its SQLite database under the workdir. Point runs and workers at it with
`export PREFECT_API_URL=http://127.0.0.1:4200/api`. SQLite suits one machine; for several workers set
PREFECT_API_DATABASE_CONNECTION_URL to a Postgres URL before starting (see the docs); it is kept.

The API has no authentication, and any web page the user happens to open can send requests to
127.0.0.1 too. So every server sdflow starts:
- turns on Prefect's CSRF protection (every POST/PUT/PATCH/DELETE needs a token that Prefect's
  client and UI fetch) and lets only the UI's own origin make cross-origin calls (CORS), so no other
  page can read a token;
- answers only requests whose Host is 127.0.0.1 or localhost (starlette's TrustedHostMiddleware): a
  page on a name that an attacker re-points at 127.0.0.1 (DNS rebinding) is same-origin with the
  server, and this is what stops it;
- refuses a websocket (events, logs) whose Origin is set and is not the UI's: browsers do not apply
  CORS to websockets, they only send the page's Origin. Prefect's client sends none.
The server process is `python -m sdflow.ops.server --port P` (or `--fd N`, a listening socket its
parent bound): Prefect's app from `create_app`, wrapped in the two checks, run by uvicorn.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only: the UI and API have no authentication
ALLOWED_HOSTS = [HOST, "localhost"]
DATABASE_URL = "PREFECT_API_DATABASE_CONNECTION_URL"
CSRF = "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"
CORS_ORIGINS = "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"
ORIGINS_ENV = "SDFLOW_SERVER_ORIGINS"  # the websocket Origin allow-list, for the server process


def hardened_env(port: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Prefect's settings for a server on 127.0.0.1:PORT: CSRF on, CORS only for its UI, no
    telemetry. Used for every server sdflow starts, the temporary one of a plain run included."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("DO_NOT_TRACK", "1")  # no telemetry; it also races SQLite writes
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    env.setdefault(CSRF, "true")
    env.setdefault(CORS_ORIGINS, ",".join(ui_origins(port)))
    # The UI calls the API at this URL; Prefect derives it from its settings, not from --port.
    env.setdefault("PREFECT_UI_API_URL", f"{ui_url(port)}/api")
    env[ORIGINS_ENV] = ",".join(ui_origins(port))
    return env


def server_env(workdir: Path, port: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The foreground server's environment: SQLite under WORKDIR/prefect unless a database URL is
    set."""
    env = hardened_env(port, environ)
    database = workdir / "prefect" / "prefect.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    env.setdefault(DATABASE_URL, f"sqlite+aiosqlite:///{database}")
    return env


def ui_origins(port: int) -> list[str]:
    """The origins the UI is opened from: the printed URL, and `localhost` for the same socket."""
    return [ui_url(port), f"http://localhost:{port}"]


def server_command(port: int | None = None, fd: int | None = None) -> list[str]:
    where = ["--fd", str(fd)] if fd is not None else ["--port", str(port)]
    return [sys.executable, "-m", "sdflow.ops.server", "--host", HOST, *where]


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


class OriginGuard:
    """ASGI middleware: a websocket handshake with an Origin outside `origins` is refused (403)."""

    def __init__(self, app: Any, origins: list[str]):
        self.app, self.origins = app, {o.lower() for o in origins}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            origin = dict(scope["headers"]).get(b"origin")
            if origin is not None and origin.decode("latin-1").lower() not in self.origins:
                from starlette.responses import PlainTextResponse

                await PlainTextResponse("Origin not allowed", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def guarded(app: Any, origins: list[str]) -> Any:
    """`app` behind the Host allow-list and the websocket Origin check."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    return TrustedHostMiddleware(
        OriginGuard(app, origins), allowed_hosts=ALLOWED_HOSTS, www_redirect=False
    )


def listening_socket(port: int) -> socket.socket:
    """A TCP socket listening on 127.0.0.1:PORT (0: a free port the kernel picks)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(2048)
    return sock


def run_server(sock: socket.socket) -> None:
    """Prefect's API and UI, guarded, on the listening `sock`, until SIGTERM or Ctrl-C."""
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
    )

    origins = [o for o in os.environ.get(ORIGINS_ENV, "").split(",") if o]
    config = uvicorn.Config(
        guarded(create_app(final=True), origins),
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=os.environ.get("SDFLOW_SERVER_LOG_LEVEL", "info"),
    )
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sdflow's hardened Prefect server process")
    parser.add_argument("--host", choices=[HOST], default=HOST, help="loopback only")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="bind 127.0.0.1:PORT")
    where.add_argument("--fd", type=int, help="serve on this inherited listening socket")
    args = parser.parse_args(argv)
    run_server(
        socket.socket(fileno=args.fd) if args.fd is not None else listening_socket(args.port)
    )


if __name__ == "__main__":
    main()
