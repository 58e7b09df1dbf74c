"""The views of change in a real browser (Debian's Chromium via Playwright), on a workspace made by real
retrains: v1 and v2 retrained and promoted, the page open while v3 is retrained (the progress view
follows it to its promotion), then a rollback to v2. The history, the embedding map (hover shows a
thumbnail, a click searches), champion against challenger (a neighbour the test knows changed is
marked), all with MNEMO_API_KEY set.

Screenshots go to the test's tmp dir (and to $MNEMO_SCREENSHOTS when set: `docs/` for the README).
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from components.config import with_overrides
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.registry.mlflow_registry import ModelRegistry
from components.registry.promotion import Promoter
from components.serving.app import create_app
from components.serving.live import LiveIndex
from components.vectors.tables import connect
from flows.progress import current_retrain
from flows.retrain import retrain
from tests.browser.test_page_in_chromium import CHROMIUM, screenshot
from tests.integration.live_workspace import serving

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
KEY = "views-key-456"
PERMISSIVE = {
    "demo.arrivals": 2,
    "train.epochs": 3,
    "gate.max_unseen_recall_at_1_drop": 1.0,  # every retrain here is promoted: the progress view follows one
    "gate.max_slice_forgetting": 1.0,
    # 3-epoch models of a few dozen images sit near the collapse floor (v2's spread 0.0087 against 0.01 with
    # the fonts of a fresh machine of this kind): the views, not the sanity floor, are under test here
    "gate.min_embedding_spread": 0.0,
}


def top_k(ws, version: str, query: str, k: int) -> list[str]:
    """The k nearest other stored images to `query` in version's table, by brute force over its rows."""
    t = connect(ws).open_table(f"embeddings_v{version}").to_arrow()
    ids = t["id"].to_pylist()
    vectors = np.asarray(t["vector"].to_pylist(), dtype=np.float32)
    q = vectors[ids.index(query)]
    order = np.argsort(1 - vectors @ q, kind="stable")
    return [ids[i] for i in order if ids[i] != query][:k]


