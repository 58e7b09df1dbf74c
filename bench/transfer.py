"""Transfer benchmark: leave one alphabet out on Omniglot, scored as Lake et al. score one-shot.

Each fold trains an embedder on four of the five alphabets of
../shared/data/omniglot/images_background_small1.zip through mnemo's real training function
(components.training.loop.train_embedder, params.yaml's model and train sections, jointly on
every image of those alphabets) and scores it on the fifth, which no arrival of its training
contained: 20-way 1-shot trials with all 20 candidates drawn from the held-out alphabet
(Lake et al.'s within-alphabet protocol; 1000 seeded trials, each query every other drawing of
the 20 characters), plus Recall@1 and MAP@R among that alphabet's images.

Each variant (params overrides, `--variant name:key=value,...`) is scored through four read-outs
of the same trained network, so one training answers four questions:
  head              the model's own output (the projection head, L2-normalised): what mnemo serves
  head_centred      the same with the mean of the training images' embeddings subtracted first
  features          the backbone's pooled features (the head's input), L2-normalised
  features_centred  the same, centred on the training images' mean first (SimpleShot's CL2N)
Measured in the same run, on the same trials (once per fold, whatever the variants):
  reference   bench.oneshot's 4-layer conv net (28 px), trained on the same four alphabets
  pixels      raw-pixel nearest neighbours (grey, 28 px)

    python -m bench.transfer                          # all five folds, params.yaml
    python -m bench.transfer --folds 2 --epochs 10 --tag e10   # a shorter run
    python -m bench.transfer --threads 1 --no-reference --tag sweep \\
        --variant 'params:' --variant 'px64:model.image_size=64'   # levers side by side
    python -m bench.transfer --jobs 2 --threads 1     # two folds at a time, one process each

Writes bench/results/<date>-transfer[-tag].json and .md, after every fold (a run stopped part-way
keeps what it finished).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    OMNIGLOT,
    REPO,
    RESULTS,
    command_line,
    machine,
    markdown_table,
    omniglot_alphabets,
    parse_variant,
    write_run,
)
from bench.oneshot import embed_reference, pixels, train_reference
from components.config import Params, load_params, with_overrides
from components.evaluation.metrics import few_shot_accuracy, retrieval_metrics, unit_rows
from components.modeling.embedder import Embedder, embed_files
from components.training.loop import train_embedder

WAY, TRIALS, SEED = 20, 1000, 0
KEY = f"{WAY}way_1shot_within"
READOUTS = ("head", "head_centred", "features", "features_centred")


def images(folder: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(folder.glob("*/*.png"))
    return paths, [p.parent.name for p in paths]


def score(x: np.ndarray, labels: list[str]) -> dict[str, float | None]:
    m = retrieval_metrics(x, labels, [1])
    return {
        KEY: few_shot_accuracy(x, labels, way=WAY, shot=1, episodes=TRIALS, seed=SEED),
        "recall_at_1": m.recall_at[1],
        "map_at_r": m.map_at_r,
    }


@contextmanager
def head_inputs(model: Embedder) -> Iterator[list[torch.Tensor]]:
    """Collects what the projection head (the network's last Linear layer) receives on each forward."""
    seen: list[torch.Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().float().cpu()))
    try:
        yield seen
    finally:
        handle.remove()


def readouts(model: Embedder, train_paths: list[Path], test_paths: list[Path]) -> dict[str, np.ndarray]:
    """The four read-outs (module docstring) of the held-out images."""
    out: dict[str, np.ndarray] = {}
    for name, paths in (("train", train_paths), ("test", test_paths)):
        with head_inputs(model) as seen:
            out[name] = embed_files(model, paths)
        out[f"{name}_features"] = torch.cat(seen).numpy()
    return {
        "head": out["test"],
        "head_centred": unit_rows(out["test"] - out["train"].mean(axis=0)),
        "features": unit_rows(out["test_features"]),
        "features_centred": unit_rows(out["test_features"] - out["train_features"].mean(axis=0)),
    }


def split(alphabets: dict[str, Path], held_out: str) -> tuple[list[Path], list[str], list[Path], list[str]]:
    train_paths: list[Path] = []
    train_names: list[str] = []
    for name, folder in alphabets.items():
        if name != held_out:
            p, n = images(folder)
            train_paths += p
            train_names += n
    test_paths, test_labels = images(alphabets[held_out])
    return train_paths, train_names, test_paths, test_labels


def run_variant(params: Params, train: tuple[list[Path], list[str]], test: tuple[list[Path], list[str]]) -> dict:
    cpu, start = time.process_time(), time.perf_counter()
    result = train_embedder(*train, params.train, params.model)
    cpu_seconds, wall = time.process_time() - cpu, time.perf_counter() - start
    vectors = readouts(result.model, train[0], test[0])
    return {
        "cpu_seconds": cpu_seconds,
        "wall_seconds": wall,
        "final_loss": result.epoch_losses[-1] if result.epoch_losses else None,
        "scores": {name: score(x, test[1]) for name, x in vectors.items()},
    }


def fold(held_out: str, alphabets: dict[str, Path], variants: dict[str, Params], reference: bool) -> dict:
    print(f"fold: {held_out} held out", flush=True)
    train_paths, train_names, test_paths, test_labels = split(alphabets, held_out)
    out: dict = {
        "held_out": held_out,
        "train_images": len(train_paths),
        "train_classes": len(set(train_names)),
        "test_images": len(test_paths),
        "test_classes": len(set(test_labels)),
        "variants": {},
        "baselines": {"pixels": score(pixels(test_paths), test_labels)},
    }
    if reference:
        net, reference_cpu = train_reference(train_paths, train_names)
        out["baselines"]["reference"] = score(embed_reference(net, test_paths), test_labels)
        out["reference_cpu_seconds"] = reference_cpu
    for name, params in variants.items():
        print(f"  variant {name}", flush=True)
        out["variants"][name] = run_variant(params, (train_paths, train_names), (test_paths, test_labels))
        print(f"    {_brief(out['variants'][name])}", flush=True)
    return out


