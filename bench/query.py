"""Query benchmark: the search at a million vectors and the HTTP path, side by side in one run.

Search (per vector set, one table of `--rows` 128-d unit vectors, 500 single queries):
- engines, alternated query by query so load hits them alike: raw LanceDB (async API, the
  settings mnemo ships), mnemo's read path (`TableReader`, as the service calls it), and as
  bench-only peers faiss `IndexHNSWFlat` and hnswlib on the same vectors; with
  `--previous-default`, also LanceDB's IVF_PQ as mnemo shipped it before (nprobes 40, refine 10);
- recall@10 against exact cosine neighbours (numpy), build seconds, index bytes and the
  process's resident memory growth while building;
- hot adds: 1% more rows appended (searched exactly beside the index until optimize folds them
  in), queried before and after `optimize`, recall against the grown table's exact neighbours.
The previous default runs on the first (synthetic) set only (its build takes minutes).
mnemo's serving graph (serve.search: graph, components/vectors/graph.py) is built from the same table as
a replica builds it (ef tuned to index.ann_min_recall), with build seconds and memory growth.
Vector sets: `synthetic` (one centre per 100 rows, cosine to the centre ~0.74, as bench/index.py)
and `calibrated` (drawn to match the intra- and inter-class cosine statistics and class sizes
of a real champion's table: `--calibrate WORKSPACE`, e.g. the one `mnemo demo` made).

HTTP (a small real workspace: 200 stored PNGs, a registered model, a validated table):
- model forward of one image alone, search alone, and `POST /query` with one real PNG from one
  client (p50/p99), and requests/s with 4 concurrent clients, through `mnemo serve` in its own
  process: this code with each `serve.runtime` (the shipped one first), with `--workers 2`, and
  with `--baseline REF` the service as it was at git REF (its own params.yaml), in the same run.

    python -m bench.query --calibrate /tmp/demo-ws --baseline 516534b --previous-default

Writes bench/results/<date>-query.json and a markdown table (.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import torch
import yaml

from bench.common import REPO, RESULTS, command_line, load_average, markdown_table, pct, rss_mb, write_run
from bench.serving import free_port, serve_command, service_env
from components.config import Params, Runtime, load_params, with_overrides
from components.modeling.embedder import build_embedder, embed_images
from components.registry.mlflow_registry import CHAMPION, TABLE_TAG, ModelRegistry
from components.vectors.ann import ensure_ann_index, tune_ef
from components.vectors.build import build_table
from components.vectors.graph import ServingGraph
from components.vectors.search import AsyncLoop, TableReader, with_table_settings
from components.vectors.tables import VECTOR, connect, open_table, table_schema, vector_indices
from components.workspace import resolve_workspace

DIM = 128
RUNTIMES = get_args(Runtime)  # every serve.runtime
K = 10
TARGETS = {"p99_ms": 10.0, "recall_at_10": 0.97, "http_p50_over_parts": 1.2, "rps_4_clients_over_baseline": 2.0}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- vector sets ------------------------------------------------------------------------------


def synthetic(n: int, seed: int, centres: np.ndarray) -> np.ndarray:
    """bench/index.py's vectors: a random centre each, plus noise (cosine to the centre ~0.74)."""
    rng = np.random.default_rng(seed)
    return unit(
        centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, DIM), np.float32) * (0.9 / DIM**0.5)
    )


def champion_statistics(root: Path, params: Params) -> dict:
    """Mean cosine within a class and between classes, and the class sizes, of a champion's table."""
    ws = resolve_workspace(params, root)
    champion = ModelRegistry(ws, params.registry).champion()
    if champion is None or not champion.table:
        raise SystemExit(f"no champion with a table in {root}: run `mnemo demo` there first")
    rows = open_table(connect(ws), ws, champion.table).search().select(["class", VECTOR]).limit(None).to_arrow()
    vectors = unit(np.asarray(rows[VECTOR].combine_chunks().flatten(), np.float32).reshape(rows.num_rows, -1))
    classes = np.asarray(rows["class"].to_pylist())
    sims = vectors @ vectors.T
    same = classes[:, None] == classes[None, :]
    off_diagonal = ~np.eye(len(classes), dtype=bool)
    _, sizes = np.unique(classes, return_counts=True)
    return {
        "workspace_version": champion.version,
        "rows": int(rows.num_rows),
        "dim": int(vectors.shape[1]),
        "intra_class_cosine": round(float(sims[same & off_diagonal].mean()), 4),
        "inter_class_cosine": round(float(sims[~same].mean()), 4),
        "median_class_size": int(np.median(sizes)),
    }


