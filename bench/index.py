"""Index benchmark: re-index against bare inference, LanceDB writes, query latency with and
without the ANN index, ANN recall, and the time of a swap and a rollback of the live pair.

Everything runs in a temporary workspace (real LanceDB and MLflow, nothing downloaded):

- re-index: `build_table` (embed, write in chunks, compact, validate, mark) over N stored
  images, in this process and through the Dask re-index flow (a LocalCluster of 1 and 2
  workers, flows/reindex.py), against the fastest of three bare loops of decode + forward of
  the same model on the same images (one thread; a decode thread pool; DataLoader worker
  processes, one per core), alternated twice in one run; ratios compare the better of each;
- latency: seeded synthetic 128-d vectors shaped like class embeddings (unit vectors around
  one centre per 100 rows, cosine to the centre ~0.74), one table per size, queried one
  vector at a time through the service's search path (`TableReader`, params.yaml's
  nprobes and refine_factor), exact scan first, then with the ANN index; recall@10 is
  against exact cosine neighbours computed with numpy; other nprobes on the same index
  show the recall/latency trade;
- swap: `Promoter.promote` + `LiveIndex.refresh` until readers hold the new pair
  (cold: the new model is loaded; warm: cached), and `Promoter.rollback` + refresh; then
  as clients see it: `mnemo serve` in its own process, the alias moved, and the time until
  the first HTTP answer names the new version (median and max over 10 swaps).

    python bench/index.py --parts swap     # the swap part alone

    python -m bench.index --out bench/results/<date>-index.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bench.common import REPO, load_average, markdown_table, pct, write_json
from bench.serving import free_port, serve_command, service_env
from components.config import Params, load_params
from components.data.catalog import ImageRecord
from components.data.transforms import open_rgb
from components.modeling.embedder import Embedder, build_embedder, embed_files, embed_images
from components.registry.mlflow_registry import CHAMPION, TABLE_TAG, ModelRegistry
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex
from components.vectors.ann import ensure_ann_index
from components.vectors.build import build_table
from components.vectors.search import AsyncLoop, TableReader
from components.vectors.tables import VECTOR, connect, table_schema
from components.workspace import resolve_workspace

DIM = 128
TARGETS = {
    "reindex_vs_bare_ratio": 0.9,
    "ann_recall_at_10": 0.95,
    "p99_ms_at_1m": 10.0,
    "swap_seconds": 1.0,
    "rollback_seconds": 1.0,
    "http_swap_max_seconds": 1.0,
}


def write_images(root: Path, n: int, size: int, seed: int) -> list[ImageRecord]:
    """n distinct PNGs under root/<class>/, 20 per class, as the catalog would list them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        cls = f"c{i // 20:05d}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / cls / f"{i:07d}.png")
        records.append(ImageRecord(id=f"{cls}/{i:07d}.png", cls=cls, arrival="bench", role="train"))
    return records


def bare_serial(model: Embedder, root: Path, records: list[ImageRecord], batch_size: int) -> float:
    """Images/s of decode + transform + forward in one thread, nothing stored (mnemo's path before issue 15)."""
    start = time.perf_counter()
    embed_images(model, (open_rgb(root / r.id) for r in records), batch_size=batch_size)
    return len(records) / (time.perf_counter() - start)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[i]))


@torch.inference_mode()
def bare_dataloader(model: Embedder, root: Path, records: list[ImageRecord], batch_size: int) -> float:
    """Images/s of a bare loop with decode in DataLoader worker processes (one per core), nothing stored."""
    from components.data.transforms import eval_transform

    dataset = _Files([root / r.id for r in records], eval_transform(model.image_size, model.mean, model.std))
    # spawn: a forked child of this process (LanceDB's runtime, Prefect's threads) is not safe
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=os.cpu_count() or 1, multiprocessing_context="spawn"
    )
    batches = iter(loader)
    first = next(batches)  # the clock starts once the workers are up (their start-up is not decoding)
    start, done = time.perf_counter(), 0
    model(first)
    for x in batches:
        model(x)
        done += len(x)
    return (done + len(first)) / (time.perf_counter() - start + 1e-9) if done else float("nan")


def bare_threads(model: Embedder, root: Path, records: list[ImageRecord], batch_size: int) -> float:
    """Images/s of a bare loop with decode on a thread pool one batch ahead (embed_files), nothing stored."""
    start = time.perf_counter()
    embed_files(model, [root / r.id for r in records], batch_size=batch_size)
    return len(records) / (time.perf_counter() - start)