def _brief(v: dict) -> str:
    return ", ".join(f"{r} {_cell(v['scores'][r][KEY])}" for r in READOUTS) + f"; {v['cpu_seconds']:.0f} CPU s"


def summary(folds: list[dict]) -> dict:
    """Mean 20-way within-alphabet 1-shot over folds: per variant and read-out, and per baseline."""

    def mean(values: list[float | None]) -> float:
        kept = [v for v in values if v is not None]
        return float(np.mean(kept)) if kept else float("nan")

    out: dict = {"variants": {}, "baselines": {}}
    for name in folds[0]["variants"]:
        out["variants"][name] = {r: mean([f["variants"][name]["scores"][r][KEY] for f in folds]) for r in READOUTS} | {
            "cpu_seconds": mean([f["variants"][name]["cpu_seconds"] for f in folds])
        }
    for name in folds[0]["baselines"]:
        out["baselines"][name] = mean([f["baselines"][name][KEY] for f in folds])
    return out


def markdown(report: dict) -> str:
    means = report["summary"]
    folds = report["folds"]
    baselines = list(means["baselines"])
    lines = [
        f"# Transfer benchmark {report['date']}",
        "",
        f"{report['machine']}; params `{report['params_file']}`; leave one alphabet out ({len(folds)} folds), "
        f"{WAY}-way 1-shot within the held-out alphabet, {TRIALS} trials per fold.",
        "",
        f"`{report['command']}`",
        "",
        "Mean over folds, by variant and read-out (the served model is `head`):",
        "",
        markdown_table(
            ["variant", "overrides", *READOUTS, "CPU s per fold"],
            (
                [
                    name,
                    ", ".join(f"{k}={v}" for k, v in report["variants"][name].items()) or "params.yaml",
                    *(_cell(m[r]) for r in READOUTS),
                    f"{m['cpu_seconds']:.0f}",
                ]
                for name, m in means["variants"].items()
            ),
        ),
        "",
        "Baselines (mean): " + ", ".join(f"{b} {means['baselines'][b]:.3f}" for b in baselines),
        "",
        "Per fold (`head` read-out):",
        "",
        markdown_table(
            ["held-out alphabet", "classes", *means["variants"], *baselines],
            (
                [
                    f["held_out"],
                    f["test_classes"],
                    *(_cell(f["variants"][n]["scores"]["head"][KEY]) for n in means["variants"]),
                    *(_cell(f["baselines"][b][KEY]) for b in baselines),
                ]
                for f in folds
            ),
        ),
    ]
    if "reference" in means["baselines"]:
        lines += [
            "",
            "Targets (issue 27): mean >= 0.85 and >= 0.08 above the reference: "
            + "; ".join(
                f"{n} {m['head']:.3f} ({m['head'] - means['baselines']['reference']:+.3f})"
                for n, m in means["variants"].items()
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _cell(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--folds", default="5", help="how many held-out alphabets (in alphabet order), or their names")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs in every variant")
    ap.add_argument("--variant", action="append", default=[], help="'name:key=value,...' over params (repeatable)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference conv net (lever sweeps)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 keeps CPU seconds honest)")
    ap.add_argument("--jobs", type=int, default=1, help="folds trained at once, each in a process of its own")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not OMNIGLOT.is_file():
        raise SystemExit(f"{OMNIGLOT} is absent: this benchmark needs the Omniglot sample")
    use_threads(args.threads)  # the report's machine line names the threads every fold's process uses
    base = load_params(args.params)
    epochs = {"train.epochs": args.epochs} if args.epochs is not None else {}
    named = [parse_variant(v) for v in args.variant] or [("params", {})]
    overrides = {name: epochs | o for name, o in named}  # a variant may set its own epochs
    variants = {name: with_overrides(base, o) for name, o in overrides.items()}  # a bad key fails before training
    start = time.perf_counter()
    report: dict = {
        "date": date.today().isoformat(),
        "command": command_line("transfer"),
        "machine": machine() + (f"; {args.jobs} folds at a time, one process each" if args.jobs > 1 else ""),
        "params_file": str(args.params),
        "variants": overrides,
        "params": {name: p.flat("model", "train") for name, p in variants.items()},
        "folds": [],
    }
    stem = args.out / f"{report['date']}-transfer{'-' + args.tag if args.tag else ''}"
    with tempfile.TemporaryDirectory(prefix="mnemo-transfer-") as tmp:
        alphabets = dict(omniglot_alphabets(OMNIGLOT, Path(tmp)))
        chosen = list(alphabets)[: int(args.folds)] if args.folds.isdigit() else args.folds.split(",")
        done: dict[str, dict] = {}
        with ProcessPoolExecutor(
            max_workers=args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=use_threads,
            initargs=(args.threads,),
        ) as pool:
            pending = {pool.submit(fold, h, alphabets, variants, not args.no_reference): h for h in chosen}
            for finished in as_completed(pending):
                done[pending[finished]] = finished.result()
                report["folds"] = [done[h] for h in chosen if h in done]  # in alphabet order, whatever finished first
                report["summary"] = summary(report["folds"])
                report["seconds"] = time.perf_counter() - start
                write_run(stem, report, markdown(report))
    print(markdown(report))


def use_threads(threads: int | None) -> None:
    """torch's CPU threads in this process (each fold's process runs this first)."""
    if threads:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
