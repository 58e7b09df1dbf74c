"""The DVC stages' entry points (`python -m flows.stages <stage> [--params FILE]`, see dvc.yaml).

Like the CLI and the flows, this is an edge: it reads params.yaml and hands each component
its own section. No Prefect here: DVC runs the same component functions without it.

Each stage sees only the params sections dvc.yaml declares for it (`SECTIONS`): reading any
other is an error, so a stage can never depend on a param DVC does not know about
(tests/integration/test_dvc_pipeline.py checks dvc.yaml against `SECTIONS` both ways).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from components.config import Params, load_params
from components.ops.writer_lock import WorkspaceBusy, writer_lock
from components.workspace import Workspace, resolve_workspace

MODEL = "embedder.pt"  # under the workspace's dvc/


def ingest(params: Any, ws: Workspace) -> None:
    """Ingest every pending inbox arrival, leaving the inbox (a stage dependency) as it is."""
    from components.data.identity import pending_arrivals
    from components.data.ingest import ingest_arrival

    for path in pending_arrivals(ws, params.ingest):
        print(ingest_arrival(path, ws, params.ingest).summary())


def train(params: Any, ws: Workspace) -> None:
    """Continual training over the catalog's arrivals, as retraining after each one does: one
    continual step per arrival, in arrival order (the retrain flow's train_continual), each
    replaying the memory the step before saved and distilling from the model it trained.

    The stage is a function of its data and params: it replays the whole sequence from scratch,
    so `dvc exp run -S distill.embedding_weight=0.5` shows a lever's effect over the stream.
    (The Prefect retrain continues from the registered champion instead.)
    """
    from components.data.catalog import Catalog
    from components.modeling.embedder import save_embedder
    from components.training.checkpoints import clear_checkpoints
    from components.training.continual import Recipe
    from components.training.distributed import TRAIN_JOB, train_continual_on_devices

    out = ws.dvc_outputs
    out.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.load(ws.catalog)
    records = catalog.records("train")
    recipe, checkpoints = Recipe.of(params), out / "checkpoints"
    model, steps = None, list[dict[str, Any]]()
    with tempfile.TemporaryDirectory(prefix="dvc-train-", dir=ws.root) as tmp:
        state: Path | None = None
        for i, arrival in enumerate(sorted(catalog.arrivals)):
            new = [r for r in records if r.arrival == arrival]
            if not new:  # an arrival of unseen classes only: nothing to train on
                continue
            memory = steps[-1]["memory_after"] if steps else 0  # what the step before saved, this one reads
            step = train_continual_on_devices(  # the retrain flow's step, on train.devices devices
                new,
                ws.classes_dir,
                recipe,
                init=model,
                state=state,
                checkpoint_dir=checkpoints,
                job_dir=ws.root / TRAIN_JOB,  # where every node's ranks look; emptied for each step
            )
            steps.append(
                {
                    "arrival": arrival,
                    "new_images": len(new),
                    "replay_exemplars": memory,  # old classes' images mixed into this step's batches
                    "distilled_from_previous": model is not None,
                    "memory_after": len(step.memory),
                    "seconds": step.train.seconds,
                    "device": step.train.device,
                    "last_epoch": {k: v[-1] for k, v in step.train.epoch_metrics.items()},
                }
            )
            model, state = step.train.model, step.save_state(Path(tmp) / f"step-{i}")
            clear_checkpoints(checkpoints)
    if model is None:
        sys.exit("error: no trained class in the catalog yet: the train stage has nothing to learn")
    save_embedder(model, out / MODEL)
    (out / "train.json").write_text(
        json.dumps({"steps": steps, "train_loss": steps[-1]["last_epoch"]["train_loss"]}, indent=1) + "\n"
    )


def evaluate(params: Any, ws: Workspace) -> None:
    """Score the trained embedder and the pixel baseline on unseen classes and seen slices."""
    from components.data.catalog import Catalog
    from components.evaluation.assessment import evaluate_models
    from components.evaluation.metrics import json_number
    from components.modeling.embedder import load_embedder

    catalog = Catalog.load(ws.catalog)
    metrics = evaluate_models(ws, catalog, params.evaluate, load_embedder(ws.dvc_outputs / MODEL)).metrics
    rounded = {k: json_number(v) for k, v in metrics.items()}
    (ws.dvc_outputs / "metrics.json").write_text(json.dumps(rounded, indent=1) + "\n")
    print(json.dumps(rounded, indent=1))


def report(params: Any, ws: Workspace) -> None:
    """Plots and a markdown report from the evaluate stage's metrics.json."""
    from components.evaluation.report import PLOTS, write_report

    metrics = json.loads((ws.dvc_outputs / "metrics.json").read_text())
    write_report(metrics, params.evaluate.recall_at, ws.dvc_outputs / PLOTS)
    print((ws.dvc_outputs / PLOTS / "report.md").read_text())


STAGES = {"ingest": ingest, "train": train, "evaluate": evaluate, "report": report}
# The params sections each stage reads, as dvc.yaml declares them (whole sections: a stage
# hands its section to components, which may read any key of it).
SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("paths", "ingest"),
    "train": ("model", "train", "replay", "distill", "compat"),
    "evaluate": ("evaluate",),
    "report": ("evaluate",),
}


class StageParams:
    """The params one stage declared, and nothing else: reading another section is an error
    naming it, so dvc.yaml cannot fall behind what the stage's code reads."""

    def __init__(self, params: Params, stage: str) -> None:
        self._params, self._stage = params, stage

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_") or section not in SECTIONS[self._stage]:
            raise AttributeError(
                f"stage {self._stage} reads params section {section!r}, which dvc.yaml does not declare for it"
            )
        return getattr(self._params, section)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("stage", choices=sorted(STAGES), help="the DVC stage to run")
    ap.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    ws = resolve_workspace(params)
    try:
        with writer_lock(ws, f"dvc stage {args.stage}"):  # not beside a retrain or a promotion
            STAGES[args.stage](StageParams(params, args.stage), ws)
    except WorkspaceBusy as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
