"""The page's views of change, timed: page load to first paint, each view's endpoint, and the embedding map
at a million rows.

Workspace part (`--workspace`, e.g. the one `mnemo demo` made): the service as `mnemo serve` builds it
(create_app over a LiveIndex, the progress reader included) behind uvicorn in this process;
- each endpoint (GET /history, /map, /compare/random, /progress, and /status for reference) over
  HTTP: its first answer in a fresh service (caches empty: the map's files removed first) and the
  median and p95 of `--repeats` more;
- in Debian's Chromium (Playwright): first paint and first contentful paint of the page, and per view
  the time from the tab's click to its content drawn (the browser's fetches, parsing and drawing).
Million-row part (`--rows`): a table of that many 128-d unit vectors (1,000 classes, one centre each)
written through LanceDB in mnemo's table schema, then the embedding map (projection.embedding_map,
what GET /map calls) computed once (seconds, resident memory growth) and served from its cache
(median of `--repeats`), and the challenger's map of the same sample (rows looked up by id).

    python -m bench.page --workspace /tmp/demo-ws --params /tmp/demo-params.yaml --rows 1000000

Writes bench/results/<date>-page.json and a markdown table (.md). Targets: every view under 1 s at the
demo size; the map under 5 s to compute once at 1M rows and under 200 ms from the cache.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import uvicorn

from bench.common import RESULTS, command_line, load_average, machine, markdown_table, pct, rss_mb, write_run
from components.config import load_params
from components.serving.app import create_app
from components.serving.live import LiveIndex
from components.vectors.projection import embedding_map
from components.vectors.tables import VECTOR, connect, table_schema
from components.workspace import Workspace, resolve_workspace

DIM = 128
ENDPOINTS = ["/history", "/map", "/compare/random?k=8", "/progress", "/status"]
VIEWS = {  # tab -> what shows it is drawn
    "history": "#history-chart circle.point",
    "map": "#map-champion circle",
    "progress": "#progress-none:not([hidden]), #progress-run:not([hidden])",
}
TARGETS = {"view_s": 1.0, "map_compute_1m_s": 5.0, "map_cached_1m_ms": 200.0}


def start(app) -> tuple[uvicorn.Server, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def timed_get(client: httpx.Client, url: str) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    r = client.get(url)
    return (time.perf_counter() - t) * 1000, r


def workspace_part(ws: Workspace, params, repeats: int) -> dict:
    from flows.progress import current_retrain

    shutil.rmtree(ws.root / "cache" / "maps", ignore_errors=True)  # the map computed afresh: its first answer
    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds)
    app = create_app(live, params.serve, params.ingest, progress=lambda: current_retrain(ws, live.registry))
    server, url = start(app)
    out: dict = {"endpoints": {}, "page": {}}
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            client.get("/health")
            for path in ENDPOINTS:
                first, r = timed_get(client, path)
                r.raise_for_status()
                ms = [timed_get(client, path)[0] for _ in range(repeats)]
                out["endpoints"][path] = {
                    "first_ms": round(first, 1),
                    "p50_ms": pct(ms, 50),
                    "p95_ms": pct(ms, 95),
                    "bytes": len(r.content),
                }
            m = client.get("/map").json()
            out["map_points"] = len(m["champion"]["points"])
            out["rows"] = m["champion"]["rows"]
            out["versions"] = len(client.get("/history").json()["versions"])
        out["page"] = browser_part(url)
    finally:
        server.should_exit = True
    return out


def browser_part(url: str) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        t = time.perf_counter()
        page.goto(url)
        loaded = (time.perf_counter() - t) * 1000
        page.wait_for_function("performance.getEntriesByType('paint').length >= 2")
        paints = {
            e["name"]: e["startTime"]
            for e in page.evaluate("performance.getEntriesByType('paint').map(e => e.toJSON())")
        }
        out = {
            "first_paint_ms": round(paints["first-paint"], 1),
            "first_contentful_paint_ms": round(paints["first-contentful-paint"], 1),
            "goto_load_ms": round(loaded, 1),
            "views_ms": {},
        }
        for tab, drawn in VIEWS.items():
            t = time.perf_counter()
            page.click(f"nav button[data-tab={tab}]")
            page.wait_for_selector(drawn)
            out["views_ms"][tab] = round((time.perf_counter() - t) * 1000, 1)
        t = time.perf_counter()
        page.click("nav button[data-tab=compare]")
        page.click("#compare-random")
        page.wait_for_selector("#compare-challenger figure.hit")
        out["views_ms"]["compare"] = round((time.perf_counter() - t) * 1000, 1)
        browser.close()
    return out


def million_part(rows: int, repeats: int, root: Path) -> dict:
    ws = Workspace(root=root, tracking_uri=f"sqlite:///{root}/mlflow.db", lancedb_uri=str(root / "lancedb"))
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    tbl = connect(ws).create_table("bench_map", schema=table_schema(DIM))
    t = time.perf_counter()
    step = 100_000
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        cls = rng.integers(0, len(centres), n)
        v = centres[cls] + rng.standard_normal((n, DIM), np.float32) * 0.08
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = [f"img{i}" for i in range(lo, lo + n)]
        tbl.add(
            pa.table(
                {
                    "id": ids,
                    "class": [f"c{c}" for c in cls],
                    "arrival": [f"a{c % 3}" for c in cls],
                    "role": ["train"] * n,
                    VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM),
                },
                schema=table_schema(DIM),
            )
        )
    written = time.perf_counter() - t
    before = rss_mb()
    t = time.perf_counter()
    own, hit = embedding_map(ws, "bench_map")
    compute = time.perf_counter() - t
    assert not hit and len(own.points) > 0
    growth = rss_mb() - before
    cached = []
    for _ in range(repeats):
        t = time.perf_counter()
        _, hit = embedding_map(ws, "bench_map")
        cached.append((time.perf_counter() - t) * 1000)
        assert hit
    t = time.perf_counter()
    embedding_map(ws, "bench_map", like=own)  # the challenger's map of the same images: rows found by id
    like = time.perf_counter() - t
    return {
        "rows": rows,
        "sample": len(own.points),
        "write_s": round(written, 1),
        "map_compute_s": round(compute, 2),
        "map_compute_rss_growth_mb": round(growth, 1),
        "map_cached_p50_ms": pct(cached, 50),
        "map_cached_p95_ms": pct(cached, 95),
        "challenger_map_compute_s": round(like, 2),
        "cache_file_kb": round(sum(f.stat().st_size for f in (root / "cache" / "maps").iterdir()) / 1024 / 2, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, help="a workspace with a champion and a challenger (mnemo demo's)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic table (0: skip)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    report: dict = {
        "command": command_line("page"),
        "date": date.today().isoformat(),
        "machine": machine(),
        "load_average_before": load_average(),
        "targets": TARGETS,
    }
    if args.workspace:
        params = load_params(args.params)
        report["workspace"] = workspace_part(resolve_workspace(params, args.workspace), params, args.repeats)
    if args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp:
            report["million"] = million_part(args.rows, args.repeats, Path(tmp))
    report["load_average_after"] = load_average()
    lines = [f"# bench/page: {report['date']}", "", f"`{report['command']}` on {report['machine']}", ""]
    if "workspace" in report:
        w = report["workspace"]
        lines += [
            f"Workspace: {w['rows']} rows, {w['versions']} versions, {w['map_points']} points on the map.",
            "",
            markdown_table(
                ["endpoint", "first (ms)", "p50 (ms)", "p95 (ms)", "bytes"],
                [[k, v["first_ms"], v["p50_ms"], v["p95_ms"], v["bytes"]] for k, v in w["endpoints"].items()],
            ),
            "",
            markdown_table(
                ["page", "ms"],
                [
                    ["first paint", w["page"]["first_paint_ms"]],
                    ["first contentful paint", w["page"]["first_contentful_paint_ms"]],
                    *[[f"view {k}: click to drawn", v] for k, v in w["page"]["views_ms"].items()],
                ],
            ),
            "",
        ]
    if "million" in report:
        m = report["million"]
        lines += [markdown_table(["million-row table", "value"], [[k, v] for k, v in m.items()]), ""]
    md = "\n".join(lines)
    stem = RESULTS / f"{report['date']}-page{('-' + args.tag) if args.tag else ''}"
    write_run(stem, report, md)
    print(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
