"""The run as a user sees it in the Prefect UI: headless Chromium on the deployment run's page.

Debian's `chromium` (no browser download), driven over the DevTools protocol with `websockets`: open
the flow run, show its Artifacts tab, open the sample-grid artifact, and check that the image really
loaded in the browser (natural width > 0, the grid's own width). Both views are saved as one PNG in
the test's tmp dir and copied to /tmp/sdflow-ui-screenshot.png.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import pytest
from fixtures.browser import CHROMIUM, Browser
from PIL import Image

pytestmark = pytest.mark.slow

SHOWN_AT = Path("/tmp/sdflow-ui-screenshot.png")


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
