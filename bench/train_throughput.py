"""Training throughput: mnemo's loop against a bare PyTorch loop, and on 1 against 2 ranks, in one run.

On one rendered demo arrival (its training images), side by side in one process and run:
  bare      the plainest loop that trains the same thing: ImageFiles with mnemo's train transform,
            a DataLoader with pytorch-metric-learning's MPerClassSampler (m images per class, as
            mnemo's batches) and mnemo's batch size, workers and pinned memory -> the same embedder
            -> multi-similarity loss and miner (params.yaml's) -> AdamW; bf16 autocast and
            channels_last on CUDA, as mnemo's loop sets them
  mnemo x1  train_continual_on_devices, the retrain flow's call, on train.devices 1: train_embedder
            in this process
  mnemo xN  the same on train.devices N: the same loop under torchrun, N ranks (gloo on CPU, one
            thread each as torchrun sets it; nccl on GPUs, one each)
Three read-outs, each over the epochs after the first (warm-up):
- images/s: an epoch's images over its wall time, the median; each cycle's ratio to the bare loop
  of the same cycle (--repeats runs the cycle again: bare, x1, x2, bare, ...), as a shared
  machine's load drifts between runs;
- images per CPU second, in the epochs of this process's loops (bare, x1): what the loop costs,
  which other processes on a busy machine do not move (CPU time counts this process's threads,
  not DataLoader worker processes: compare at --workers 0, the CPU default);
- CPU ms per image of a whole run, this process and the torchrun processes it waited for
  (start-up, the warm-up epoch and mnemo's memory selection included): what N ranks cost.
--threads sets torch's threads in this process and in every rank (default: torch's own, all cores
here, and torchrun's 1 per rank). Each model's unseen Recall@1 shows that the variants learned
alike (the same for every repeat: same seed; not a quality benchmark).

    python -m bench.train_throughput --threads 1 --repeats 2   # CPU: bare, 1 and 2 ranks; minutes on 2 cores
    python -m bench.train_throughput --device cuda --classes 300 --epochs 6 --workers 8 --ranks 1   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from pytorch_metric_learning import losses, miners, samplers
from torch.utils.data import DataLoader

from bench.common import REPO, RESULTS, command_line, load_average, machine, markdown_table, write_run
from components.config import Params, load_params, with_overrides
from components.data.catalog import Catalog, ImageRecord
from components.data.datasets import ImageFiles, encode_labels
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.data.ingest import ingest_arrival
from components.data.transforms import train_transform
from components.evaluation.metrics import score_unseen
from components.modeling.embedder import Embedder, build_embedder, pick_device
from components.training.continual import Recipe, train_continual
from components.training.distributed import TRAIN_JOB, train_continual_on_devices
from components.training.loop import seed_everything
from components.workspace import Workspace, resolve_workspace

TARGET_VS_BARE = 0.9  # issue 30: mnemo's loop at least 0.9x the bare loop's images/s


@dataclass
class Run:
    """One training run: its model, images/s per epoch (wall), images per CPU second per epoch
    (this process's loops only), the images it trained and the CPU seconds it took in all."""

    model: Embedder
    rates: list[float]
    cpu_rates: list[float]
    images: int
    cpu_seconds: float = 0.0


def cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (torchrun and its ranks)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def bare_loop(paths: list[Path], names: list[str], params: Params) -> Run:
    """The plainest loop that trains what mnemo's trains."""
    train = params.train
    if (train.loss, train.miner) != ("multi_similarity", "multi_similarity"):
        raise SystemExit("the bare loop is written for params' multi_similarity loss and miner")
    seed_everything(train.seed)
    device = pick_device(train.device)
    on_gpu = device.type == "cuda"
    model = build_embedder(params.model).to(device).train()
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    labels, _ = encode_labels(names)
    m = min(train.m_per_class, train.batch_size // 2)
    loader = DataLoader(
        ImageFiles(paths, labels, train_transform(model.image_size, train.augment, model.mean, model.std)),
        batch_size=train.batch_size,
        sampler=samplers.MPerClassSampler(labels, m, train.batch_size, length_before_new_iter=len(labels)),
        drop_last=True,
        num_workers=train.num_workers,
        pin_memory=on_gpu,
        persistent_workers=train.num_workers > 0,
    )
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    run = Run(model, [], [], 0)
    for _ in range(train.epochs):
        start, cpu, seen = time.perf_counter(), time.process_time(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if on_gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                embeddings = model(x)
            loss = loss_fn(embeddings.float(), y, miner(embeddings.float(), y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(x)
        if on_gpu:
            torch.cuda.synchronize()
        run.rates.append(seen / (time.perf_counter() - start))
        run.cpu_rates.append(seen / (time.process_time() - cpu))
        run.images += seen
    run.model = model.to("cpu").eval()
    return run


def mnemo_loop(ws: Workspace, train: list[ImageRecord], params: Params, ranks: int) -> Run:
    """mnemo's loop as the retrain flow runs it on `ranks` devices (a first arrival: no memory, no teacher).

    On one device train_continual_on_devices is train_continual in this process: called here
    directly, with a hook at every epoch's end for the CPU time of each epoch.
    """
    recipe = Recipe.of(with_overrides(params, {"train.devices": ranks}))
    ends = [time.process_time()]
    if ranks == 1:
        step = train_continual(train, ws.classes_dir, recipe, on_epoch=lambda *_: ends.append(time.process_time()))
    else:
        step = train_continual_on_devices(
            train, ws.classes_dir, recipe, init=None, state=None, checkpoint_dir=None, job_dir=ws.root / TRAIN_JOB
        )
    per_epoch = step.train.images
    cpu_rates = [per_epoch / (b - a) for a, b in zip(ends, ends[1:])]
    rates = step.train.epoch_metrics["epoch_images_per_second"]
    return Run(step.train.model, rates, cpu_rates, per_epoch * step.train.epochs)


def arrival(params: Params) -> tuple[Workspace, list[ImageRecord], list[ImageRecord]]:
    """One rendered demo arrival, ingested: the workspace, its training and its unseen images."""
    ws = resolve_workspace(params)
    fonts = discover_fonts()
    [chars] = stream_classes(fonts, params.demo)
    ingest_arrival(write_arrival(ws.inbox, 0, chars, fonts, params.demo), ws, params.ingest)
    catalog = Catalog.load(ws.catalog)
    return ws, catalog.records("train"), catalog.records("unseen")


def after_warm_up(rates: Sequence[float]) -> list[float]:
    return list(rates[1:]) if len(rates) > 1 else list(rates)


def median_after_warm_up(rates: Sequence[float]) -> float:
    return statistics.median(after_warm_up(rates)) if rates else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    ap.add_argument("--classes", type=int, default=60, help="classes in the arrival (demo.images_per_class each)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: params train.num_workers)")
    ap.add_argument("--ranks", default="1,2", help="mnemo's loop on each of these device counts (1 first)")
    ap.add_argument("--repeats", type=int, default=1, help="cycles of bare and mnemo runs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--no-write", action="store_true", help="print only; write nothing to bench/results")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if ranks[0] != 1:
        raise SystemExit("--ranks must start with 1: the other counts are compared with it")
    host = machine()  # torch's threads before --threads changes them: what the machine offers
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the ranks' (torchrun sets 1 only where it is unset)
    if args.device == "cuda" and max(ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {args.ranks}: one GPU per rank, and {torch.cuda.device_count()} are present")

    overrides = {
        "train.device": args.device,
        "train.epochs": args.epochs,
        "train.devices": 1,
        "demo.arrivals": 0,
        "demo.base_classes": args.classes,
    }
    if args.workers is not None:
        overrides["train.num_workers"] = args.workers
    started, load_before = time.perf_counter(), load_average()
    runs: dict[str, list[Run]] = {}
    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        params = with_overrides(load_params(args.params), overrides | {"paths.workspace": tmp})
        ws, train, unseen = arrival(params)
        paths, names = [ws.classes_dir / r.id for r in train], [r.cls for r in train]
        for _ in range(args.repeats):
            cycle = {"bare": lambda: bare_loop(paths, names, params)}
            cycle |= {f"mnemo x{n}": (lambda n=n: mnemo_loop(ws, train, params, n)) for n in ranks}
            for name, go in cycle.items():
                cpu = cpu_seconds()
                run = go()
                run.cpu_seconds = cpu_seconds() - cpu
                runs.setdefault(name, []).append(run)
                scores[name] = score_unseen(ws, unseen, params.evaluate, run.model)["unseen_recall_at_1"]
                print(
                    f"{name}: {[round(r, 1) for r in run.rates]} images/s, {[round(r, 1) for r in run.cpu_rates]} "
                    f"images per CPU s, {run.cpu_seconds / run.images * 1000:.1f} CPU ms per image in all, "
                    f"unseen R@1 {scores[name]:.3f}",
                    flush=True,
                )

    def pooled(name: str, field: str) -> float:
        values = [x for run in runs[name] for x in after_warm_up(getattr(run, field))]
        return statistics.median(values) if values else float("nan")

    wall = {name: pooled(name, "rates") for name in runs}
    per_cpu = {name: pooled(name, "cpu_rates") for name in runs}
    cycle_ratio = {  # each cycle's median against the bare loop's of the same cycle
        name: [median_after_warm_up(r.rates) / median_after_warm_up(b.rates) for r, b in zip(runs[name], runs["bare"])]
        for name in runs
    }
    cpu_ms = {name: [r.cpu_seconds / r.images * 1000 for r in runs[name]] for name in runs}
    report = {
        "date": date.today().isoformat(),
        "command": command_line("train_throughput"),
        "machine": host,
        "load_average_before_after": [load_before, load_average()],
        "seconds": round(time.perf_counter() - started),
        "device": args.device,
        "torch": torch.__version__,
        "backbone": params.model.backbone,
        "image_size": params.model.image_size,
        "batch_size": params.train.batch_size,
        "m_per_class": params.train.m_per_class,
        "num_workers": params.train.num_workers,
        "threads_per_process": args.threads or f"torch's default ({torch.get_num_threads()}); 1 per rank",
        "epochs_per_run": args.epochs,
        "repeats": args.repeats,
        "train_images": len(train),
        "classes": len(set(names)),
        "images_per_second_median": {k: round(v, 1) for k, v in wall.items()},
        "images_per_second_per_epoch": {k: [[round(x, 1) for x in r.rates] for r in v] for k, v in runs.items()},
        "ratio_vs_bare_per_cycle": {k: [round(x, 3) for x in v] for k, v in cycle_ratio.items()},
        "images_per_cpu_second_median": {k: round(v, 1) for k, v in per_cpu.items() if v == v},
        "images_per_cpu_second_per_epoch": {
            k: [[round(x, 1) for x in r.cpu_rates] for r in v] for k, v in runs.items() if v[0].cpu_rates
        },
        "cpu_ms_per_image_whole_run": {k: [round(x, 2) for x in v] for k, v in cpu_ms.items()},
        "target_vs_bare": TARGET_VS_BARE,
        "unseen_recall_at_1": {k: round(v, 3) for k, v in scores.items()},
    }
    table = markdown_table(
        [
            "loop",
            "images/s (median)",
            "vs bare, per cycle",
            "vs mnemo x1",
            "images per CPU s",
            "vs bare",
            "CPU ms per image, whole run",
            "unseen R@1",
        ],
        (
            [
                name,
                f"{wall[name]:.1f}",
                ", ".join(f"{x:.2f}x" for x in cycle_ratio[name]),
                f"{wall[name] / wall['mnemo x1']:.2f}x",
                f"{per_cpu[name]:.1f}" if per_cpu[name] == per_cpu[name] else "",
                f"{per_cpu[name] / per_cpu['bare']:.2f}x" if per_cpu[name] == per_cpu[name] else "",
                ", ".join(f"{x:.1f}" for x in cpu_ms[name]),
                f"{scores[name]:.3f}",
            ]
            for name in runs
        ),
    )
    verdict = (
        f"mnemo x1 / bare: {statistics.median(cycle_ratio['mnemo x1']):.2f}x in images/s (median of the cycles), "
        f"{per_cpu['mnemo x1'] / per_cpu['bare']:.2f}x in images per CPU second (target >= {TARGET_VS_BARE}x)"
    )
    markdown = f"# Training throughput, {report['date']}\n\n`{report['command']}` on {report['machine']}\n\n"
    markdown += f"{table}\n\n{verdict}\n"
    print(json.dumps(report, indent=1))
    print()
    print(markdown)
    if not args.no_write:
        threads = f"-threads{args.threads}" if args.threads else ""
        write_run(RESULTS / f"{report['date']}-train-throughput-{args.device}{threads}", report, markdown)


if __name__ == "__main__":
    main()
