"""Query the live (champion model, table) pair with freshly rendered images of indexed classes.

The stored images are in the index, so querying one finds itself; this asks the harder
question a user asks: does a *new* image of a known character come back with its class
first? It renders new samples of the demo classes in a workspace made by `mnemo demo`
(sample indices past the stored ones, so never a stored image), embeds them through
the registered pyfunc model and searches the champion's table, as `mnemo query` does.

    python -m bench.query_fresh --workspace workspace --per-class 2
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import markdown_table, write_json
from components.config import load_params
from components.data.catalog import Catalog
from components.data.demo import class_char, discover_fonts, sample_image
from components.registry.mlflow_registry import ModelRegistry
from components.vectors.search import search
from components.workspace import resolve_workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    params = load_params(args.params)
    ws = resolve_workspace(params, args.workspace)
    registry = ModelRegistry(ws, params.registry)
    champion = registry.champion()
    if champion is None or not champion.table:
        sys.exit(f"no champion in {ws.tracking_uri}: run `mnemo demo` first")
    catalog = Catalog.load(ws.catalog)
    fonts = discover_fonts()

    report: dict = {
        "date": date.today().isoformat(),
        "model_version": champion.version,
        "table": champion.table,
        "fonts": fonts.source,
        "per_class": args.per_class,
        "splits": {},
    }
    model = registry.load_pyfunc(champion.version)
    for split in ("train", "unseen"):
        classes = catalog.classes_with_split(split)
        payloads, truth = [], []
        for cls in classes:
            for i in range(args.per_class):
                buf = io.BytesIO()
                fresh = params.demo.images_per_class + i  # past the stored samples' indices
                sample_image(fonts, class_char(cls), fresh, params.demo).save(buf, format="PNG")
                payloads.append(buf.getvalue())
                truth.append(cls)
        start = time.perf_counter()
        hits = search(ws, champion.table, model.predict(pd.DataFrame({"image": payloads})), 5)
        seconds = time.perf_counter() - start
        top1 = np.mean([h[0]["class"] == t for h, t in zip(hits, truth)])
        top5 = np.mean([any(x["class"] == t for x in h) for h, t in zip(hits, truth)])
        report["splits"][split] = {
            "classes": len(classes),
            "queries": len(truth),
            "top1_class_accuracy": round(float(top1), 4),
            "top5_class_accuracy": round(float(top5), 4),
            "seconds": round(seconds, 2),
        }

    print(json.dumps(report, indent=1))
    print()
    print(
        markdown_table(
            ["classes", "n classes", "queries", "top-1 class", "top-5 class"],
            (
                [
                    split,
                    r["classes"],
                    r["queries"],
                    f"{r['top1_class_accuracy']:.3f}",
                    f"{r['top5_class_accuracy']:.3f}",
                ]
                for split, r in report["splits"].items()
            ),
        )
    )
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