BARE = {"serial": bare_serial, "threads": bare_threads, "dataloader": bare_dataloader}


def bench_reindex(params: Params, tmp: Path, n_images: int, dask_workers: list[int]) -> dict:
    """Re-index (this process; Dask with 1 and 2 workers) against the fastest bare loop, alternated."""
    from flows.reindex import dask_writer

    ws = resolve_workspace(params, tmp / "reindex")
    records = write_images(ws.classes_dir, n_images, 64, seed=0)
    torch.manual_seed(0)
    model = build_embedder(params.model).eval()
    bare: dict[str, list[float]] = {name: [] for name in BARE}
    built: dict[str, list[float]] = {"process": [], **{f"dask_{w}": [] for w in dask_workers}}
    version = 0
    for round_ in range(2):  # alternated, so drifting load on a shared machine hits every engine alike
        for name, loop in BARE.items():
            bare[name].append(loop(model, ws.classes_dir, records, params.index.batch_size))
        for engine in built:
            version += 1
            write = None
            if engine.startswith("dask"):
                write = dask_writer(ws, params.index.model_copy(update={"dask_workers": int(engine.split("_")[1])}))
            result = build_table(ws, params.index, str(version), model, records, write=write)
            assert result.probes_ok and result.rows == n_images
            built[engine].append(n_images / result.seconds)
        print(
            f"  round {round_}: bare "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in bare.items())
            + " img/s; re-index "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in built.items())
            + " img/s",
            file=sys.stderr,
        )
    best_bare = max(max(v) for v in bare.values())
    return {
        "images": n_images,
        "image_size": 64,
        "model": params.model.backbone,
        "model_image_size": params.model.image_size,
        "batch_size": params.index.batch_size,
        "write_rows": params.index.write_rows,
        "probes": params.index.probes,
        "bare_images_per_s": {k: [round(x, 1) for x in v] for k, v in bare.items()},
        "bare_baseline": max(bare, key=lambda k: max(bare[k])),
        "reindex_images_per_s": {k: [round(x, 1) for x in v] for k, v in built.items()},
        "ratio": round(max(built["process"]) / best_bare, 3),
        "ratios": {k: round(max(v) / best_bare, 3) for k, v in built.items()},
    }


def class_like(n: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, DIM), dtype=np.float32) * (
        0.9 / np.sqrt(DIM)
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    scores = queries @ vectors.T
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)


def latencies(reader: TableReader, queries: np.ndarray) -> tuple[list[float], list[list[str]]]:
    """Per-query milliseconds through the live pair's search path (TableReader), and the ids found."""
    times, found = [], []
    reader.search(queries[:3], 10)  # warm the caches the first queries would pay for
    for q in queries:
        start = time.perf_counter()
        [hits] = reader.search(q[None], 10)
        times.append((time.perf_counter() - start) * 1000)
        found.append([h["id"] for h in hits])
    return times, found


