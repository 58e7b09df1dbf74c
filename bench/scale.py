"""Scale benchmark: what one arrival costs when the catalog already holds 10k, 100k or 1M images.

For each size a workspace is made whose catalog already holds N images and whose live table
already holds their N rows, then one 200-image arrival (20 new classes x 10 noise PNGs of
32 px) is ingested and hot-added exactly as `mnemo ingest` does it (ingest_inbox, then
Promoter.catch_up), in a fresh process so its time and peak memory are the arrival's alone.

How the existing N images are made (their files are never read by ingest or a hot add, so
only the arrivals' images are real files); each size gets --repeats arrivals, each in a fresh
process, and the table keeps the medians:
- catalog: N records in classes of 14 ("s<k>/<32 hex>.png"; per class 10 train, 2 query,
  or 14 unseen for one class in four), recorded as one arrival through Catalog.save(),
  i.e. one manifest and the SQLite database, as a migration from registry.json would;
- table: N rows of random unit 128-d vectors with those ids, the id index and the marks a
  build leaves (validated, model version, catalog position), champion of a registered
  random resnet18; ANN index only with --ann (params' ann_type; minutes to build at 1M).

Reference measured in the same run: the one-file registry.json the catalog replaced, at
the same N, loaded and saved once (earlier versions did both on every ingest, and a hot
add loaded it again and read the table's whole id column).

    python -m bench.scale                          # 10k, 100k, 1M
    python -m bench.scale --sizes 10000,100000 --ann

Writes bench/results/<date>-scale.json and .md; prints the table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import REPO, RESULTS, command_line, markdown_table, rss_mb, write_run
from components.config import Params, load_params, with_overrides
from components.workspace import resolve_workspace

PER_CLASS = 14
ARRIVAL_CLASSES, ARRIVAL_PER_CLASS = 20, 10


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset_peak() (VmHWM; psutil has no
    high-water mark on Linux). Not ru_maxrss: a child keeps its forking parent's high-water mark
    across exec (here, the parent's N rows)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size (Linux)


def synthetic_catalog(n: int) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(n)
    hashes = [f"{h:032x}" for h in rng.integers(0, 2**63, n, dtype=np.int64)]
    images, classes = {}, {}
    for i, digest in enumerate(hashes):
        k, j = divmod(i, PER_CLASS)
        cls = f"s{k}"
        unseen = k % 4 == 3
        classes[cls] = {"arrival": "history", "split": "unseen" if unseen else "train"}
        role = "unseen" if unseen else ("query" if j >= PER_CLASS - 2 else "train")
        images[f"{cls}/{digest}.png"] = {"class": cls, "arrival": "history", "role": role}
    arrivals = {"history": {"name": "history", "fingerprint": "synthetic", "stored": n, "classes": sorted(classes)}}
    return arrivals, classes, images


def setup(root: Path, params: Params, n: int, ann: bool) -> dict:
    """A workspace whose catalog and live table hold n synthetic images."""
    import torch

    from components.data.catalog import Catalog
    from components.modeling.embedder import build_embedder
    from components.registry.mlflow_registry import CHAMPION, TABLE_TAG, ModelRegistry
    from components.vectors.ann import ensure_ann_index
    from components.vectors.build import mark_validated
    from components.vectors.tables import (
        CATALOG_SEQ,
        connect,
        ensure_id_index,
        set_vector_metadata,
        table_name,
        table_schema,
    )

    ws = resolve_workspace(params, root)
    timings = {}
    start = time.perf_counter()
    arrivals, classes, images = synthetic_catalog(n)
    catalog = Catalog(ws.catalog, arrivals=arrivals, classes=classes, images=images)
    catalog.save()
    catalog = Catalog.load(ws.catalog)
    timings["catalog_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    legacy = ws.root / "registry.json.reference"
    legacy.write_text(
        json.dumps({"arrivals": arrivals, "classes": classes, "images": images}, indent=1, sort_keys=True)
    )
    reference_load = time.perf_counter()
    raw = json.loads(legacy.read_text())
    reference_save = time.perf_counter()
    legacy.write_text(json.dumps(raw, indent=1, sort_keys=True))
    done = time.perf_counter()
    reference = {
        "json_mb": round(legacy.stat().st_size / 2**20, 1),
        "json_load_seconds": round(reference_save - reference_load, 2),
        "json_save_seconds": round(done - reference_save, 2),
    }
    legacy.unlink()
    del raw, images

    torch.manual_seed(0)
    model = build_embedder(params.model)
    registry = ModelRegistry(ws, params.registry)
    version = registry.log_candidate(
        model, params={}, metrics={}, epoch_metrics={}, arrivals=["history"], tags={}
    ).version
    start = time.perf_counter()
    name = table_name(params.index.table_prefix, version)
    tbl = connect(ws).create_table(name, schema=table_schema(params.model.embedding_dim))
    records = catalog.records()
    rng = np.random.default_rng(1)
    for lo in range(0, n, 100_000):
        chunk = records[lo : lo + 100_000]
        vectors = rng.standard_normal((len(chunk), params.model.embedding_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        tbl.add(
            pa.table(
                {
                    "id": [r.id for r in chunk],
                    "class": [r.cls for r in chunk],
                    "arrival": [r.arrival for r in chunk],
                    "role": [r.role for r in chunk],
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), params.model.embedding_dim),
                },
                schema=tbl.schema,
            )
        )
    tbl.optimize()
    ensure_id_index(tbl)
    if ann:
        ensure_ann_index(tbl, params.index)
    set_vector_metadata(tbl, CATALOG_SEQ, catalog.mark(catalog.last_seq()) or "")
    mark_validated(tbl, version)
    registry.set_tag(version, TABLE_TAG, name)
    registry.client.set_registered_model_alias(registry.name, CHAMPION, version)
    timings["table_seconds"] = time.perf_counter() - start
    return {"setup": {k: round(v, 1) for k, v in timings.items()}, "reference": reference}


def noise_png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def measure(root: Path, params_file: Path, attempt: int) -> dict:
    """One arrival ingested and hot-added, as `mnemo ingest` does it; run in its own process."""
    from components.data.inbox import ingest_inbox
    from components.registry.promotion import Promoter

    params = with_overrides(load_params(params_file), {"paths.workspace": str(root)})
    ws = resolve_workspace(params, root)
    rng = np.random.default_rng(7 + attempt)  # each attempt brings new images
    for c in range(ARRIVAL_CLASSES):
        folder = ws.inbox / f"arrival{attempt}" / f"new{attempt}-{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(ARRIVAL_PER_CLASS):
            (folder / f"{i}.png").write_bytes(noise_png(rng))
    Promoter(ws, params.registry, params.index)  # imports done before the clock starts
    reset_peak()
    rss_before = rss_mb()
    start = time.perf_counter()
    cpu = time.process_time()
    [report] = ingest_inbox(ws, params.ingest)
    ingested = time.perf_counter()
    ingest_peak = peak_rss_mb() - rss_before
    added = Promoter(ws, params.registry, params.index).catch_up()
    done = time.perf_counter()
    assert report.stored == ARRIVAL_CLASSES * ARRIVAL_PER_CLASS and added.added == report.stored, (report, added)
    return {
        "ingest_seconds": round(ingested - start, 3),
        "hot_add_seconds": round(done - ingested, 3),
        "total_seconds": round(done - start, 3),
        "cpu_seconds": round(time.process_time() - cpu, 3),
        "peak_rss_growth_mb": round(peak_rss_mb() - rss_before, 1),
        "ingest_peak_rss_growth_mb": round(ingest_peak, 1),
        "rss_before_mb": round(rss_before, 1),
    }


ARRIVAL_COLUMNS = ("ingest_seconds", "hot_add_seconds", "total_seconds", "cpu_seconds", "peak_rss_growth_mb")


def markdown(report: dict) -> str:
    lines = [
        f"# Scale benchmark {report['date']}",
        "",
        f"`{report['command']}`; {report['machine']}; one arrival of {report['arrival_images']} images "
        f"ingested and hot-added into a catalog and live table of N images (ANN index: {report['ann']}).",
        "",
        markdown_table(
            [
                "N images",
                "ingest s",
                "hot add s",
                "total s",
                "CPU s",
                "peak RSS growth MB",
                "registry.json reference: MB, load s, save s",
            ],
            (
                [
                    f"{int(n):,}",
                    *(r["arrival"][k] for k in ARRIVAL_COLUMNS),
                    ", ".join(str(r["reference"][k]) for k in ("json_mb", "json_load_seconds", "json_save_seconds")),
                ]
                for n, r in report["sizes"].items()
            ),
        ),
    ]
    lines += ["", f"Growth, largest over smallest: {json.dumps(report['growth'])} (target: total at most 1.5x).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--ann", action="store_true", help="give the live table the shipped ANN index (minutes at 1M)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--repeats", type=int, default=3, help="arrivals per size, each in a fresh process; medians kept")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the child process
    ap.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.params, args.attempt)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict = {
        "date": date.today().isoformat(),
        "command": command_line("scale"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "arrival_images": ARRIVAL_CLASSES * ARRIVAL_PER_CLASS,
        "ann": args.ann,
        "sizes": {},
    }
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"mnemo-scale-{n}-") as tmp:
            root = Path(tmp) / "ws"
            overrides = {"paths.workspace": str(root), "train.device": "cpu"}
            if not args.ann:
                overrides["index.ann_min_rows"] = 10 * max(sizes)  # exact search: no index build in the arrival
            params = with_overrides(load_params(args.params), overrides)
            params_file = Path(tmp) / "params.yaml"
            params_file.write_text(json.dumps(params.model_dump(mode="json")))
            print(f"{n:,} images: setting up", file=sys.stderr, flush=True)
            result = setup(root, params, n, args.ann)
            print(f"{n:,} images: one arrival", file=sys.stderr, flush=True)
            attempts = []
            for attempt in range(args.repeats):
                command = [sys.executable, "-m", "bench.scale", "--measure", str(root), "--params", str(params_file)]
                child = subprocess.run(
                    [*command, "--attempt", str(attempt)], capture_output=True, text=True, check=True, cwd=REPO
                )
                attempts.append(json.loads(child.stdout.strip().splitlines()[-1]))
            result["attempts"] = attempts
            result["arrival"] = {k: float(np.median([a[k] for a in attempts])) for k in attempts[0]}
            report["sizes"][str(n)] = result
            print(json.dumps(result), file=sys.stderr, flush=True)
    first, last = report["sizes"][str(sizes[0])]["arrival"], report["sizes"][str(sizes[-1])]["arrival"]
    report["growth"] = {
        k: round(last[k] / first[k], 2) for k in ("ingest_seconds", "hot_add_seconds", "total_seconds", "cpu_seconds")
    }
    report["target_met"] = report["growth"]["total_seconds"] <= 1.5
    stem = args.out / f"{report['date']}-scale{'-ann' if args.ann else ''}"
    write_run(stem, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
