"""The runs' background Prefect server on 127.0.0.1: started once per PREFECT_HOME, reused, replaced
when its state is stale, stopped; and hardened (Host allow-list, websocket Origin, CSRF, CORS)
against requests a web page could send, checked with foreign headers on the real server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from sdflow.cli import main
from sdflow.ops import background

FOREIGN = "http://evil.example"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    yield home
    background.stop_server(home)


@pytest.fixture(scope="module")
def server(home) -> dict:
    """Started over a stale state whose pid is now someone else's (this test process): that one
    is neither trusted nor signalled."""
    stale = {"pid": os.getpid(), "port": 1, "url": "http://127.0.0.1:1/api"}
    (home / background.STATE).write_text(json.dumps(stale))
    url = background.ensure_server(home)
    state = background.read_state(home)
    assert state["url"] == url and state["pid"] != os.getpid()
    return state


def test_started_once_then_reused(home, server):
    assert httpx.get(f"{server['url']}/health", timeout=10).json() is True
    assert background.ensure_server(home) == server["url"]  # the same server, not a second one
    assert background.read_state(home)["pid"] == server["pid"]
    cmdline = Path(f"/proc/{server['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"sdflow.ops.server" in cmdline and b"127.0.0.1" in cmdline


@pytest.mark.parametrize(
    "host", ["evil.example", "127.0.0.1.evil.example", "attacker.localhost.com"]
)
def test_a_foreign_host_is_refused(server, host):
    port = server["port"]
    own = httpx.get(f"{server['url']}/health", timeout=10)
    foreign = httpx.get(f"{server['url']}/health", headers={"Host": f"{host}:{port}"}, timeout=10)
    assert own.status_code == 200
    assert foreign.status_code == 400 and "Invalid host header" in foreign.text
    ui = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": f"{host}:{port}"}, timeout=10)
    assert ui.status_code == 400  # the UI too: a rebinding page could read it
    local = httpx.get(f"{server['url']}/health", headers={"Host": f"localhost:{port}"}, timeout=10)
    assert local.status_code == 200


@pytest.mark.parametrize("path", ["/api/events/out", "/api/logs/out", "/api/events/in"])
def test_a_websocket_from_a_foreign_origin_is_refused(server, path):
    url = f"ws://127.0.0.1:{server['port']}{path}"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin=FOREIGN, open_timeout=10).close()
    assert refused.value.response.status_code == 403
    for origin in (f"http://127.0.0.1:{server['port']}", None):  # the UI's own, and a client's
        connect(url, origin=origin, open_timeout=10).close()


def test_changes_need_a_csrf_token_and_foreign_pages_get_no_cors(server):
    url = f"{server['url']}/flows/"
    refused = httpx.post(url, json={"name": "planted"}, timeout=10)
    assert refused.status_code == 403 and "CSRF" in refused.text
    preflight = httpx.options(
        url,
        headers={"Origin": FOREIGN, "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert preflight.headers.get("access-control-allow-origin") not in ("*", FOREIGN)
    ui = f"http://127.0.0.1:{server['port']}"
    allowed = httpx.options(
        url, headers={"Origin": ui, "Access-Control-Request-Method": "POST"}, timeout=10
    )
    assert allowed.headers.get("access-control-allow-origin") == ui


def test_cli_status_and_stop(home, server, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_HOME", str(home))
    assert main(["server", "--status"]) == 0
    assert server["url"] in capsys.readouterr().out
    assert main(["server", "--stop"]) == 0
    assert f"stopped the server at {server['url']}" in capsys.readouterr().out
    assert not background.healthy(server["url"], timeout=2)
    assert background.read_state(home) is None
    assert main(["server", "--status"]) == 1
    assert main(["server", "--stop"]) == 0 and "no server runs" in capsys.readouterr().out


def test_the_temporary_server_is_hardened_and_given_time(monkeypatch):
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from sdflow.ops.background import flow_api

    for key in (
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS",
    ):
        monkeypatch.delenv(key, raising=False)  # restored (removed) after the test
    monkeypatch.setenv("SDFLOW_SERVER", "temporary")
    # no API configured (a test harness of this session may have set one): the temporary server
    with temporary_settings(restore_defaults={PREFECT_API_URL}), flow_api():
        assert os.environ["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
        assert os.environ["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] != "*"
        assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() >= 600
