"""The web page in a real browser: Debian's Chromium driven by Playwright (executable_path: no
browser download). `mnemo serve`'s app on a real uvicorn server over a small real workspace.

Screenshots of each page go to the test's tmp dir (and to $MNEMO_SCREENSHOTS when set).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from components.data.catalog import Catalog
from components.registry.promotion import Promoter
from components.serving.app import create_app
from components.serving.live import LiveIndex
from tests.integration.live_workspace import serving

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed (`make setup` installs Debian's where apt is usable)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("MNEMO_SCREENSHOTS"):
        Path(os.environ["MNEMO_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["MNEMO_SCREENSHOTS"]) / f"{name}.png"), full_page=True)


def rendered(page, selector: str) -> list[int]:
    """naturalWidth of every image under selector, once each has loaded (0: broken)."""
    page.wait_for_function(
        f"[...document.querySelectorAll({selector!r})].length > 0 && "
        f"[...document.querySelectorAll({selector!r})].every(i => i.complete && i.src)",
        timeout=30_000,
    )
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.naturalWidth)")


def app_for(ws, params, api_key=None):
    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds)
    return create_app(live, params.serve, params.ingest, api_key=api_key)


def test_search_status_and_browse_in_chromium(live_ws, params, browser, tmp_path):
    Promoter(live_ws, params.registry, params.index).promote("2", reason="browser test: promote v2")
    record = Catalog.load(live_ws.catalog).records()[5]
    bad = tmp_path / "not-an-image.png"
    bad.write_text("this is text, not a PNG")
    with serving(app_for(live_ws, params)) as url:
        live = httpx.get(f"{url}/live").json()
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(url)

        # Search: upload a stored image; its neighbours render as thumbnails, nearest (itself) first.
        page.set_input_files("#file", str(live_ws.classes_dir / record.id))
        widths = rendered(page, "#search-results figure.hit img")
        assert len(widths) == 8 and all(w > 0 for w in widths)
        assert page.get_attribute("#search-results figure.hit img", "data-id") == record.id
        answered = page.text_content("#search-answered")
        assert f"model v{live['model_version']} " in answered and live["table"] in answered
        assert f"model v{live['model_version']}," in page.text_content("#live")
        screenshot(page, tmp_path, "search")

        # An invalid upload shows the service's own words.
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.querySelector('#search-error').textContent.length > 0")
        service_says = httpx.post(f"{url}/query", files=[("image", ("not-an-image.png", bad.read_bytes()))]).json()
        assert page.text_content("#search-error") == service_says["detail"]

        # Status: champion, challenger, the promotion log newest first.
        page.click("nav button[data-tab=status]")
        page.wait_for_selector("#promotions tbody tr td:has-text('browser test: promote v2')")
        assert "Champion v2" in page.text_content("#champion")
        first_row = page.text_content("#promotions tbody tr")
        assert "browser test: promote v2" in first_row and "v2" in first_row
        screenshot(page, tmp_path, "status")

        # Browse: a class's sample, then a random stored image and its neighbours.
        page.click("nav button[data-tab=browse]")
        assert all(w > 0 for w in rendered(page, "#browse-results img"))
        assert "class c0" in page.text_content("#browse-answered")
        page.click("#random")
        page.wait_for_selector("#browse-results figure.hit")
        assert all(w > 0 for w in rendered(page, "#browse-results img"))
        assert "random stored image" in page.text_content("#browse-answered")
        screenshot(page, tmp_path, "browse")


def test_with_an_api_key_the_page_asks_once_and_keeps_it_for_the_tab(live_ws, params, browser, tmp_path):
    key = "browser-key-123"
    record = Catalog.load(live_ws.catalog).records()[0]
    with serving(app_for(live_ws, params, api_key=key)) as url:
        assert httpx.get(f"{url}/live").status_code == 401
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#key-dialog[open]")  # the first call was refused: the page asks
        page.fill("#key", key)
        page.click("#key-ok")
        page.wait_for_function("document.querySelector('#live').textContent.includes('model v1')")
        page.set_input_files("#file", str(live_ws.classes_dir / record.id))
        assert all(w > 0 for w in rendered(page, "#search-results figure.hit img"))
        assert page.evaluate("sessionStorage.getItem('mnemo-api-key')") == key
        assert not page.is_visible("#key-dialog")  # asked once, kept for the tab
