"""The DVC stages' entry points (`python -m flows.stages <stage> [--params FILE]`, see dvc.yaml).

Like the CLI and the flows, this is an edge: it reads params.yaml and hands each component
its own section. No Prefect here: DVC runs the same component functions without it.
"""

from __future__ import annotations

import argparse
import json
import sys

from components.config import Params, load_params
from components.ops.writer_lock import WorkspaceBusy, writer_lock
from components.workspace import Workspace, resolve_workspace


def ingest(params: Params, ws: Workspace) -> None:
    """Ingest every pending inbox arrival, leaving the inbox (a stage dependency) as it is."""
    from components.data.ingest import ingest_arrival, pending_arrivals

    for path in pending_arrivals(ws, params.ingest):
        print(ingest_arrival(path, ws, params.ingest).summary())


def train(params: Params, ws: Workspace) -> None:
    """Train an embedder from scratch on every trained class's training images."""
    from components.data.catalog import Catalog
    from components.modeling.embedder import save_embedder
    from components.training.loop import train_embedder

    records = Catalog.load(ws.catalog).records("train")
    result = train_embedder(
        [ws.classes_dir / r.id for r in records], [r.cls for r in records], params.train, params.model
    )
    ws.dvc_outputs.mkdir(parents=True, exist_ok=True)
    save_embedder(result.model, ws.dvc_outputs / "embedder.pt")
    summary = {
        "train_seconds": result.seconds,
        "train_images": result.images,
        "train_classes": result.classes,
        "train_loss": result.epoch_losses[-1],
        "device": result.device,
    }
    (ws.dvc_outputs / "train.json").write_text(json.dumps(summary, indent=1) + "\n")


def evaluate(params: Params, ws: Workspace) -> None:
    """Score the trained embedder and the pixel baseline on unseen classes and seen slices."""
    from components.data.catalog import Catalog
    from components.evaluation.assessment import evaluate_models
    from components.evaluation.metrics import json_number
    from components.modeling.embedder import load_embedder

    catalog = Catalog.load(ws.catalog)
    metrics = evaluate_models(ws, catalog, params.evaluate, load_embedder(ws.dvc_outputs / "embedder.pt"))
    rounded = {k: json_number(v) for k, v in metrics.items()}
    (ws.dvc_outputs / "metrics.json").write_text(json.dumps(rounded, indent=1) + "\n")
    print(json.dumps(rounded, indent=1))


def report(params: Params, ws: Workspace) -> None:
    """Plots and a markdown report from the evaluate stage's metrics.json."""
    from components.evaluation.report import PLOTS, write_report

    metrics = json.loads((ws.dvc_outputs / "metrics.json").read_text())
    write_report(metrics, params.evaluate.recall_at, ws.dvc_outputs / PLOTS)
    print((ws.dvc_outputs / PLOTS / "report.md").read_text())


STAGES = {"ingest": ingest, "train": train, "evaluate": evaluate, "report": report}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("stage", choices=sorted(STAGES), help="the DVC stage to run")
    ap.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    ws = resolve_workspace(params)
    try:
        with writer_lock(ws, f"dvc stage {args.stage}"):  # not beside a retrain or a promotion
            STAGES[args.stage](params, ws)
    except WorkspaceBusy as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
