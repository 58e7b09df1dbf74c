"""How dense must the serving graph be on crowded vectors? Recall@10 against search width.

Draws `--rows` vectors calibrated to a real champion's table as bench/query.py does (class
centres plus isotropic noise, matching the intra- and inter-class cosines of an earlier run's
JSON), builds faiss IndexHNSWFlat graphs of each `--graphs` density (M x efConstruction) on one
thread (`--build-threads` for the build), and measures recall@10 against exact search and single-query p50 latency for efSearch
128 ... 2048 on 300 queries drawn the same way. With `--ivf`, faiss IndexIVFFlat (1024 lists) too.

    python -m bench.graph_density --rows 100000 --graphs 32x80,32x200,64x200 --ivf
    python -m bench.graph_density --rows 300000 --graphs 32x80,64x200
    python -m bench.graph_density --rows 1000000 --graphs 64x200 --build-threads 2

Prints one JSON line per (graph, ef); writes bench/results/<date>-graph-density-<rows>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import faiss

import bench.query as q  # the calibrated draw, exact neighbours, recall
from bench.common import RESULTS, command_line, pct, write_json

QUERIES = 300
EFS = (128, 256, 512, 1024, 2048)


def timed_search(index, queries, truth) -> dict:
    times, found = [], []
    for vector in queries:
        start = time.perf_counter()
        _, ids = index.search(vector[None], q.K)
        times.append((time.perf_counter() - start) * 1000)
        found.append(ids[0].tolist())
    return {"recall_at_10": round(q.recall(found, truth), 3), "p50_ms": round(pct(times, 50), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--graphs", default="32x80,64x200", help="M x efConstruction, comma-separated")
    ap.add_argument("--ivf", action="store_true", help="also faiss IndexIVFFlat, 1024 lists")
    ap.add_argument("--build-threads", type=int, default=1, help="faiss threads while building (searches use one)")
    ap.add_argument("--calibration", type=Path, default=RESULTS / "2026-11-30-query.json")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    stats = q.saved_calibration(args.calibration)
    centres = q.calibrated_centres(max(args.rows // stats["median_class_size"], 10), 3, stats)
    vectors, _ = q.calibrated(args.rows, 4, stats, centres)
    queries = q.calibrated(QUERIES, 5, stats, centres)[0]
    truth = q.exact_top(vectors, queries)
    rows = []
    for m, ef_construction in (tuple(map(int, g.split("x"))) for g in args.graphs.split(",")):
        index = faiss.IndexHNSWFlat(q.DIM, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        faiss.omp_set_num_threads(args.build_threads)
        start, wall = time.process_time(), time.perf_counter()
        index.add(vectors)
        build, build_wall = round(time.process_time() - start, 1), round(time.perf_counter() - wall, 1)
        faiss.omp_set_num_threads(1)
        for ef in EFS:
            index.hnsw.efSearch = ef
            rows.append(
                {"M": m, "efC": ef_construction, "ef": ef, "build_cpu_s": build, "build_wall_s": build_wall}
                | timed_search(index, queries, truth)
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.ivf:
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(q.DIM), q.DIM, 1024, faiss.METRIC_INNER_PRODUCT)
        start = time.process_time()
        ivf.train(vectors[:50_000])
        ivf.add(vectors)
        build = round(time.process_time() - start, 1)
        for nprobe in (16, 32, 64, 128):
            ivf.nprobe = nprobe
            rows.append({"IVFFlat": 1024, "nprobe": nprobe, "build_cpu_s": build} | timed_search(ivf, queries, truth))
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "date": date.today().isoformat(),
        "command": command_line("graph_density"),
        "rows": args.rows,
        "queries": QUERIES,
        "calibration": stats,
        "threads": {"build": args.build_threads, "search": 1},
        "results": rows,
    }
    path = args.out / f"{report['date']}-graph-density-{args.rows}.json"
    write_json(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