def calibrated(n: int, seed: int, stats: dict, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors whose same-class cosine is about intra and other-class cosine about inter.

    Centre c_j = a g + sqrt(1 - a^2) z_j (g one shared direction, z_j random unit vectors nearly
    orthogonal in 128-d), member = b c_j + sqrt(1 - b^2) e: same-class cosine ~ b^2, other-class
    ~ b^2 a^2, so b^2 = intra and a^2 = inter / intra.
    """
    rng = np.random.default_rng(seed)
    b = np.sqrt(np.clip(stats["intra_class_cosine"], 0.01, 0.99))
    labels = rng.integers(0, len(centres), n)
    noise = unit(rng.standard_normal((n, DIM), np.float32))
    return unit(b * centres[labels] + np.sqrt(1 - b**2) * noise), labels


def calibrated_centres(classes: int, seed: int, stats: dict) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.sqrt(np.clip(stats["inter_class_cosine"] / stats["intra_class_cosine"], 0.0, 0.99))
    shared = unit(rng.standard_normal((1, DIM), np.float32))
    return unit(a * shared + np.sqrt(1 - a**2) * unit(rng.standard_normal((classes, DIM), np.float32)))


def saved_calibration(path: Path) -> dict:
    """The champion statistics an earlier run measured (its JSON's `calibration`), without what it drew."""
    return {k: v for k, v in json.loads(path.read_text())["calibration"].items() if k != "drawn"}


def measured_cosines(vectors: np.ndarray, labels: np.ndarray, sample: int = 4000) -> dict:
    pick = np.random.default_rng(0).choice(len(vectors), min(sample, len(vectors)), replace=False)
    sims, same = vectors[pick] @ vectors[pick].T, labels[pick][:, None] == labels[pick][None, :]
    return {
        "intra_class_cosine": round(float(sims[same & ~np.eye(len(pick), dtype=bool)].mean()), 4),
        "inter_class_cosine": round(float(sims[~same].mean()), 4),
    }


# --- search -----------------------------------------------------------------------------------


def exact_top(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    out = []
    for lo in range(0, len(queries), 100):
        scores = queries[lo : lo + 100] @ vectors.T
        out.append(np.argpartition(-scores, K, axis=1)[:, :K])
    return np.concatenate(out)


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth)])), 4)


def rows_of(vectors: np.ndarray, offset: int) -> pa.Table:
    ids = [str(i) for i in range(offset, offset + len(vectors))]
    return pa.table(
        {
            "id": ids,
            "class": ids,
            "arrival": ["bench"] * len(ids),
            "role": ["train"] * len(ids),
            VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        },
        schema=table_schema(DIM),
    )


def lance_table(ws, name: str, vectors: np.ndarray, index_params, ann: bool = True):
    db = connect(ws)
    tbl = db.create_table(name, schema=table_schema(DIM))
    for lo in range(0, len(vectors), 100_000):
        tbl.add(rows_of(vectors[lo : lo + 100_000], lo))
    if not ann:
        return tbl
    before, start = rss_mb(), time.perf_counter()
    ensure_ann_index(tbl, index_params.model_copy(update={"ann_min_rows": 256}))
    build = time.perf_counter() - start
    start = time.perf_counter()
    tuned = tune_ef(tbl, index_params)  # as build_table does: the ef that meets the recall floor on stored vectors
    [stats] = vector_indices(tbl)
    return tbl, {
        "build_seconds": round(build, 1),
        "ef_tuning": None
        if tuned is None
        else {"ef": tuned[0], "recall_on_stored": round(tuned[1], 4), "seconds": round(time.perf_counter() - start, 1)},
        "index_mb": round(stats.size_bytes / 2**20, 1) if stats.size_bytes else None,
        "build_rss_growth_mb": round(rss_mb() - before, 1),
    }


