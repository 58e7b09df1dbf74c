"""One-shot benchmark: Omniglot through mnemo's real CLI path, next to a small reference net.

The five alphabets of ../shared/data/omniglot/images_background_small1.zip arrive one by one
in the inbox (one folder per alphabet, one class folder per character), and after each
`mnemo ingest` + `mnemo retrain` run as a user would run them, with the params file given.
The champion mnemo ends with is loaded through its MLflow pyfunc, as any client loads it,
and scored on the classes no model ever trained on (ingest's held-out `unseen` classes):
20-way 1-shot and 5-way 5-shot episode accuracy (seeded, the same episodes for everyone),
plus Recall@1 / MAP@R among those images.

Measured in the same run on the same episodes:
  reference   a 4-layer conv net (4 x conv3x3-64-BN-ReLU-maxpool, 28 px, multi-similarity loss
              and miner from pytorch-metric-learning, random affine augmentation, Adam 1e-3,
              30 epochs), trained jointly on exactly the images mnemo trained on (role `train`)
  pixels      raw-pixel nearest neighbours (grey, 28 px)

    python -m bench.oneshot                       # params.yaml
    python -m bench.oneshot --params other.yaml --tag variant

Writes bench/results/<date>-oneshot[-tag].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from bench.common import OMNIGLOT, REPO, RESULTS, command_line, machine, markdown_table, omniglot_alphabets, write_run
from components.config import load_params
from components.data.catalog import Catalog
from components.data.transforms import open_rgb
from components.evaluation import keys
from components.evaluation.metrics import few_shot_accuracy, retrieval_metrics
from components.workspace import resolve_workspace

TASKS = ((20, 1), (5, 5))
EPISODES = 1000
SEED = 0


def mnemo(*args: str, ws: Path, params: Path) -> dict:
    """One `mnemo` command as a user runs it; its --json answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNEMO_", "MLFLOW_", "PREFECT_API"))}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--json", "--workspace", str(ws), "--params", str(params)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"mnemo {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def scores(vectors: np.ndarray, labels: list[str]) -> dict[str, float]:
    out = {
        f"{way}way_{shot}shot": few_shot_accuracy(vectors, labels, way=way, shot=shot, episodes=EPISODES, seed=SEED)
        for way, shot in TASKS
    }
    r = retrieval_metrics(vectors, labels, (1,))
    return out | {"recall_at_1": r.recall_at[1], "map_at_r": r.map_at_r}


