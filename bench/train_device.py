"""Train the embedder on one rendered demo arrival and score it on the held-out classes.

Checks the training loop on a given device (CUDA with bf16 autocast and channels_last,
or CPU) and measures its throughput. Needs no MLflow, Prefect or LanceDB, so it runs on a
bare GPU machine. Prints JSON and a markdown table; --out writes the JSON to a file.

    python -m bench.train_device --device cuda --epochs 10 --out bench/results/<date>-train-device.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

from bench.common import markdown_table, write_json
from components.config import load_params, with_overrides
from components.data.catalog import Catalog
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.data.ingest import ingest_arrival
from components.evaluation.metrics import score_unseen
from components.training.loop import train_embedder
from components.workspace import resolve_workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument(
        "--classes", type=int, default=None, help="classes in the arrival (default: params demo.base_classes)"
    )
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: params train.num_workers)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    overrides: dict = {"train.device": args.device}
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    if args.workers is not None:
        overrides["train.num_workers"] = args.workers
    if args.classes:
        overrides["demo.base_classes"] = args.classes
    overrides["demo.arrivals"] = 0
    with tempfile.TemporaryDirectory() as tmp:
        params = with_overrides(load_params(args.params), overrides | {"paths.workspace": tmp})
        ws = resolve_workspace(params)
        fonts = discover_fonts()
        [chars] = stream_classes(fonts, params.demo)
        ingest_arrival(write_arrival(ws.inbox, 0, chars, fonts, params.demo), ws, params.ingest)
        catalog = Catalog.load(ws.catalog)
        train, unseen = catalog.records("train"), catalog.records("unseen")
        result = train_embedder(
            [ws.classes_dir / r.id for r in train], [r.cls for r in train], params.train, params.model
        )
        scores = score_unseen(ws, unseen, params.evaluate, result.model)

    report = {
        "date": date.today().isoformat(),
        "device": result.device,
        "device_name": torch.cuda.get_device_name()
        if result.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "fonts": fonts.source,
        "backbone": params.model.backbone,
        "image_size": params.model.image_size,
        "batch_size": params.train.batch_size,
        "num_workers": params.train.num_workers,
        "epochs": params.train.epochs,
        "train_images": result.images,
        "train_classes": result.classes,
        "train_seconds": round(result.seconds, 2),
        "train_images_per_second": round(result.images_per_second, 1),
        "final_loss": round(result.epoch_losses[-1], 4),
        "unseen_recall_at_1": round(scores["unseen_recall_at_1"], 4),
        "unseen_map_at_r": round(scores["unseen_map_at_r"], 4),
        "pixel_unseen_recall_at_1": round(scores["baseline_unseen_recall_at_1"], 4),
        "pixel_unseen_map_at_r": round(scores["baseline_unseen_map_at_r"], 4),
    }
    print(json.dumps(report, indent=1))
    print()
    print(markdown_table(list(report), [list(report.values())]))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