class Engine:
    """One way to answer a query vector with the ids of its 10 nearest rows."""

    def __init__(self, name: str, search, info: dict) -> None:
        self.name, self.search, self.info = name, search, info
        self.ms: list[float] = []
        self.found: list[list[int]] = []


def lancedb_engines(ws, name: str, index_params, loop: AsyncLoop, label: str) -> list[Engine]:
    reader = TableReader.open(ws, name, loop, index_params)

    async def opened():
        import lancedb

        return await (await lancedb.connect_async(ws.lancedb_uri)).open_table(name)

    raw_table = loop.run(opened())
    index_params = with_table_settings(loop.run(raw_table.schema()), index_params)  # the ef the build chose

    async def raw(vector: np.ndarray) -> list[int]:
        q = raw_table.vector_search(vector).distance_type("cosine").nprobes(index_params.ann_nprobes)
        if index_params.ann_type == "IVF_HNSW_SQ":
            q = q.ef(index_params.ann_ef)
        if index_params.ann_refine_factor:
            q = q.refine_factor(index_params.ann_refine_factor)
        return [int(i) for i in (await q.limit(K).select(["id", "_distance"]).to_arrow())["id"].to_pylist()]

    settings = {
        "ann_type": index_params.ann_type,
        "nprobes": index_params.ann_nprobes,
        "ef": index_params.ann_ef if index_params.ann_type == "IVF_HNSW_SQ" else None,
        "refine_factor": index_params.ann_refine_factor,
    }
    return [
        Engine(f"raw LanceDB, {label}", lambda v: loop.run(raw(v)), settings),
        Engine(
            f"mnemo read path (TableReader), {label}",
            lambda v: [int(h["id"]) for h in reader.search(v[None], K)[0]],
            settings,
        ),
    ]


def graph_engine(ws, name: str, params: Params) -> tuple[Engine, ServingGraph]:
    """mnemo's serving graph (serve.search: graph), built from the table as a service replica builds it."""
    before = rss_mb()
    graph = ServingGraph.build(ws, name, params.serve.model_copy(update={"search": "graph"}), params.index)
    info = {
        "M": params.serve.graph_m,
        "efConstruction": params.serve.graph_ef_construction,
        "ef": graph.stats.ef,
        "recall_on_stored": round(graph.stats.recall_at_10 or 1.0, 4),
        "build_seconds": round(graph.stats.build_seconds, 1),
        "build_rss_growth_mb": round(rss_mb() - before, 1),
    }
    engine = Engine(
        "mnemo serving graph (ServingGraph)", lambda v: [int(h["id"]) for h in graph.search(v[None], K)[0]], info
    )
    return engine, graph


def faiss_engine(vectors: np.ndarray) -> Engine:
    import faiss

    before, start = rss_mb(), time.perf_counter()
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(vectors)
    index.hnsw.efSearch = 128
    info = {
        "M": 32,
        "efSearch": 128,
        "build_seconds": round(time.perf_counter() - start, 1),
        "build_rss_growth_mb": round(rss_mb() - before, 1),
    }
    return Engine("faiss IndexHNSWFlat (bench peer)", lambda v: index.search(v[None], K)[1][0].tolist(), info)


def hnswlib_engine(vectors: np.ndarray) -> Engine:
    import hnswlib

    before, start = rss_mb(), time.perf_counter()
    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=len(vectors), M=16, ef_construction=100)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(50)
    info = {
        "M": 16,
        "ef": 50,
        "build_seconds": round(time.perf_counter() - start, 1),
        "build_rss_growth_mb": round(rss_mb() - before, 1),
    }
    return Engine("hnswlib (bench peer)", lambda v: index.knn_query(v[None], k=K)[0][0].tolist(), info)


def run_alternating(engines: list[Engine], queries: np.ndarray) -> None:
    for engine in engines:
        for q in queries[:5]:  # warm caches the first queries would pay for
            engine.search(q)
        engine.ms, engine.found = [], []
    for i, q in enumerate(queries):
        for engine in engines[i % len(engines) :] + engines[: i % len(engines)]:
            start = time.perf_counter()
            found = engine.search(q)
            engine.ms.append((time.perf_counter() - start) * 1000)
            engine.found.append(found)


