"""Transfer benchmark: leave one alphabet out on Omniglot, scored as Lake et al. score one-shot.

Each fold trains an embedder on four of the five alphabets of
../shared/data/omniglot/images_background_small1.zip through mnemo's real training function
(components.training.loop.train_embedder, params.yaml's model and train sections, jointly on
every image of those alphabets) and scores it on the fifth, which no arrival of its training
contained: 20-way 1-shot trials with all 20 candidates drawn from the held-out alphabet
(Lake et al.'s within-alphabet protocol; 1000 seeded trials, each query every other drawing of
the 20 characters), plus Recall@1 and MAP@R among that alphabet's images.

Measured in the same run, on the same trials:
  reference   bench.oneshot's 4-layer conv net (28 px), trained on the same four alphabets
  centred     mnemo's embeddings with the mean of its training images' embeddings subtracted
              before normalising (test-time centring, as SimpleShot does)
  pixels      raw-pixel nearest neighbours (grey, 28 px)

    python -m bench.transfer                          # all five folds, params.yaml
    python -m bench.transfer --folds 2 --epochs 10 --tag e10   # a shorter run

Writes bench/results/<date>-transfer[-tag].json and .md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.common import OMNIGLOT, REPO, RESULTS, command_line, machine, markdown_table, omniglot_alphabets, write_run
from bench.oneshot import embed_reference, pixels, train_reference
from components.config import Params, load_params, with_overrides
from components.evaluation.metrics import few_shot_accuracy, retrieval_metrics, unit_rows
from components.modeling.embedder import embed_files
from components.training.loop import train_embedder

WAY, TRIALS, SEED = 20, 1000, 0


def images(folder: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(folder.glob("*/*.png"))
    return paths, [p.parent.name for p in paths]


def score(x: np.ndarray, labels: list[str]) -> dict[str, float | None]:
    m = retrieval_metrics(x, labels, [1])
    return {
        f"{WAY}way_1shot_within": few_shot_accuracy(x, labels, way=WAY, shot=1, episodes=TRIALS, seed=SEED),
        "recall_at_1": m.recall_at[1],
        "map_at_r": m.map_at_r,
    }


def fold(held_out: str, alphabets: dict[str, Path], params: Params) -> dict:
    train_paths, train_names, cpu = [], [], time.process_time()
    for name, folder in alphabets.items():
        if name != held_out:
            p, n = images(folder)
            train_paths += p
            train_names += n
    test_paths, test_labels = images(alphabets[held_out])
    start = time.perf_counter()
    result = train_embedder(train_paths, train_names, params.train, params.model)
    mnemo_cpu = time.process_time() - cpu
    x = embed_files(result.model, test_paths)
    mean = embed_files(result.model, train_paths).mean(axis=0)
    reference, reference_cpu = train_reference(train_paths, train_names)
    return {
        "held_out": held_out,
        "train_images": len(train_paths),
        "train_classes": len(set(train_names)),
        "test_images": len(test_paths),
        "test_classes": len(set(test_labels)),
        "mnemo_cpu_seconds": mnemo_cpu,
        "mnemo_wall_seconds": time.perf_counter() - start,
        "reference_cpu_seconds": reference_cpu,
        "scores": {
            "mnemo": score(x, test_labels),
            "centred": score(unit_rows(x - mean), test_labels),
            "reference": score(embed_reference(reference, test_paths), test_labels),
            "pixels": score(pixels(test_paths), test_labels),
        },
    }


def summary(folds: list[dict]) -> dict[str, dict[str, float]]:
    names = folds[0]["scores"]
    key = f"{WAY}way_1shot_within"
    out = {}
    for name in names:
        values = [f["scores"][name][key] for f in folds if f["scores"][name][key] is not None]
        out[name] = {"mean": float(np.mean(values)) if values else float("nan"), "folds": float(len(values))}
    return out


def markdown(report: dict) -> str:
    key = f"{WAY}way_1shot_within"
    means = report["summary"]
    lines = [
        f"# Transfer benchmark {report['date']}",
        "",
        f"{report['machine']}; params `{report['params_file']}` ({report['epochs']} epochs); leave one alphabet "
        f"out, {WAY}-way 1-shot within the held-out alphabet, {TRIALS} trials per fold.",
        "",
        markdown_table(
            [
                "held-out alphabet",
                "classes",
                "mnemo",
                "mnemo centred",
                "reference conv4",
                "raw pixels",
                "mnemo R@1",
                "mnemo CPU s",
            ],
            (
                [
                    f["held_out"],
                    f["test_classes"],
                    *(_cell(f["scores"][n][key]) for n in ("mnemo", "centred", "reference", "pixels")),
                    _cell(f["scores"]["mnemo"]["recall_at_1"]),
                    f"{f['mnemo_cpu_seconds']:.0f}",
                ]
                for f in report["folds"]
            ),
        ),
        "",
        "Mean over folds: "
        + ", ".join(f"{n} {means[n]['mean']:.3f}" for n in ("mnemo", "centred", "reference", "pixels"))
        + f"; mnemo - reference {means['mnemo']['mean'] - means['reference']['mean']:+.3f} "
        f"(targets: mean >= 0.85 and >= 0.08 above the reference).",
    ]
    return "\n".join(lines) + "\n"


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--folds", type=int, default=5, help="how many held-out alphabets (in alphabet order)")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (a shorter run)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not OMNIGLOT.is_file():
        raise SystemExit(f"{OMNIGLOT} is absent: this benchmark needs the Omniglot sample")
    params = load_params(args.params)
    if args.epochs is not None:
        params = with_overrides(params, {"train.epochs": args.epochs})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnemo-transfer-") as tmp:
        alphabets = dict(omniglot_alphabets(OMNIGLOT, Path(tmp)))
        folds = []
        for held_out in list(alphabets)[: args.folds]:
            print(f"fold: {held_out} held out", flush=True)
            folds.append(fold(held_out, alphabets, params))
            print(f"  {folds[-1]['scores']}", flush=True)
    report = {
        "date": date.today().isoformat(),
        "command": command_line("transfer"),
        "machine": machine(),
        "params_file": str(args.params),
        "epochs": params.train.epochs,
        "params": params.flat("model", "train"),
        "folds": folds,
        "summary": summary(folds),
        "seconds": time.perf_counter() - start,
    }
    stem = args.out / f"{report['date']}-transfer{'-' + args.tag if args.tag else ''}"
    write_run(stem, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
