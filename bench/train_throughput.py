"""Training throughput of mnemo's loop against a bare PyTorch loop, same model, batch and precision.

On one rendered demo arrival (after a first arrival has given a previous model and a
replay memory), in one process, side by side:
  bare              DataLoader(shuffle) -> model -> multi-similarity loss -> AdamW; bf16 autocast
                    and channels_last on CUDA, exactly as mnemo's loop sets them
  mnemo naive       components.training.continual.train_continual without memory or distillation
  mnemo replay      ... with the replay memory mixed into every batch
  mnemo replay_distill  ... plus distillation from the previous model (one extra forward per batch)
  (--compile) mnemo replay_distill with torch.compile
Images/s is the median over epochs after the first (warm-up, compilation).

    python -m bench.train_throughput --device cuda --workers 8 --out bench/results/<date>-train-throughput.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from pytorch_metric_learning import losses
from torch.utils.data import DataLoader

from bench.common import REPO, machine, markdown_table, write_json
from components.config import Params, load_params, with_overrides
from components.data.catalog import Catalog
from components.data.datasets import ImageFiles, encode_labels
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.data.ingest import ingest_arrival
from components.data.transforms import train_transform
from components.modeling.embedder import Embedder, pick_device
from components.training.continual import Recipe, train_continual
from components.workspace import resolve_workspace

NO_REPLAY = {"replay.budget": 0}
NO_DISTILL = {"distill.embedding_weight": 0.0, "distill.relational_weight": 0.0}


def bare_loop(model: Embedder, paths: list[Path], names: list[str], params: Params, epochs: int) -> list[float]:
    """Images/s per epoch of the plainest loop that trains the same thing."""
    device = pick_device(params.train.device)
    on_gpu = device.type == "cuda"
    model = copy.deepcopy(model).to(device).train()
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    labels, _ = encode_labels(names)
    loader = DataLoader(
        ImageFiles(paths, labels, train_transform(model.image_size)),
        batch_size=params.train.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=params.train.num_workers,
        pin_memory=on_gpu,
        persistent_workers=params.train.num_workers > 0,
    )
    loss_fn = losses.MultiSimilarityLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if on_gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                emb = model(x)
            loss = loss_fn(emb.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(x)
        if on_gpu:
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--classes", type=int, default=150, help="classes per arrival")
    ap.add_argument("--compile", action="store_true", help="also time mnemo's loop with torch.compile")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    overrides = {
        "train.device": args.device,
        "train.epochs": args.epochs,
        "demo.arrivals": 1,
        "demo.base_classes": args.classes,
        "demo.classes_per_arrival": args.classes,
    }
    if args.workers is not None:
        overrides["train.num_workers"] = args.workers
    with tempfile.TemporaryDirectory() as tmp:
        params = with_overrides(load_params(args.params), overrides | {"paths.workspace": tmp})
        ws = resolve_workspace(params)
        fonts = discover_fonts()
        for step, chars in enumerate(stream_classes(fonts, params.demo)):
            ingest_arrival(write_arrival(ws.inbox, step, chars, fonts, params.demo), ws, params.ingest)
        train = Catalog.load(ws.catalog).records("train")
        first = [r for r in train if r.arrival == "demo-000"]
        second = [r for r in train if r.arrival == "demo-001"]
        one_epoch = with_overrides(params, {"train.epochs": 1})
        previous = train_continual(first, ws.classes_dir, Recipe.of(one_epoch))
        state = previous.save_state(Path(tmp) / "state")

        runs: dict[str, list[float]] = {}
        memory_paths = [e.path for e in previous.memory.exemplars()]
        memory_names = [e.cls for e in previous.memory.exemplars()]
        runs["bare"] = bare_loop(
            previous.train.model,
            [ws.classes_dir / r.id for r in second] + memory_paths,
            [r.cls for r in second] + memory_names,
            params,
            args.epochs,
        )
        variants = {"mnemo naive": NO_REPLAY | NO_DISTILL, "mnemo replay": NO_DISTILL, "mnemo replay_distill": {}}
        if args.compile:
            variants["mnemo replay_distill compiled"] = {"train.compile": True}
        for name, extra in variants.items():
            p = with_overrides(params, extra)
            step = train_continual(second, ws.classes_dir, Recipe.of(p), init=previous.train.model, state=state)
            runs[name] = step.train.epoch_metrics["epoch_images_per_second"]

    median = {name: statistics.median(r[1:] if len(r) > 1 else r) for name, r in runs.items()}
    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "device": str(pick_device(args.device)),
        "torch": torch.__version__,
        "epochs": args.epochs,
        "batch_size": params.train.batch_size,
        "image_size": params.model.image_size,
        "backbone": params.model.backbone,
        "num_workers": params.train.num_workers,
        "new_images": len(second),
        "memory_images": len(memory_paths),
        "images_per_second_median": median,
        "images_per_second_per_epoch": runs,
        "ratio_vs_bare": {name: v / median["bare"] for name, v in median.items()},
    }
    print(json.dumps(report, indent=1))
    print()
    print(
        markdown_table(
            ["loop", "images/s (median)", "vs bare"],
            ([name, f"{v:.0f}", f"{v / median['bare']:.2f}x"] for name, v in median.items()),
        )
    )
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