def bench_vector_set(
    label: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    params: Params,
    tmp: Path,
    loop: AsyncLoop,
    *,
    previous_default: bool,
    peers: bool,
    lance: bool = True,
) -> dict:
    ws = resolve_workspace(params, tmp / label)
    truth = exact_top(vectors, queries)
    if lance:
        tbl, built = lance_table(ws, "shipped", vectors, params.index)
        engines = lancedb_engines(ws, "shipped", params.index, loop, f"{params.index.ann_type} as shipped")
    else:  # the table the serving graph reads, without LanceDB's own index (its build takes minutes)
        tbl, built = lance_table(ws, "shipped", vectors, params.index, ann=False), None
        engines = []
    builds = {"shipped": built}
    if previous_default:
        previous = params.index.model_copy(
            update={"ann_type": "IVF_PQ", "ann_partitions": None, "ann_nprobes": 40, "ann_refine_factor": 10}
        )
        _, builds["previous"] = lance_table(ws, "previous", vectors, previous)
        engines += lancedb_engines(ws, "previous", previous, loop, "IVF_PQ as shipped before")
    served, graph = graph_engine(ws, "shipped", params)
    engines.append(served)
    if peers:
        engines += [faiss_engine(vectors), hnswlib_engine(vectors)]
    run_alternating(engines, queries)
    table = [
        {
            "engine": e.name,
            "p50_ms": pct(e.ms, 50),
            "p99_ms": pct(e.ms, 99),
            "recall_at_10": recall(e.found, truth),
            **e.info,
        }
        for e in engines
    ]
    del engines

    # Hot adds: 1% more rows, searched exactly beside the index until optimize folds them in.
    extra = synthetic(len(vectors) // 100, 7, vectors[:: max(1, len(vectors) // 1000)])
    start = time.perf_counter()
    tbl.add(rows_of(extra, len(vectors)))
    added = time.perf_counter() - start
    grown_truth = exact_top(np.concatenate([vectors, extra]), queries)
    hot = {"rows_added": len(extra), "append_seconds": round(added, 2)}
    start = time.perf_counter()
    graph.catch_up()  # what each replica's refresh does
    hot["graph_catch_up_seconds"] = round(time.perf_counter() - start, 2)
    grown = Engine("graph", served.search, {})
    run_alternating([grown], queries)
    hot["graph"] = {
        "p50_ms": pct(grown.ms, 50),
        "p99_ms": pct(grown.ms, 99),
        "recall_at_10": recall(grown.found, grown_truth),
    }
    del graph, served, grown
    for stage in ("before_optimize", "after_optimize") if lance else ():
        if stage == "after_optimize":
            start = time.perf_counter()
            tbl.optimize()
            hot["optimize_seconds"] = round(time.perf_counter() - start, 1)
        [reader] = [e for e in lancedb_engines(ws, "shipped", params.index, loop, "") if "mnemo" in e.name]
        run_alternating([reader], queries)
        hot[stage] = {
            "p50_ms": pct(reader.ms, 50),
            "p99_ms": pct(reader.ms, 99),
            "recall_at_10": recall(reader.found, grown_truth),
        }
    return {"rows": len(vectors), "queries": len(queries), "builds": builds, "engines": table, "hot_add": hot}


# --- HTTP -------------------------------------------------------------------------------------


def http_workspace(params: Params, root: Path) -> tuple[object, bytes]:
    """200 stored PNGs, one registered model as champion with its validated table; a query PNG."""
    from PIL import Image

    ws = resolve_workspace(params, root)
    rng = np.random.default_rng(0)
    records = []
    from components.data.catalog import ImageRecord

    for i in range(200):
        cls = f"c{i // 20}"
        (ws.classes_dir / cls).mkdir(parents=True, exist_ok=True)
        name = f"{cls}/{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ws.classes_dir / name)
        records.append(ImageRecord(id=name, cls=cls, arrival="bench", role="train"))
    torch.manual_seed(0)
    model = build_embedder(params.model).eval()
    registry = ModelRegistry(ws, params.registry)
    tags = {"gate_verdict": "promote", "index_smoke_test": "passed"}
    version = registry.log_candidate(
        model, params={}, metrics={}, epoch_metrics={}, arrivals=["bench"], tags=tags
    ).version
    registry.set_tag(version, TABLE_TAG, build_table(ws, params.index, version, model, records).table)
    registry.client.set_registered_model_alias(registry.name, CHAMPION, version)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return ws, buf.getvalue()


def parts_alone(params: Params, ws, png: bytes, n: int) -> dict:
    """The model forward of one decoded image in each serve.runtime (PyTorch as trained, PyTorch in
    NHWC, ONNX Runtime), taking turns in blocks of calls, 4 images in one forward, and one search
    of the champion's table (the serving graph or LanceDB, as serve.search says)."""
    import copy

    from PIL import Image

    from components.modeling.runtime import make_forward
    from components.serving.live import LiveIndex

    pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=3600, graph=params.serve).current()
    forwards = {runtime: make_forward(copy.deepcopy(pair.model), runtime) for runtime in RUNTIMES}
    for runtime, forward in forwards.items():  # a refused export would time PyTorch under ONNX Runtime's name
        assert forward.runtime == runtime, f"{runtime} fell back to {forward.runtime} (see the log)"
    image = Image.open(io.BytesIO(png)).convert("RGB")
    vector = embed_images(pair.model, [image])
    times: dict[str, list[float]] = {name: [] for name in [*forwards, "search"]}
    # Runtimes take turns in blocks of 20 calls (the first 2 of each not timed), so load hits them
    # alike while one runtime's idle threads do not slow the next one's first calls.
    for _ in range(max(1, n // 18)):
        for name, forward in forwards.items():
            for call in range(20):
                start = time.perf_counter()
                forward([image])
                if call >= 2:
                    times[name].append((time.perf_counter() - start) * 1000)
        for _ in range(20):
            start = time.perf_counter()
            pair.nearest(vector, 5)
            times["search"].append((time.perf_counter() - start) * 1000)
    out = {f"forward_{name}_p50_ms": pct(values, 50) for name, values in times.items() if name != "search"}
    for name, forward in forwards.items():
        start = time.perf_counter()
        for _ in range(n // 4):
            forward([image] * 4)
        out[f"forward_of_4_{name}_mean_ms"] = round((time.perf_counter() - start) * 1000 / max(1, n // 4), 2)
    return out | {"search_p50_ms": pct(times["search"], 50)}


def serve_process(cmd: list[str], cwd: Path, env: dict, log: Path, url: str) -> subprocess.Popen:
    server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    import httpx

    deadline = time.monotonic() + 240
    while True:
        if server.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            server.terminate()
            raise SystemExit(f"{' '.join(cmd)} never became healthy")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def http_load(url: str, png: bytes, n_single: int, seconds: float) -> dict:
    import httpx

    single = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n_single + 5):
            start = time.perf_counter()
            r = client.post("/query", files=[("image", ("q.png", png, "image/png"))], data={"k": "5"})
            r.raise_for_status()
            if i >= 5:
                single.append((time.perf_counter() - start) * 1000)
    done = [0] * 4
    stop = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                client.post(
                    "/query", files=[("image", ("q.png", png, "image/png"))], data={"k": "5"}
                ).raise_for_status()
                done[i] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "one_client_p50_ms": pct(single, 50),
        "one_client_p99_ms": pct(single, 99),
        "four_clients_rps": round(sum(done) / (time.perf_counter() - start), 1),
    }


def bench_http(params: Params, tmp: Path, args) -> dict:
    ws, png = http_workspace(params, tmp / "http")
    parts = parts_alone(params, ws, png, args.http_requests)
    env = service_env()
    variants: list[tuple[str, Path, Params | None, list[str]]] = [
        (f"mnemo serve ({runtime})", REPO, with_overrides(params, {"serve.runtime": runtime}), [])
        for runtime in (params.serve.runtime, *(r for r in RUNTIMES if r != params.serve.runtime))
    ]
    variants.append((f"mnemo serve ({params.serve.runtime}) --workers 2", REPO, params, ["--workers", "2"]))
    if args.baseline:
        old = tmp / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-f", str(old), args.baseline],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        variants.append((f"mnemo serve at {args.baseline} (before)", old, None, []))
    rows = []
    try:
        for label, cwd, variant_params, extra in variants:
            params_file = tmp / f"params-{len(rows)}.yaml"
            if variant_params is None:  # the old code reads its own params.yaml
                params_file.write_text((cwd / "params.yaml").read_text())
            else:
                params_file.write_text(yaml.safe_dump(variant_params.model_dump(mode="json")))
            port = free_port()
            cmd = serve_command(ws.root, params_file, port, *extra)
            server = serve_process(
                cmd, cwd, env | {"PYTHONPATH": str(cwd)}, tmp / f"serve-{len(rows)}.log", f"http://127.0.0.1:{port}"
            )
            try:
                rows.append(
                    {
                        "service": label,
                        **http_load(f"http://127.0.0.1:{port}", png, args.http_requests, args.http_seconds),
                    }
                )
            finally:
                server.terminate()
                server.wait(timeout=60)
    finally:
        if args.baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "baseline")], cwd=REPO, check=False)
    return {"parts_alone": parts, "services": rows}


