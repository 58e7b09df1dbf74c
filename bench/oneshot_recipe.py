"""One-shot recipe benchmark (issue 16): mnemo's continual recipe on real handwriting, against a
small reference net trained jointly, scored on the same few-shot episodes of never-trained classes.

Omniglot (../shared/data/omniglot/images_background_small1.zip, 5 alphabets) goes through mnemo's
real ingest, one alphabet per arrival, so the held-out (unseen) classes are the pipeline's own
split (ingest.unseen_class_fraction of each alphabet's characters) and the training images are
the `train` role. Each variant (params overrides on params.yaml) then learns the five arrivals
as the retrain flow does: components.training.continual.train_continual, the replay memory saved and restored
between arrivals, distilling from the previous model. After every arrival the unseen classes
are scored with components.evaluation.metrics.few_shot_accuracy (20-way 1-shot and 5-way 5-shot, seeded, the
same episodes for every model). The reference net (4 x conv3x3-BN-ReLU-maxpool, 64 channels,
28 px, multi-similarity loss, affine augmentation, Adam 1e-3, 30 epochs) trains on all five
arrivals' training images at once.

    python -m bench.oneshot_recipe --variants committed,recipe     # named variants (VARIANTS below)
    python -m bench.oneshot_recipe --variant 'mine:train.epochs=12,model.image_size=32'

Writes bench/results/<date>-oneshot-<tag>.json and .md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench.common import OMNIGLOT, REPO, RESULTS, markdown_table, parse_variant, write_run
from bench.continual import omniglot_stream
from bench.oneshot import embed_reference, train_reference  # the reference net, one copy
from components.config import Params, load_params, with_overrides
from components.data.catalog import Catalog
from components.data.transforms import eval_transform, open_rgb
from components.evaluation.metrics import few_shot_accuracy
from components.modeling.embedder import embed_files
from components.training.continual import Recipe, train_continual
from components.workspace import resolve_workspace

# What the author ran (params.yaml before issue 16), spelled out so it stays comparable.
COMMITTED = {
    "model.stem": "imagenet",
    "model.image_size": 48,
    "train.augment": "crop",
    "train.lr_schedule": "constant",
    "train.epochs": 8,
    "train.epoch_length": "groups",
    "distill.embedding_on": "all",
}
LEVERS = {
    "train.augment": "affine",
    "train.lr_schedule": "cosine",
    "train.epoch_length": "cover",
    "distill.embedding_on": "old",
}
VARIANTS: dict[str, dict] = {
    "committed": COMMITTED,
    "params": {},  # params.yaml as it is now
    "imagenet48_levers": COMMITTED | LEVERS,
    "small28_levers": COMMITTED | LEVERS | {"model.stem": "small", "model.image_size": 28},
    "small32_levers": COMMITTED | LEVERS | {"model.stem": "small", "model.image_size": 32},
    "small28_crop": COMMITTED | LEVERS | {"model.stem": "small", "model.image_size": 28, "train.augment": "crop"},
    "small28_distill_all": COMMITTED
    | LEVERS
    | {"model.stem": "small", "model.image_size": 28, "distill.embedding_on": "all"},
}


def episodes(vectors: np.ndarray, labels: list[str], n: int, seed: int) -> dict[str, float]:
    return {
        "20w1s": few_shot_accuracy(vectors, labels, way=20, shot=1, episodes=n, seed=seed),
        "5w5s": few_shot_accuracy(vectors, labels, way=5, shot=5, episodes=n, seed=seed),
    }


def run_variant(
    name: str,
    overrides: dict,
    params: Params,
    ws_root: Path,
    arrivals: list[str],
    unseen: tuple[list[Path], list[str]],
    state_root: Path,
    n_episodes: int,
    seed: int,
) -> dict:
    p = with_overrides(params, overrides)
    catalog = Catalog.load(resolve_workspace(params, ws_root).catalog)
    classes_dir = ws_root / "data" / "classes"
    train = catalog.records("train")
    model, state, steps = None, None, []
    for k, arrival in enumerate(arrivals):
        new = [r for r in train if r.arrival == arrival]
        cpu, wall = time.process_time(), time.perf_counter()
        step = train_continual(new, classes_dir, Recipe.of(p), init=model, state=state)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        model = step.train.model
        state = step.save_state(state_root / name / str(k))
        scores = episodes(embed_files(model, unseen[0]), unseen[1], n_episodes, seed)
        steps.append(
            {
                "arrival": arrival,
                "new_images": len(new),
                "train_seconds": step.train.seconds,
                "cpu_seconds": cpu,
                "step_wall_seconds": wall,
                "images_per_epoch": step.train.images,
                "last_loss": step.train.epoch_losses[-1],
                **scores,
            }
        )
        print(
            f"  {name} arrival {k + 1} ({arrival}, {len(new)} images): 20w1s {scores['20w1s']:.3f} 5w5s {scores['5w5s']:.3f} "
            f"train {step.train.seconds:.1f} s (cpu {cpu:.1f} s), loss {step.train.epoch_losses[-1]:.3f}",
            flush=True,
        )
    base = steps[1]["train_seconds"] if len(steps) > 1 else steps[0]["train_seconds"]
    base_cpu = steps[1]["cpu_seconds"] if len(steps) > 1 else steps[0]["cpu_seconds"]
    return {
        "overrides": overrides,
        "final": {k: steps[-1][k] for k in ("20w1s", "5w5s")},
        "arrivals": steps,
        "time_ratio_max_vs_second": max(s["train_seconds"] for s in steps[1:]) / base if len(steps) > 2 else 1.0,
        "cpu_ratio_max_vs_second": max(s["cpu_seconds"] for s in steps[1:]) / base_cpu if len(steps) > 2 else 1.0,
        "params": p.flat("model", "train", "replay", "distill"),
    }


def run_reference(
    paths: list[Path],
    names: list[str],
    unseen: tuple[list[Path], list[str]],
    n_episodes: int,
    seed: int,
    epochs: int = 30,
) -> dict:
    """The reference net of bench/oneshot.py, trained on these images and scored on these episodes."""
    wall = time.perf_counter()
    model, cpu = train_reference(paths, names, epochs=epochs, seed=seed)
    wall = time.perf_counter() - wall
    scores = episodes(embed_reference(model, unseen[0]), unseen[1], n_episodes, seed)
    print(
        f"  reference conv4: 20w1s {scores['20w1s']:.3f} 5w5s {scores['5w5s']:.3f} train {wall:.1f} s (cpu {cpu:.1f} s)",
        flush=True,
    )
    return {"final": scores, "train_seconds": wall, "cpu_seconds": cpu, "epochs": epochs, "images": len(paths)}


def pixel_baseline(unseen: tuple[list[Path], list[str]], n_episodes: int, seed: int) -> dict:
    tf = eval_transform(28)
    vectors = np.stack([tf(open_rgb(p)).flatten().numpy() for p in unseen[0]])
    return episodes(vectors, unseen[1], n_episodes, seed)


def markdown(report: dict) -> str:
    lines = [
        f"# One-shot recipe benchmark {report['date']} ({report['tag']})",
        "",
        f"{report['machine']}; Omniglot 5 alphabets as 5 arrivals; {report['unseen_classes']} unseen classes "
        f"({report['unseen_images']} images); {report['episodes']} episodes, seed {report['seed']}.",
        "",
    ]
    rows = []
    for name, r in report["variants"].items():
        a = r["arrivals"]
        rows.append(
            [
                name,
                f"{r['final']['20w1s']:.3f}",
                f"{r['final']['5w5s']:.3f}",
                " ".join(format(s["20w1s"], ".2f") for s in a),
                " ".join(format(s["train_seconds"], ".0f") for s in a),
                " ".join(format(s["cpu_seconds"], ".0f") for s in a),
                f"{r['time_ratio_max_vs_second']:.2f} ({r['cpu_ratio_max_vs_second']:.2f})",
            ]
        )
    if "reference" in report:
        ref = report["reference"]
        rows.append(
            [
                f"reference conv4 (joint, {ref['epochs']} epochs)",
                f"{ref['final']['20w1s']:.3f}",
                f"{ref['final']['5w5s']:.3f}",
                "",
                f"{ref['train_seconds']:.0f} (all 5 at once)",
                f"{ref['cpu_seconds']:.0f}",
                "",
            ]
        )
    px = report["pixels"]
    rows.append(["raw pixels 28 px", f"{px['20w1s']:.3f}", f"{px['5w5s']:.3f}", "", "", "", ""])
    header = [
        "variant",
        "20-way 1-shot",
        "5-way 5-shot",
        "20w1s per arrival",
        "train s per arrival",
        "cpu s per arrival",
        "max/2nd (cpu)",
    ]
    lines += [markdown_table(header, rows), ""]
    for name, r in report["variants"].items():
        lines.append(f"- {name}: {json.dumps(r['overrides'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="committed,params", help=f"comma-separated names from {', '.join(VARIANTS)}")
    ap.add_argument("--variant", action="append", default=[], help="'name:key=value,...' or 'name:base+key=value,...'")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-epochs", type=int, default=30)
    ap.add_argument("--episodes", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="run")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; 1 on a shared machine keeps CPU seconds honest (no threads spinning at barriers)",
    )
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument(
        "--omniglot", type=Path, default=OMNIGLOT, help="the Omniglot zip (default: ../shared/data/omniglot/...)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.omniglot.is_file():
        raise SystemExit(f"{args.omniglot} is absent")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # CPU: denormal floats late in training can slow every op many times over

    variants = [parse_variant(v, VARIANTS) for v in filter(None, args.variants.split(","))] + [
        parse_variant(v, VARIANTS) for v in args.variant
    ]
    params = with_overrides(load_params(args.params), {"train.device": "cpu"} if not torch.cuda.is_available() else {})
    for _, overrides in variants:
        with_overrides(params, overrides)  # fail fast on a bad key, before ingesting anything
    report: dict = {
        "date": date.today().isoformat(),
        "tag": args.tag,
        "episodes": args.episodes,
        "seed": args.seed,
        "machine": f"{platform.node()}: {torch.get_num_threads()} torch CPU threads",
        "variants": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnemo-oneshot-") as tmp:
        ws_root = Path(tmp) / "ws"
        stream = omniglot_stream(params, ws_root, source=args.omniglot)
        catalog = Catalog.load(resolve_workspace(params, ws_root).catalog)
        classes_dir = ws_root / "data" / "classes"
        unseen_records = catalog.records("unseen")
        unseen = ([classes_dir / r.id for r in unseen_records], [r.cls for r in unseen_records])
        train = catalog.records("train")
        report |= {
            "unseen_classes": len(set(unseen[1])),
            "unseen_images": len(unseen[0]),
            "train_images": len(train),
            "train_classes": len({r.cls for r in train}),
            "arrivals": stream.arrivals,
        }
        print(
            f"omniglot: {len(train)} training images of {report['train_classes']} classes; {report['unseen_classes']} "
            f"unseen classes ({len(unseen[0])} images); arrivals {', '.join(stream.arrivals)}",
            flush=True,
        )
        report["pixels"] = pixel_baseline(unseen, args.episodes, args.seed)
        print(f"  raw pixels: {report['pixels']}", flush=True)
        if not args.no_reference:
            report["reference"] = run_reference(
                [classes_dir / r.id for r in train],
                [r.cls for r in train],
                unseen,
                args.episodes,
                args.seed,
                args.reference_epochs,
            )
        for name, overrides in variants:
            print(f"variant {name}: {overrides}", flush=True)
            report["variants"][name] = run_variant(
                name, overrides, params, ws_root, stream.arrivals, unseen, Path(tmp) / "state", args.episodes, args.seed
            )
            report["seconds"] = time.perf_counter() - started
            stem = args.out / f"{report['date']}-oneshot-{args.tag}"
            write_run(stem, report, markdown(report))  # after each variant: partial results survive
    print(markdown(report))
    print(f"wrote {stem}.json and .md in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