def bench_size(
    params: Params, tmp: Path, loop: AsyncLoop, n: int, n_queries: int, n_flat: int, sweep_nprobes: list[int]
) -> dict:
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((max(n // 100, 10), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = class_like(n, 1, centres)
    queries = class_like(n_queries, 2, centres)
    ids = [f"v{i}" for i in range(n)]
    ws = resolve_workspace(params, tmp / f"size-{n}")
    db = connect(ws)
    tbl = db.create_table("bench", schema=table_schema(DIM))
    start = time.perf_counter()
    for lo in range(0, n, 100_000):
        chunk = vectors[lo : lo + 100_000]
        tbl.add(
            pa.table(
                {
                    "id": ids[lo : lo + len(chunk)],
                    "class": ids[lo : lo + len(chunk)],
                    "arrival": ["bench"] * len(chunk),
                    "role": ["train"] * len(chunk),
                    VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), DIM),
                },
                schema=table_schema(DIM),
            )
        )
    write = n / (time.perf_counter() - start)
    truth = exact_top10(vectors, queries)
    reader = TableReader.open(ws, "bench", loop, params.index)
    flat_ms, flat_found = latencies(reader, queries[:n_flat])
    flat_recall = np.mean([len(set(f) & {ids[j] for j in t}) / 10 for f, t in zip(flat_found, truth)])
    start = time.perf_counter()
    ann = ensure_ann_index(tbl, params.index.model_copy(update={"ann_min_rows": 256}))
    build = time.perf_counter() - start
    reader = TableReader.open(ws, "bench", loop, params.index)  # a fresh handle sees the index
    ann_ms, ann_found = latencies(reader, queries)
    recall = np.mean([len(set(f) & {ids[j] for j in t}) / 10 for f, t in zip(ann_found, truth)])
    sweep = []
    for nprobes in sweep_nprobes:  # the same index searched wider or narrower: the recall/latency trade
        ms, found = latencies(replace(reader, params=params.index.model_copy(update={"ann_nprobes": nprobes})), queries)
        sweep.append(
            {
                "nprobes": nprobes,
                "p50_ms": pct(ms, 50),
                "p99_ms": pct(ms, 99),
                "ann_recall_at_10": round(
                    float(np.mean([len(set(f) & {ids[j] for j in t}) / 10 for f, t in zip(found, truth)])), 4
                ),
            }
        )
    row = {
        "rows": n,
        "write_rows_per_s": round(write),
        "flat_queries": n_flat,
        "flat_p50_ms": pct(flat_ms, 50),
        "flat_p99_ms": pct(flat_ms, 99),
        "flat_recall_at_10": round(float(flat_recall), 4),
        "ann_index": ann,
        "index_build_seconds": round(build, 1),
        "queries": n_queries,
        "p50_ms": pct(ann_ms, 50),
        "p99_ms": pct(ann_ms, 99),
        "ann_recall_at_10": round(float(recall), 4),
        "nprobes": params.index.ann_nprobes,
        "sweep": sweep,
        "production_uses_ann": n >= params.index.ann_min_rows,
    }
    db.drop_table("bench")
    return row


def bench_swap(params: Params, tmp: Path, rounds: int) -> dict:
    """promote + refresh (cold, then warm) and rollback + refresh, as a reader sees them."""
    ws = resolve_workspace(params, tmp / "swap")
    records = write_images(ws.classes_dir, 200, 64, seed=1)
    registry = ModelRegistry(ws, params.registry)
    promoter = Promoter(ws, params.registry, params.index)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_embedder(params.model).eval()
        gated = {"gate_verdict": "promote", "index_smoke_test": "passed"}  # as the retrain flow tags what it promotes
        version = registry.log_candidate(
            model, params={"seed": seed}, metrics={}, epoch_metrics={}, arrivals=["bench"], tags=gated
        ).version
        registry.set_tag(version, TABLE_TAG, build_table(ws, params.index, version, model, records).table)
    registry.client.set_registered_model_alias(registry.name, CHAMPION, "1")  # the first champion
    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=3600)
    assert live.refresh().version == "1"
    swaps, rollbacks, alias_moves = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        promoter.promote("2", reason="bench")
        moved = time.perf_counter()
        assert live.refresh().version == "2"
        swaps.append(time.perf_counter() - start)
        alias_moves.append(moved - start)
        start = time.perf_counter()
        promoter.rollback(reason="bench")
        assert live.refresh().version == "1"
        rollbacks.append(time.perf_counter() - start)
    http = bench_http_swap(params, ws, tmp, promoter, rounds=10)
    return {
        "rounds": rounds,
        "http": http,
        "swap_cold_seconds": round(swaps[0], 3),
        "swap_warm_seconds": round(statistics.median(swaps[1:]), 3) if rounds > 1 else None,
        "rollback_seconds_all": [round(x, 3) for x in rollbacks],
        "alias_move_seconds": round(statistics.median(alias_moves), 3),
        "swap_seconds": round(swaps[0], 3),
        "rollback_seconds": round(statistics.median(rollbacks), 3),
    }