def test_history_map_compare_and_a_retrain_in_progress(params, ws, tmp_path):
    params = with_overrides(params, PERMISSIVE)
    fonts = discover_fonts()
    arrivals = stream_classes(fonts, params.demo)
    for step in (0, 1):
        write_arrival(ws.inbox, step, arrivals[step], fonts, params.demo)
        assert retrain(params, str(ws.root)).status == "promoted"
    write_arrival(ws.inbox, 2, arrivals[2], fonts, params.demo)

    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds)
    app = create_app(
        live, params.serve, params.ingest, api_key=KEY, progress=lambda: current_retrain(ws, live.registry)
    )
    with serving(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key", KEY)
        page.click("#key-ok")
        page.wait_for_function("document.querySelector('#live').textContent.includes('model v2')")

        # A retrain in progress: nothing shown before it starts, then its stages, epochs and loss, to promoted.
        page.click("nav button[data-tab=progress]")
        page.wait_for_selector("#progress-none:not([hidden])")
        assert page.text_content("#retrain-badge") == ""
        done: list[object] = []
        worker = threading.Thread(target=lambda: done.append(retrain(params, str(ws.root))), daemon=True)
        worker.start()
        seen_stages, seen_epochs = [], []
        shot = False
        while worker.is_alive() or not page.is_visible("#progress-outcome:has-text('promoted')"):
            running = page.eval_on_selector_all("#progress-stages span.running", "s => s.map(e => e.dataset.stage)")
            seen_stages += [s for s in running if s not in seen_stages]
            epoch = page.text_content("#progress-epoch") or ""
            if epoch and epoch not in seen_epochs:
                seen_epochs.append(epoch)
            if (
                not shot
                and "epoch 1 of 3" in epoch
                and page.is_visible("#progress-stages span.running[data-stage=train]")
            ):
                screenshot(page, tmp_path, "page-progress")
                shot = True
            page.wait_for_timeout(100)
            if not worker.is_alive() and len(done) == 0:
                pytest.fail("the retrain died")
        worker.join()
        assert done and done[0].status == "promoted"
        assert "train" in seen_stages, seen_stages
        assert any(e.startswith("train: epoch 1 of 3") for e in seen_epochs), seen_epochs
        assert page.text_content("#progress-outcome") == "ended: promoted v3"
        assert page.eval_on_selector_all("#progress-stages span", "s => s.map(e => e.className)") == ["done"] * 6
        assert page.eval_on_selector_all("#progress-loss circle.point", "c => c.length") == 3

        Promoter(ws, params.registry, params.index).rollback(reason="browser test: v3 misbehaves")
        live.refresh()

        # History: three versions, v3 promoted and then rolled back from, v2 the champion again.
        page.click("nav button[data-tab=history]")
        page.wait_for_selector("#history-chart circle.point")
        labels = page.eval_on_selector_all("#history-chart text.xlabel", "t => t.map(e => e.textContent)")
        assert labels == ["v1", "v2 ★", "v3"]
        marks = page.eval_on_selector_all(
            "#history-chart text.mark", "t => t.map(e => [e.getAttribute('x'), e.textContent])"
        )
        assert [m for _, m in marks].count("▲ promoted") == 3 and "↺ rolled back to" in [m for _, m in marks]
        legend = page.text_content("#history-legend")
        assert "unseen R@1" in legend and "raw pixels R@1" in legend and "unseen MAP@R" in legend
        assert page.eval_on_selector_all("#forgetting-chart path", "p => p.length") >= 2  # a line per arrival slice
        screenshot(page, tmp_path, "page-history")

        # The map: the champion's (v2) and the challenger's (v3) for the same images; hover shows a thumbnail.
        page.click("nav button[data-tab=map]")
        page.wait_for_selector("#map-challenger circle")
        n = page.eval_on_selector_all("#map-champion circle", "c => c.length")
        assert n == page.eval_on_selector_all("#map-challenger circle", "c => c.length") > 0
        assert "v3" in page.text_content("#map-challenger-title")
        point = page.locator("#map-champion circle").nth(n // 2)
        image_id = point.get_attribute("data-id")
        point.hover()
        page.wait_for_function("document.querySelector('#map-tip img').naturalWidth > 0")
        assert page.get_attribute("#map-tip", "data-id") == image_id
        assert page.locator(f'#map-challenger circle.lit[data-id="{image_id}"]').count() == 1  # the same image, lit
        screenshot(page, tmp_path, "page-map")
        point.click()  # runs the neighbour search on it
        page.wait_for_selector("#search-results figure.hit img[src]")
        assert page.get_attribute("#search-results figure.hit img", "data-id") == image_id

        # Champion against challenger: a neighbour the test knows changed is marked so.
        page.click("nav button[data-tab=compare]")
        page.click("#compare-random")
        page.wait_for_selector("#compare-challenger figure.hit")
        query = page.get_attribute("#compare-query img", "data-id")
        k = int(page.input_value("#k"))
        champion, challenger = top_k(ws, "2", query, k), top_k(ws, "3", query, k)
        entered = [i for i in challenger if i not in champion]
        left = [i for i in champion if i not in challenger]
        shown = page.eval_on_selector_all(
            "#compare-challenger figure", "f => f.map(e => [e.querySelector('img').dataset.id, e.dataset.mark])"
        )
        assert [i for i, _ in shown] == challenger
        for image, mark in shown:
            assert (mark == "entered") == (image in entered)
        for image, mark in page.eval_on_selector_all(
            "#compare-champion figure", "f => f.map(e => [e.querySelector('img').dataset.id, e.dataset.mark])"
        ):
            assert (mark == "left") == (image in left)
        assert "probe images" in page.text_content(
            "#compare-churn"
        ) and "gate verdict on v3: promote" in page.text_content("#compare-churn")
        page.wait_for_function(
            "[...document.querySelectorAll('#compare-side img, .side img')].every(i => i.naturalWidth)"
        )
        screenshot(page, tmp_path, "page-compare")
        browser.close()
    # The endpoints need the key like every other.
    with serving(create_app(live, params.serve, params.ingest, api_key=KEY)) as url:
        for path in ("/history", "/map", "/progress", "/compare/random"):
            assert httpx.get(url + path).status_code == 401
    assert ModelRegistry(ws, params.registry).aliases()["champion"] == "2"