# --- report -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--parts", default="search,http")
    ap.add_argument(
        "--sets", default="synthetic,calibrated", help="vector sets to search (calibrated needs --calibrate)"
    )
    ap.add_argument(
        "--calibrate",
        type=Path,
        help="a workspace with a champion (e.g. after `mnemo demo`), or an earlier run's JSON to reuse its statistics",
    )
    ap.add_argument("--previous-default", action="store_true", help="also IVF_PQ as mnemo shipped it before")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip faiss and hnswlib")
    ap.add_argument(
        "--no-lance", dest="lance", action="store_false", help="skip LanceDB's own index and engines (minutes to build)"
    )
    ap.add_argument("--baseline", help="a git ref whose `mnemo serve` is measured beside this one")
    ap.add_argument("--http-requests", type=int, default=200)
    ap.add_argument("--http-seconds", type=float, default=20.0)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    params = load_params(args.params)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    report: dict = {
        "date": date.today().isoformat(),
        "command": command_line("query"),
        "cores": os.cpu_count(),
        "load_average_at_start": load_average(),
        "targets": TARGETS,
        "index_params": params.index.model_dump(),
        "serve_params": params.serve.model_dump(),
    }
    loop = AsyncLoop()
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-query-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "search" in args.parts:
            rng = np.random.default_rng(0)
            centres = unit(rng.standard_normal((max(args.rows // 100, 10), DIM), np.float32))
            sets = {}
            if "synthetic" in args.sets:
                sets["synthetic"] = (synthetic(args.rows, 1, centres), synthetic(args.queries, 2, centres))
            if args.calibrate and "calibrated" in args.sets:
                stats = (
                    saved_calibration(args.calibrate)
                    if args.calibrate.suffix == ".json"
                    else champion_statistics(args.calibrate, params)
                )
                classes = max(args.rows // stats["median_class_size"], 10)
                centres = calibrated_centres(classes, 3, stats)
                vectors, labels = calibrated(args.rows, 4, stats, centres)
                stats["drawn"] = measured_cosines(vectors, labels)
                report["calibration"] = stats
                sets["calibrated"] = (vectors, calibrated(args.queries, 5, stats, centres)[0])
            report["search"] = {}
            for label, (vectors, queries) in sets.items():
                print(f"search: {label}, {len(vectors)} rows", file=sys.stderr, flush=True)
                # The previous default on the first set only (its build takes minutes); peers on every set.
                first = label == "synthetic"
                report["search"][label] = bench_vector_set(
                    label,
                    vectors,
                    queries,
                    params,
                    tmp,
                    loop,
                    previous_default=args.previous_default and first,
                    peers=args.peers,
                    lance=args.lance,
                )
                print(json.dumps(report["search"][label]["engines"], indent=1), file=sys.stderr, flush=True)
        if "http" in args.parts:
            print("http", file=sys.stderr, flush=True)
            report["http"] = bench_http(params, tmp, args)
    loop.close()
    report["verdict"] = verdict(report)
    write_run(args.out / f"{report['date']}-query", report, markdown(report))
    print(json.dumps(report, indent=1))
    print(markdown(report))


def verdict(report: dict) -> dict:
    out: dict = {}
    served = "mnemo serving graph" if report["serve_params"]["search"] == "graph" else "mnemo read path"
    for label, result in report.get("search", {}).items():
        shipped = next(e for e in result["engines"] if e["engine"].startswith(served))
        out[f"{label}_p99_ms"] = shipped["p99_ms"]
        out[f"{label}_recall_at_10"] = shipped["recall_at_10"]
        out[f"{label}_met"] = (
            shipped["p99_ms"] < TARGETS["p99_ms"] and shipped["recall_at_10"] >= TARGETS["recall_at_10"]
        )
    if "http" in report:
        parts = report["http"]["parts_alone"]
        services = {s["service"]: s for s in report["http"]["services"]}
        runtime = report["serve_params"]["runtime"]
        ours = services[f"mnemo serve ({runtime})"]
        # The yardstick: the model's forward as trained (PyTorch) plus the search; and the
        # stricter one, the forward in the runtime the service itself uses.
        out["http_p50_over_parts"] = round(
            ours["one_client_p50_ms"] / (parts["forward_torch_p50_ms"] + parts["search_p50_ms"]), 2
        )
        out["http_p50_over_own_runtime_parts"] = round(
            ours["one_client_p50_ms"] / (parts[f"forward_{runtime}_p50_ms"] + parts["search_p50_ms"]), 2
        )
        before = [s for name, s in services.items() if "(before)" in name]
        if before:
            out["rps_4_clients_over_baseline"] = round(ours["four_clients_rps"] / before[0]["four_clients_rps"], 2)
    return out


ENGINE_COLUMNS = ("engine", "p50_ms", "p99_ms", "recall_at_10", "build_seconds")  # the rest go to notes


def markdown(report: dict) -> str:
    lines = [
        f"# Query benchmark {report['date']}",
        "",
        f"`{report['command']}`; {report['cores']} cores, load at start {report['load_average_at_start']}.",
        "",
    ]
    if "calibration" in report:
        lines += [f"Calibration (champion table of the demo workspace): {json.dumps(report['calibration'])}", ""]
    for label, result in report.get("search", {}).items():
        lines += [
            f"## Search, {label} vectors ({result['rows']} rows, {result['queries']} single queries, engines alternated)",
            "",
            markdown_table(
                ["engine", "p50 ms", "p99 ms", "recall@10", "build s", "notes"],
                (
                    [
                        *(e[k] for k in ("engine", "p50_ms", "p99_ms", "recall_at_10")),
                        e.get("build_seconds", ""),
                        json.dumps({k: v for k, v in e.items() if k not in ENGINE_COLUMNS}),
                    ]
                    for e in result["engines"]
                ),
            ),
            "",
            f"LanceDB builds: {json.dumps(result['builds'])}",
            "",
            f"Hot adds: {json.dumps(result['hot_add'])}",
            "",
        ]
    if "http" in report:
        parts = report["http"]["parts_alone"]
        lines += [
            "## HTTP path (one 48 px PNG per request, k 5)",
            "",
            "Alone, p50 ms: model forward of one image "
            + ", ".join(f"{k[8:-7]} {v}" for k, v in parts.items() if k.startswith("forward_") and "of_4" not in k)
            + "; 4 images in one forward (mean) "
            + ", ".join(f"{k[13:-8]} {v}" for k, v in parts.items() if k.startswith("forward_of_4"))
            + f"; search {parts['search_p50_ms']}.",
            "",
            markdown_table(
                ["service", "1 client p50 ms", "1 client p99 ms", "4 clients req/s"],
                (
                    [s[k] for k in ("service", "one_client_p50_ms", "one_client_p99_ms", "four_clients_rps")]
                    for s in report["http"]["services"]
                ),
            ),
            "",
        ]
    lines += [
        "## Verdict",
        "",
        f"targets: {json.dumps(report['targets'])}",
        "",
        f"{json.dumps(report['verdict'], indent=1)}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
