"""The run as a user sees it in the Prefect UI: headless Chromium on the deployment run's page.

Debian's `chromium` (no browser download), driven over the DevTools protocol with `websockets`: open
the flow run, show its Artifacts tab, open the sample-grid artifact, and check that the image really
loaded in the browser (natural width > 0, the grid's own width). Both views are saved as one PNG in
the test's tmp dir and copied to /tmp/sdflow-ui-screenshot.png.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOWN_AT = Path("/tmp/sdflow-ui-screenshot.png")


class Browser:
    """Headless Chromium with one page, driven over its DevTools websocket."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1100):
        command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
        self.process = subprocess.Popen(
            [*command, "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # closing stops chromium's helper processes too
        )
        port = self._devtools_port(profile / "DevToolsActivePort")
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        size = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", **size)

    def _devtools_port(self, port_file: Path, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_file.is_file() and "\n" in port_file.read_text():
                return int(port_file.read_text().split()[0])
            assert self.process.poll() is None, "chromium exited at start"
            time.sleep(0.1)
        raise AssertionError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == ident:  # events in between are not needed
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(
            f"never true in the page: {expression}\n{self.js('document.body.innerText')}"
        )

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        self.socket.close()
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def click_text(text: str, selector: str) -> str:
    """JS: click the first `selector` element whose text is `text` (true when found)."""
    return (
        f"(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]"
        f".find(e => e.textContent.trim() === {json.dumps(text)}); e && e.click(); return !!e; }})()"
    )


def stacked(*images: Image.Image) -> Image.Image:
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)))
    top = 0
    for image in images:
        sheet.paste(image, (0, top))
        top += image.height
    return sheet


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium")
def test_sample_grid_renders_in_the_prefect_ui(served_prefect, completed_run, tmp_path):
    artifacts = {a["key"]: a for a in served_prefect.artifacts(completed_run) if a["key"]}
    grid = artifacts["sdflow-tiny-test-sample-grid"]
    grid_width = Image.open(io.BytesIO(base64.b64decode(grid["data"].split(",", 1)[1]))).width

    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.call("Page.navigate", url=f"{served_prefect.url}/runs/flow-run/{completed_run}")
        browser.wait_for(click_text("Artifacts", "li.p-tab"))
        listed = browser.wait_for(
            "document.body.innerText.includes('sdflow-tiny-test-sample-grid') && document.body.innerText"
        )
        assert "sdflow-tiny-test-summary" in listed and "sdflow-tiny-test-metrics" in listed
        time.sleep(1)  # let the run graph finish drawing for the screenshot
        run_page = browser.screenshot()

        browser.wait_for(click_text("sdflow-tiny-test-sample-grid", "a, div, span, p, h1, h2, h3"))
        image = "document.querySelector('.artifact-data-image img')"
        width = browser.wait_for(
            f"(() => {{ const i = {image}; return i && i.complete && i.naturalWidth; }})()"
        )
        assert browser.js("location.pathname") == f"/artifacts/artifact/{grid['id']}"
        artifact_page = browser.screenshot()
    finally:
        browser.close()

    assert width == grid_width > 0  # the browser decoded the grid itself, not a broken image
    sheet = stacked(run_page, artifact_page)
    sheet.save(tmp_path / "ui-screenshot.png")
    shutil.copyfile(tmp_path / "ui-screenshot.png", SHOWN_AT)
    assert Image.open(SHOWN_AT).size == (1400, 2200)
