"""The README's screenshots of the service's page, taken from a real workspace (e.g. after `mnemo demo`).

    python docs/screenshots.py --workspace workspace      # writes docs/page-{search,status,browse}.png
    python docs/screenshots.py --workspace workspace --views  # and page-{history,map,compare}.png

(page-progress.png, a retrain followed while it runs, comes from tests/browser/test_views_in_chromium.py
run with MNEMO_SCREENSHOTS=docs.)

The page is served as `mnemo serve` serves it and driven in Debian's Chromium (Playwright,
executable_path), as tests/browser does: an unseen-class image is searched, then the status
and a random query are shown.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import uvicorn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.config import load_params  # noqa: E402
from components.data.catalog import Catalog  # noqa: E402
from components.serving.app import create_app  # noqa: E402
from components.serving.live import LiveIndex  # noqa: E402
from components.workspace import resolve_workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--views", action="store_true", help="also the history, map and compare views")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    params = load_params(args.params)
    ws = resolve_workspace(params, args.workspace)
    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds)
    server = uvicorn.Server(uvicorn.Config(create_app(live, params.serve, params.ingest), port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    catalog = Catalog.load(ws.catalog)
    query = next(iter(catalog.records("unseen")), None) or catalog.records()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 720})
        page.goto(url)
        page.set_input_files("#file", str(ws.classes_dir / query.id))
        page.wait_for_function("[...document.querySelectorAll('#search-results img')].every(i => i.naturalWidth)")
        page.wait_for_timeout(500)
        page.screenshot(path=str(args.out / "page-search.png"))
        page.click("nav button[data-tab=status]")
        page.wait_for_selector("#promotions tbody tr")
        page.wait_for_timeout(1500)  # the heatmap
        page.screenshot(path=str(args.out / "page-status.png"), full_page=True)
        page.click("nav button[data-tab=browse]")
        page.click("#random")
        page.wait_for_selector("#browse-results figure.hit")
        page.wait_for_timeout(800)
        page.screenshot(path=str(args.out / "page-browse.png"))
        if args.views:
            views(page, args.out)
        browser.close()
    server.should_exit = True
    more = ", page-history.png, page-map.png, page-compare.png" if args.views else ""
    print(f"wrote {args.out}/page-search.png, page-status.png, page-browse.png{more} from {ws.root}")


def views(page, out: Path) -> None:
    """The views of change: the history, the map with a point hovered, a random image compared."""
    page.click("nav button[data-tab=history]")
    page.wait_for_selector("#history-chart circle.point")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "page-history.png"), full_page=True)
    page.click("nav button[data-tab=map]")
    page.wait_for_selector("#map-champion circle")
    points = page.locator("#map-champion circle")
    points.nth(points.count() // 3).hover()
    page.wait_for_function("document.querySelector('#map-tip img').naturalWidth > 0")
    page.screenshot(path=str(out / "page-map.png"))
    page.mouse.move(0, 0)
    page.click("nav button[data-tab=compare]")
    page.click("#compare-random")
    page.wait_for_selector("#compare-challenger figure.hit")
    page.wait_for_function("[...document.querySelectorAll('.side img')].every(i => i.naturalWidth)")
    page.screenshot(path=str(out / "page-compare.png"), full_page=True)


if __name__ == "__main__":
    main()
