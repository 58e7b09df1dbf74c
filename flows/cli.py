"""The `mnemo` command line: the edge where params.yaml is read and flows are started.

Commands import torch, mlflow, lancedb and prefect when they run, not at start-up, so
`mnemo --help` and argument errors answer at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, RenderableType
from rich.table import Table

from components.config import ConfigError, Params, Workspace, load_params, resolve_workspace

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Continual learning for image embeddings.")
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, file names unbroken

WorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", "-w", envvar="MNEMO_WORKSPACE", help="State directory (default: params paths.workspace, ./workspace).")]
ParamsOpt = Annotated[Path, typer.Option("--params", envvar="MNEMO_PARAMS", help="The params.yaml to use.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _setup(params_path: Path, workspace: Path | None) -> tuple[Params, Workspace]:
    try:
        params = load_params(params_path)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    return params, resolve_workspace(params, workspace)


def _emit(payload: dict, as_json: bool, human: RenderableType) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=1, default=str, ensure_ascii=False) + "\n")
    else:
        Console().print(human)


@app.command()
def demo(
    arrivals: Annotated[int | None, typer.Option(min=0, help="Further arrivals after the base one (default: params demo.arrivals).")] = None,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Render a base arrival plus N more from fonts and retrain after each, next to a pixel baseline."""
    p, ws = _setup(params, workspace)
    from flows.demo import run_demo

    steps = run_demo(p, str(ws.root), arrivals)
    final = steps[-1].summary.metrics if steps else {}
    if final and final["unseen_recall_at_1"] <= final["baseline_unseen_recall_at_1"]:
        err.print("[yellow]final unseen Recall@1 does not beat the pixel baseline[/]")
        raise typer.Exit(1)


@app.command()
def ingest(
    directory: Annotated[Path | None, typer.Argument(help="An arrival folder (class sub-folders); default: every pending arrival in the inbox.")] = None,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Validate and store arrivals; bad files go to quarantine with a reason."""
    p, ws = _setup(params, workspace)
    from components.data.ingest import ingest_arrival, pending_arrivals

    if directory is not None and not directory.is_dir():
        err.print(f"[red]error:[/] {directory}: not a directory")
        raise typer.Exit(2)
    targets = [directory] if directory is not None else pending_arrivals(ws)
    reports = []
    for path in targets:
        inside_inbox = path.resolve().parent == ws.inbox.resolve()
        reports.append(ingest_arrival(path, ws, p.ingest, remove_source=inside_inbox))
    lines = [r.summary() for r in reports] or ["nothing to ingest"]
    for r in reports:
        lines += [f"  rejected {x.file}: {x.reason}" for x in r.rejected]
    _emit({"arrivals": [asdict(r) for r in reports]}, as_json, "\n".join(lines))


@app.command()
def retrain(as_json: JsonOpt = False, workspace: WorkspaceOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Run the retrain flow once: ingest, train, evaluate, gate, register, index, promote."""
    p, ws = _setup(params, workspace)
    from flows.retrain import retrain as retrain_flow

    summary = retrain_flow(p, str(ws.root))
    _emit(summary.to_dict(), as_json, summary.message)


@app.command()
def status(as_json: JsonOpt = False, workspace: WorkspaceOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Where things stand: the champion, its table and metrics, the data."""
    p, ws = _setup(params, workspace)
    from components.data.class_registry import ClassRegistry
    from components.data.ingest import pending_arrivals
    from components.index import table_rows
    from components.registry import ModelRegistry

    champion = ModelRegistry(ws, p.registry).champion()
    catalog = ClassRegistry.load(ws.class_registry)
    payload = {
        "workspace": str(ws.root),
        "model_name": p.registry.model_name,
        "tracking_uri": ws.tracking_uri,
        "lancedb_uri": ws.lancedb_uri,
        "champion": None if champion is None else {
            "version": champion.version, "table": champion.table, "table_rows": table_rows(ws, champion.table) if champion.table else None,
            "arrivals": champion.arrivals, "metrics": champion.metrics,
        },
        "data": {
            "arrivals": sorted(catalog.arrivals),
            "classes": len(catalog.classes),
            "unseen_classes": len(catalog.classes_with_split("unseen")),
            "images": len(catalog.images),
            "pending_arrivals": [a.name for a in pending_arrivals(ws)],
        },
    }
    table = Table(show_header=False, title="mnemo status")
    champ = "none yet" if champion is None else f"v{champion.version} (table {champion.table}, unseen R@1 {champion.metrics.get('unseen_recall_at_1', float('nan')):.3f})"
    for key, value in [("workspace", ws.root), ("model", p.registry.model_name), ("champion", champ),
                       ("arrivals", len(catalog.arrivals)), ("classes", len(catalog.classes)), ("images", len(catalog.images)),
                       ("pending", len(payload["data"]["pending_arrivals"]))]:
        table.add_row(key, str(value))
    _emit(payload, as_json, table)


@app.command()
def query(
    images: Annotated[list[Path], typer.Argument(help="Image files to look up.")],
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours per image.")] = 5,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Nearest stored images for each query image, from the live (champion model, table) pair."""
    p, ws = _setup(params, workspace)
    import pandas as pd

    from components.data.ingest import validate_image
    from components.index import search
    from components.registry import ModelRegistry

    registry = ModelRegistry(ws, p.registry)
    champion = registry.champion()  # resolve once: model and table come from this one version
    if champion is None or not champion.table:
        err.print(f"[red]error:[/] no champion model in {ws.tracking_uri}; run `mnemo demo` or `mnemo retrain` first")
        raise typer.Exit(1)
    payloads = []
    for path in images:
        try:
            payloads.append(path.read_bytes())
        except OSError as exc:
            err.print(f"[red]error:[/] {path}: cannot read ({exc.strerror})")
            raise typer.Exit(2) from None
        _, reason = validate_image(payloads[-1], p.ingest)  # the limits ingest applies
        if reason is not None:
            err.print(f"[red]error:[/] {path}: {reason}")
            raise typer.Exit(2)
    vectors = registry.load_pyfunc(champion.version).predict(pd.DataFrame({"image": payloads}))
    try:
        results = search(ws, champion.table, vectors, k)
    except FileNotFoundError as exc:
        err.print(f"[red]error:[/] champion v{champion.version}: {exc}")
        raise typer.Exit(1) from None
    lines = []
    for path, hits in zip(images, results):
        lines.append(f"{path}: " + ", ".join(f"{h['class']} ({h['distance']:.3f})" for h in hits))
    _emit({"model_version": champion.version, "table": champion.table, "results": results}, as_json,
          f"model v{champion.version}, table {champion.table}\n" + "\n".join(lines))


if __name__ == "__main__":
    app()