class Conv4(nn.Module):
    """The reference: 4 x (conv3x3, 64 channels, BN, ReLU, max-pool 2); 28 px grey in, 64-d L2-normalised out."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.net = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def grey(size: int, augment: bool) -> v2.Compose:
    steps: list[nn.Module] = [v2.Grayscale(), v2.Resize((size, size), antialias=True)]
    if augment:  # strokes: small rotations, shears, shifts and scalings on the white page
        steps.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10, fill=255))
    return v2.Compose([v2.PILToTensor(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.5,), (0.5,))])


class Images(Dataset):
    def __init__(self, paths: list[Path], labels: list[int], transform: v2.Compose) -> None:
        self.images = [open_rgb(p) for p in paths]  # decoded once: the net is so small that decoding would dominate
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def train_reference(paths: list[Path], names: list[str], epochs: int = 30, seed: int = SEED) -> tuple[Conv4, float]:
    """The reference net trained jointly on the images; with its process CPU seconds."""
    from pytorch_metric_learning import losses, miners, samplers

    torch.manual_seed(seed)
    classes = sorted(set(names))
    labels = [classes.index(n) for n in names]
    data = Images(paths, labels, grey(28, augment=True))
    sampler = samplers.MPerClassSampler(labels, m=4, batch_size=64, length_before_new_iter=len(labels))
    loader = DataLoader(data, batch_size=64, sampler=sampler, drop_last=True)
    model = Conv4()
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cpu = time.process_time()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            e = model(x)
            loss = loss_fn(e, y, miner(e, y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), time.process_time() - cpu


@torch.inference_mode()
def embed_reference(model: Conv4, paths: list[Path]) -> np.ndarray:
    tf = grey(28, augment=False)
    return torch.cat(
        [model(torch.stack([tf(open_rgb(p)) for p in paths[i : i + 256]])) for i in range(0, len(paths), 256)]
    ).numpy()


def pixels(paths: list[Path]) -> np.ndarray:
    tf = grey(28, augment=False)
    x = np.stack([tf(open_rgb(p)).flatten().numpy() for p in paths])
    return x - x.mean(axis=1, keepdims=True)


def champion_vectors(ws_root: Path, params_file: Path, paths: list[Path]) -> tuple[np.ndarray, str]:
    """The champion through its pyfunc, exactly as a client loads it."""
    import mlflow
    import pandas as pd

    params = load_params(params_file)
    ws = resolve_workspace(params, ws_root)
    mlflow.set_tracking_uri(ws.tracking_uri)
    mlflow.set_registry_uri(ws.tracking_uri)
    uri = f"models:/{params.registry.model_name}@champion"
    model = mlflow.pyfunc.load_model(uri)
    return np.asarray(model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))), uri


def run(params_file: Path, root: Path) -> dict:
    ws = root / "ws"
    steps = []
    for alphabet, arrival in omniglot_alphabets(OMNIGLOT, root / "drop"):
        start, cpu = time.perf_counter(), time.process_time()
        ingested = mnemo("ingest", str(arrival), ws=ws, params=params_file)
        retrained = mnemo("retrain", ws=ws, params=params_file)
        seconds = time.perf_counter() - start
        steps.append(
            {
                "arrival": alphabet,
                "stored": ingested["arrivals"][0]["stored"],
                "status": retrained["status"],
                "version": retrained["version"],
                "seconds": seconds,
                "unseen_recall_at_1": retrained["metrics"].get("unseen_recall_at_1"),
                **{k: v for k, v in retrained["metrics"].items() if k.startswith("unseen_") and k.endswith("shot")},
                # the champion before this retrain on the arrival's classes (none for the first)
                "forward_transfer": keys.transfer_values(retrained["metrics"]).get(
                    keys.slice_key(ingested["arrivals"][0]["arrival"]), {}
                ),
            }
        )
        print(
            f"{alphabet}: {retrained['status']} v{retrained['version']} in {seconds:.0f} s; "
            f"unseen R@1 {retrained['metrics'].get('unseen_recall_at_1', float('nan')):.3f}",
            flush=True,
        )

    catalog = Catalog.load(resolve_workspace(load_params(params_file), ws).catalog)
    classes_dir = ws / "data" / "classes"
    unseen = catalog.records("unseen")
    unseen_paths, unseen_labels = [classes_dir / r.id for r in unseen], [r.cls for r in unseen]
    trained = catalog.records("train")
    vectors, uri = champion_vectors(ws, params_file, unseen_paths)
    results = {"mnemo": scores(vectors, unseen_labels) | {"model": uri}}
    reference, cpu = train_reference([classes_dir / r.id for r in trained], [r.cls for r in trained])
    results["reference"] = scores(embed_reference(reference, unseen_paths), unseen_labels) | {"train_cpu_seconds": cpu}
    results["pixels"] = scores(pixels(unseen_paths), unseen_labels)
    return {
        "steps": steps,
        "results": results,
        "unseen_classes": len(set(unseen_labels)),
        "unseen_images": len(unseen),
        "trained_classes": len({r.cls for r in trained}),
        "trained_images": len(trained),
    }


def markdown(report: dict) -> str:
    lines = [
        f"# One-shot benchmark {report['date']}",
        "",
        f"{report['machine']}; params `{report['params_file']}`; "
        f"{report['trained_classes']} trained classes ({report['trained_images']} images), "
        f"{report['unseen_classes']} held-out classes ({report['unseen_images']} images), {EPISODES} episodes per task.",
        "",
        markdown_table(
            ["model", "20-way 1-shot", "5-way 5-shot", "R@1", "MAP@R"],
            (
                [name, *(f"{r[k]:.3f}" for k in ("20way_1shot", "5way_5shot", "recall_at_1", "map_at_r"))]
                for name, r in report["results"].items()
            ),
        ),
        "",
        markdown_table(
            [
                "arrival",
                "retrain",
                "version",
                "wall s (ingest + retrain)",
                "unseen R@1 (gate)",
                "forward transfer (champion before: R@1, 1-shot within arrival)",
            ],
            (
                [
                    s["arrival"],
                    s["status"],
                    s["version"],
                    f"{s['seconds']:.0f}",
                    "–" if s["unseen_recall_at_1"] is None else f"{s['unseen_recall_at_1']:.3f}",
                    ", ".join(
                        f"{k} {v:.3f}" for k, v in sorted(s.get("forward_transfer", {}).items()) if k != "r_precision"
                    )
                    or "–",
                ]
                for s in report["steps"]
            ),
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not OMNIGLOT.is_file():
        raise SystemExit(f"{OMNIGLOT} is absent: this benchmark needs the Omniglot sample")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnemo-oneshot-") as tmp:
        report = {
            "date": date.today().isoformat(),
            "command": command_line("oneshot"),
            "machine": machine(),
            "params_file": str(args.params),
            "params": load_params(args.params).flat("model", "train", "replay", "distill"),
            **run(args.params.resolve(), Path(tmp)),
        }
    report["seconds"] = time.perf_counter() - start
    stem = args.out / f"{report['date']}-oneshot{'-' + args.tag if args.tag else ''}"
    write_run(stem, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