def bench_http_swap(params: Params, ws, tmp: Path, promoter: Promoter, rounds: int) -> dict:
    """Swap time as clients see it: `mnemo serve` in its own process, the alias moved here, then
    the time until the first HTTP answer names the new version (GET /live, polled every 5 ms)."""
    import subprocess

    import httpx
    import yaml

    params_file = tmp / "swap-params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    port = free_port()
    env = service_env()
    cmd = serve_command(ws.root, params_file, port)
    log = tmp / "serve.log"
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"

    def serving() -> str | None:
        try:
            return httpx.get(f"{url}/live", timeout=5).json().get("model_version")
        except (httpx.HTTPError, ValueError):
            return None

    def until(version: str, limit: float = 30.0) -> float:
        start = time.perf_counter()
        while serving() != version:
            if server.poll() is not None:
                raise SystemExit(f"mnemo serve exited ({server.returncode}):\n{log.read_text()[-3000:]}")
            if time.perf_counter() - start > limit:
                raise SystemExit(f"the service never answered with v{version} within {limit} s")
            time.sleep(0.005)
        return time.perf_counter() - start

    try:
        until(promoter.registry.champion().version, limit=180)  # started, answering with the champion
        seconds = []
        for i in range(rounds):
            target = "2" if i % 2 == 0 else "1"
            if target == "2":
                promoter.promote("2", reason="bench: swap through HTTP")
            else:
                promoter.rollback(reason="bench: swap through HTTP")
            seconds.append(until(target))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "refresh_seconds": params.serve.refresh_seconds,
        "swaps": rounds,
        "median_seconds": round(statistics.median(seconds), 3),
        "max_seconds": round(max(seconds), 3),
        "all_seconds": [round(x, 3) for x in seconds],
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--images", type=int, default=2000, help="stored images for the re-index comparison")
    ap.add_argument("--dask-workers", type=int, nargs="*", default=[1, 2], help="LocalCluster sizes to re-index with")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=300, help="ANN queries per size")
    ap.add_argument("--flat-queries", type=int, default=50, help="exact-scan queries per size (slow at 1M)")
    ap.add_argument("--swap-rounds", type=int, default=5)
    ap.add_argument(
        "--sweep-nprobes", type=int, nargs="*", default=[10, 20, 80], help="other nprobes to measure per size"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parts", nargs="+", choices=["reindex", "sizes", "swap"], default=["reindex", "sizes", "swap"])
    args = ap.parse_args()

    params = load_params(args.params)
    report: dict = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "index_params": params.index.model_dump(mode="json"),
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-index-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "reindex" in args.parts:
            print("re-index against bare inference ...", file=sys.stderr)
            report["reindex"] = bench_reindex(params, tmp, args.images, args.dask_workers)
            report["reindex_vs_bare_ratio"] = report["reindex"]["ratio"]
        if "sizes" in args.parts:
            report["sizes"] = {}
            loop = AsyncLoop()
            for n in args.sizes:
                print(f"{n} vectors ...", file=sys.stderr)
                report["sizes"][str(n)] = bench_size(
                    params, tmp, loop, n, args.queries, args.flat_queries, args.sweep_nprobes
                )
            report["lancedb_write_rows_per_s"] = max(r["write_rows_per_s"] for r in report["sizes"].values())
        if "swap" in args.parts:
            print("swap and rollback ...", file=sys.stderr)
            report["swap"] = bench_swap(params, tmp, args.swap_rounds)
            report["swap_seconds"] = report["swap"]["swap_seconds"]
            report["rollback_seconds"] = report["swap"]["rollback_seconds"]
            report["http_swap_median_seconds"] = report["swap"]["http"]["median_seconds"]
            report["http_swap_max_seconds"] = report["swap"]["http"]["max_seconds"]
    report["machine"]["load_average_at_end"] = load_average()

    print(json.dumps(report, indent=1))
    print(markdown(report))
    if args.out:
        write_json(args.out, report)


def markdown(report: dict) -> str:
    lines = []
    if "swap" in report:
        h = report["swap"]["http"]
        lines.append(
            f"\nswap through HTTP (`mnemo serve`, refresh {h['refresh_seconds']} s): median {h['median_seconds']} s, "
            f"max {h['max_seconds']} s over {h['swaps']} swaps (target max <= {TARGETS['http_swap_max_seconds']} s)"
        )
    if "reindex" not in report or "sizes" not in report:
        return "\n".join(lines)
    r = report["reindex"]
    bare = max(max(v) for v in r["bare_images_per_s"].values())
    lines += [
        "\nre-index (img/s, best of 2): "
        + ", ".join(f"{k} {max(v):.1f}" for k, v in r["reindex_images_per_s"].items())
        + f" vs the fastest bare loop ({r['bare_baseline']}) {bare:.1f} img/s: ratios {json.dumps(r['ratios'])}; swap {report['swap_seconds']:.3f} s (cold), "
        f"{report['swap']['swap_warm_seconds']} s (warm); rollback {report['rollback_seconds']:.3f} s\n",
        markdown_table(
            [
                "rows",
                "write rows/s",
                "exact p50 ms",
                "exact p99 ms",
                "ANN",
                "index build s",
                "ANN p50 ms",
                "ANN p99 ms",
                "ANN recall@10",
            ],
            (
                [
                    f"{int(n):,}",
                    f"{s['write_rows_per_s']:,}",
                    *(s[k] for k in ("flat_p50_ms", "flat_p99_ms", "ann_index", "index_build_seconds")),
                    *(s[k] for k in ("p50_ms", "p99_ms")),
                    f"{s['ann_recall_at_10']:.3f}",
                ]
                for n, s in report["sizes"].items()
            ),
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
