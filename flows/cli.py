"""The `mnemo` command line: the edge where params.yaml is read and flows are started.

Commands import torch, mlflow, lancedb and prefect when they run, not at start-up, so
`mnemo --help` and argument errors answer at once.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.table import Table
from typer.core import TyperGroup

from components.config import ConfigError, Params, load_params
from components.evaluation import keys
from components.workspace import Workspace, mask_uri, redact, resolve_workspace, settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from components.registry.promotion import ChampionMove
    from components.status import ChampionStatus

_URIS: list[str] = []  # the workspace's URIs once known: their secrets never reach the terminal


class _OneLineErrors(TyperGroup):
    """The commands' group: an error any command can meet (`_error_line`) ends it with one
    `error:` line and exit code 1, not a traceback; every other error keeps its traceback."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click.Context, not exported
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):  # a command's own ending, its line already printed
            raise
        except Exception as exc:
            line = _error_line(exc)
            if line is None:
                raise
            err.print(f"[red]error:[/] {line}")
            raise typer.Exit(1) from None


def _error_line(exc: Exception) -> str | None:
    """The one line for a store another process holds locked or a damaged store; None for any other error."""
    from components.data.manifests import ManifestDamaged
    from components.ops.transient import causes, is_store_locked
    from components.registry.sqlite_store import MLFLOW_BUSY_TIMEOUT_S, RegistryBusy, RegistryDamaged
    from components.serving.live import DamagedPair
    from components.vectors.tables import TableDamaged

    if isinstance(exc, RegistryBusy):  # waited for where the registry is opened: nothing was changed
        return str(exc)
    if isinstance(exc, ManifestDamaged | DamagedPair | TableDamaged | RegistryDamaged):  # a damaged store, in one line
        return redact(str(exc), *_URIS)
    if not is_store_locked(exc):
        return None
    from mlflow.exceptions import MlflowException

    if not _URIS or not any(isinstance(e, MlflowException) for e in causes(exc)):
        first = redact(str(exc), *_URIS).splitlines()[0]
        return (
            f"busy: a store is locked by another process ({first}); what was done before is kept: run the command again"
        )
    # Locked after the registry was opened: MLflow's own wait ran out part-way through the command.
    return (
        f"registry busy: {mask_uri(_URIS[0])} was locked by another process mid-command "
        f"(waited {MLFLOW_BUSY_TIMEOUT_S} s); what was done before is kept: run the command again"
    )


# No locals in tracebacks: they would print the workspace's URIs, credentials and all.
app = typer.Typer(
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Continual learning for image embeddings.",
)


class _RedactingConsole(Console):
    """A console that masks the workspace URIs' credentials in everything it prints."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o, *_URIS) if isinstance(o, str) else o for o in objects), **kwargs)


err = _RedactingConsole(stderr=True, soft_wrap=True)  # error lines stay whole, file names unbroken

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="State directory (default: $MNEMO_WORKSPACE, else params paths.workspace, ./workspace).",
    ),
]
ParamsOpt = Annotated[Path, typer.Option("--params", envvar="MNEMO_PARAMS", help="The params.yaml to use.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ActorOpt = Annotated[
    str | None,
    typer.Option("--actor", help="Who acts, for the promotion log (default: $MNEMO_ACTOR, else your login name)."),
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why, for the promotion log.")]


def _setup(params_path: Path, workspace: Path | None) -> tuple[Params, Workspace]:
    # stdout carries mnemo's answer (--json must parse): not MLflow's "View run at <server URL>" lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Prefect's ephemeral server gets 20 s to start by default; a busy 2-core machine can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # No anonymous usage telemetry from mnemo's Prefect servers: without internet it only prints
    # "Failed to send telemetry" errors (README, "Quiet logs").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not sys.stderr.isatty():  # MLflow's per-file download bar: hundreds of \r frames in a log file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        params = load_params(params_path)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    ws = resolve_workspace(params, workspace)
    _URIS[:] = [ws.tracking_uri, ws.lancedb_uri]
    return params, ws


def _emit(payload: dict, as_json: bool, human: RenderableType) -> None:
    if as_json:
        sys.stdout.write(redact(json.dumps(payload, indent=1, default=str, ensure_ascii=False), *_URIS) + "\n")
    else:
        _RedactingConsole(soft_wrap=True).print(human)  # long file names stay whole


@app.command()
def demo(
    arrivals: Annotated[
        int | None, typer.Option(min=0, help="Further arrivals after the base one (default: params demo.arrivals).")
    ] = None,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Render a base arrival plus N more from fonts and retrain after each, next to a pixel baseline."""
    p, ws = _setup(params, workspace)
    from flows.demo import run_demo

    steps = run_demo(p, str(ws.root), arrivals)
    final = steps[-1].summary.metrics if steps else {}
    r1 = keys.unseen("recall_at_1")
    if final and final[r1] <= final[keys.baseline(r1)]:
        err.print("[yellow]final unseen Recall@1 does not beat the pixel baseline[/]")
        raise typer.Exit(1)


@app.command()
def ingest(
    directory: Annotated[
        Path | None,
        typer.Argument(help="An arrival folder (class sub-folders); default: every pending arrival in the inbox."),
    ] = None,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Validate and store arrivals (bad files go to quarantine with a reason), then make every stored image queryable."""
    p, ws = _setup(params, workspace)
    from components.data.inbox import inbox_lock, ingest_inbox
    from components.data.ingest import ingest_arrival
    from components.data.store import IngestError
    from components.registry.promotion import Promoter
    from components.registry.sqlite_store import RegistryBusy
    from components.vectors.tables import IndexBuildError

    if directory is not None and (directory.is_symlink() or not directory.is_dir()):
        what = "a symbolic link; links are not followed" if directory.is_symlink() else "not a directory"
        err.print(f"[red]error:[/] {directory}: {what}")
        raise typer.Exit(2)
    try:
        if directory is None:
            reports = ingest_inbox(ws, p.ingest)
        else:
            with inbox_lock(ws):  # one catalog writer at a time
                in_inbox = directory.resolve().parent == ws.inbox.resolve()
                reports = [ingest_arrival(directory, ws, p.ingest, remove_source=in_inbox)]
    except (IngestError, FileNotFoundError) as exc:  # read-only or full workspace: one line, nothing kept
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    lines = [r.summary() for r in reports] or ["nothing to ingest"]
    for r in reports:
        lines += [f"  rejected {x.file}: {x.reason}" for x in r.rejected]
        lines += [f"  warning: {w}" for w in r.warnings]
    try:  # also with an empty inbox: an earlier ingest may have stopped between storing and appending
        caught = Promoter(
            ws, p.registry, p.index, p.train.device
        ).catch_up()  # what the ingest flow's catch_up task runs
    except (IndexBuildError, FileNotFoundError, RegistryBusy) as exc:
        why = exc.reason if isinstance(exc, RegistryBusy) else exc  # its "nothing was changed" is the registry's
        err.print(f"[red]error:[/] images are stored but not queryable yet (the next ingest appends them): {why}")
        raise typer.Exit(1) from None
    stored = any(r.stored for r in reports)
    if caught.table and (stored or caught.added):
        lines.append(f"queryable now: {caught.added} image(s) appended to {caught.table} (champion v{caught.version})")
    elif stored:
        lines.append("no champion yet: the first retrain indexes these images")
    _emit(
        {"arrivals": [asdict(r) for r in reports], "hot_add": caught.to_dict()},
        as_json,
        "\n".join(lines),
    )
    if any(r.status == "nothing_stored" or not r.complete for r in reports):
        raise typer.Exit(1)  # an unattended job must notice: an empty arrival, or files it could not read


@app.command()
def retrain(as_json: JsonOpt = False, workspace: WorkspaceOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Run the retrain flow once: ingest, train, evaluate, gate, register, index, promote."""
    p, ws = _setup(params, workspace)
    from components.ops.writer_lock import WorkspaceBusy, writer_lock
    from flows.retrain import retrain as retrain_flow

    try:
        with writer_lock(ws, "retrain"):  # refused before Prefect starts when another writer is at work
            summary = retrain_flow(p, str(ws.root))
    except WorkspaceBusy as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    _emit(summary.to_dict(), as_json, summary.message)


@app.command()
def status(as_json: JsonOpt = False, workspace: WorkspaceOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Where things stand: champion and challenger, the promotion log, the latest gate report, the data."""
    p, ws = _setup(params, workspace)
    from components.registry.mlflow_registry import ModelRegistry
    from components.status import workspace_status
    from flows.progress import current_retrain

    registry = ModelRegistry(ws, p.registry)
    status = workspace_status(ws, registry, p.ingest)
    status.retrain = current_retrain(ws, registry)
    champion, challenger, gate, data = status.champion, status.challenger, status.gate, status.data
    table = Table(show_header=False, title="mnemo status")
    champ = "none yet" if champion is None else _champion_line(champion)
    chall = "none yet" if challenger is None else f"v{challenger.version} (gate: {challenger.verdict or 'unknown'})"
    last = status.promotions[-1] if status.promotions else None
    moved = (
        "none yet"
        if last is None
        else f"{last['kind']} v{last['from'] or '-'} -> v{last['to']} at {last['time']} by {last['actor']}: {last['reason']}"
    )
    for key, value in [
        ("workspace", ws.root),
        ("model", p.registry.model_name),
        ("champion", champ),
        *([("damaged", champion.damaged)] if champion is not None and champion.damaged else []),
        ("challenger", chall),
        *(
            (f"transfer to {arrival}", ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in m.items()))
            for arrival, m in (challenger.forward_transfer.items() if challenger is not None else ())
        ),
        ("last promotion", moved),
        *([("retrain", status.retrain.line())] if status.retrain.state else []),  # nothing when none runs
        *([("gate", f"v{gate['candidate']} {gate['verdict']}: " + "; ".join(gate["reasons"]))] if gate else []),
        ("arrivals", len(data.arrivals)),
        ("classes", data.classes),
        ("images", data.images),
        ("pending", len(data.pending_arrivals)),
    ]:
        table.add_row(key, str(value))
    _emit(status.model_dump(mode="json"), as_json, table)


def _champion_line(champion: ChampionStatus) -> str:
    """'v2 (table embeddings_v2, 60 rows, unseen R@1 ...)', with what its table lacks when it lacks anything."""
    rows = "table missing" if champion.table_rows is None else f"{champion.table_rows} rows"
    line = f"v{champion.version} (table {champion.table}, {rows}, {_headline(champion.metrics)})"
    if champion.missing_rows:
        line += f"; {champion.missing_rows} stored image(s) missing from its table (the next ingest appends them)"
    if champion.compatible_from:
        left = champion.older_rows
        line += f"; started from v{champion.compatible_from}'s vectors, " + (
            "backfill done" if left == 0 else f"{left} row(s) still v{champion.compatible_from}'s (`mnemo backfill`)"
        )
    return line


def _headline(metrics: dict[str, float | None]) -> str:
    """Unseen R@1 and every few-shot accuracy measured, e.g. 'unseen R@1 0.812, 20way_1shot 0.873, 5way_5shot 0.961'."""

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    unseen = keys.under({k: v for k, v in metrics.items() if v is not None}, keys.UNSEEN)
    shots = [f"{task} {shown(v)}" for task, v in sorted(unseen.items()) if task.endswith("shot")]
    return ", ".join([f"unseen R@1 {shown(unseen.get('recall_at_1'))}", *shots])


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The registered model version to serve.")],
    reason: ReasonOpt = "",
    force: Annotated[
        bool,
        typer.Option("--force", help="Promote a version that failed the gate (never one without a validated table)."),
    ] = False,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Make VERSION the champion: its table goes live at once; the move is logged."""
    p, ws = _setup(params, workspace)
    from components.registry.promotion import Promoter

    _move(
        lambda: Promoter(ws, p.registry, p.index, p.train.device).promote(
            version, reason=reason, actor=actor, force=force
        ),
        as_json,
    )


@app.command()
def rollback(
    reason: ReasonOpt = "",
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    to: Annotated[
        str | None,
        typer.Option("--to", help="The version to go back to (default: the previous champion in the promotion log)."),
    ] = None,
) -> None:
    """Move the champion back to the previous one (or --to VERSION), with its table; the move is logged."""
    p, ws = _setup(params, workspace)
    from components.registry.promotion import Promoter

    _move(lambda: Promoter(ws, p.registry, p.index, p.train.device).rollback(to, reason=reason, actor=actor), as_json)


def _move(move: Callable[[], ChampionMove], as_json: bool) -> None:
    """Run a promotion or rollback; a refusal exits 1 (2 for a version that does not exist) with every reason."""
    from components.ops.writer_lock import WorkspaceBusy
    from components.registry.promotion import PromotionRefused, UnknownVersion

    try:
        done = move()
    except (PromotionRefused, WorkspaceBusy) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2 if isinstance(exc, UnknownVersion) else 1) from None
    _emit(
        {"champion": done.version, "table": done.table, "promotion": done.entry.to_dict() if done.entry else None},
        as_json,
        done.message,
    )


@app.command()
def reindex(
    version: Annotated[str, typer.Argument(help="The registered model version whose table to build.")],
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Build and validate VERSION's table over every stored image; the champion alias does not move."""
    p, ws = _setup(params, workspace)
    from components.ops.writer_lock import WorkspaceBusy
    from components.registry.promotion import Promoter, UnknownVersion
    from components.vectors.tables import IndexBuildError

    try:
        from flows.reindex import row_writer

        promoter = Promoter(ws, p.registry, p.index, p.train.device)
        built = promoter.reindex(promoter.version(version).version, write=row_writer(ws, p.index, p.train.device))
    except UnknownVersion as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except (IndexBuildError, FileNotFoundError, WorkspaceBusy) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    _emit(asdict(built), as_json, f"v{built.version}: table {built.table} built and validated ({built.rows} rows)")


@app.command()
def backfill(
    version: Annotated[
        str | None, typer.Argument(help="The version whose table to backfill (default: the champion's).")
    ] = None,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Re-embed the rows of a compatible version's table that the older model embedded (the retrain flow
    starts it after such a promotion; run it again to carry on after a kill). Queries keep answering."""
    p, ws = _setup(params, workspace)
    from components.ops.writer_lock import WorkspaceBusy
    from components.vectors.tables import IndexBuildError, TableDamaged
    from flows.backfill import backfill as backfill_flow

    try:
        done = backfill_flow(p, str(ws.root), version)
    except (LookupError, IndexBuildError, TableDamaged, FileNotFoundError, WorkspaceBusy) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    _emit(done.to_dict(), as_json, done.message)


def _read_regular_file(path: Path, limit: int) -> bytes:
    """A query image's bytes; a FIFO, device or folder is refused before it is opened (a FIFO would block)."""
    import stat

    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or folder): refused")
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:  # replaced by a FIFO meanwhile: no block
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file: refused")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"over the {limit}-byte limit (ingest.max_file_bytes)")
    return data


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
    from components.data.validation import decode_image
    from components.serving.live import LiveIndex

    decoded = []
    for path in images:
        try:
            payload = _read_regular_file(path, p.ingest.max_file_bytes)
        except OSError as exc:
            err.print(f"[red]error:[/] {path}: {exc.strerror}")
            raise typer.Exit(2) from None
        image, reason = decode_image(payload, p.ingest)  # the limits ingest applies, and the one decode
        if image is None:
            err.print(f"[red]error:[/] {path}: {reason}")
            raise typer.Exit(2)
        decoded.append(image)
    live = LiveIndex(ws, p.registry, p.index, refresh_seconds=p.serve.refresh_seconds)
    try:
        pair = live.refresh()  # resolved once: model and table come from this one version
        if pair is None:
            err.print(
                f"[red]error:[/] no champion model in {ws.masked_tracking_uri}; run `mnemo demo` or `mnemo retrain` first"
            )
            raise typer.Exit(1)
        results = pair.query(decoded, k)
    except FileNotFoundError as exc:  # a missing table; damage is the group's one line (_error_line)
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    lines = []
    for path, hits in zip(images, results):
        lines.append(f"{path}: " + ", ".join(f"{h['class']} ({h['distance']:.3f})" for h in hits))
    _emit(
        {"model_version": pair.version, "table": pair.table_name, "results": results},
        as_json,
        f"model v{pair.version}, table {pair.table_name}\n" + "\n".join(lines),
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default: params serve.host).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: params serve.port).")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes; each loads the model and resolves the alias on its own.")
    ] = 1,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve the live pair over HTTP: POST /query, GET /health, GET /live; follows promotions and rollbacks."""
    p, ws = _setup(params, workspace)
    import uvicorn

    if settings().api_key:
        err.print("MNEMO_API_KEY is set: every endpoint but /health needs `Authorization: Bearer <key>`")
    else:
        err.print(
            "[yellow]MNEMO_API_KEY is not set: the service and its page (stored images included) are open "
            "to anyone who can reach this port[/]"
        )
    # The worker processes build their app from these (service_app); one worker builds it here.
    os.environ[SERVE_PARAMS_ENV] = str(params.resolve())
    os.environ["MNEMO_WORKSPACE"] = str(ws.root)
    from components.serving.access_log import log_config

    uvicorn.run(
        "flows.cli:service_app",
        factory=True,
        host=host or p.serve.host,
        port=port or p.serve.port,
        workers=workers,
        log_config=log_config(),  # access lines without query strings: a key sent as ?api_key= never lands in a log
    )


SERVE_PARAMS_ENV = "MNEMO_SERVE_PARAMS"


def service_app() -> FastAPI:
    """The query service of one `mnemo serve` worker, from the params file and workspace serve() chose."""
    from components.serving.app import create_app
    from components.serving.live import LiveIndex

    env = settings()
    if env.serve_params is None:
        raise RuntimeError(f"{SERVE_PARAMS_ENV} is not set: service_app is started by `mnemo serve`")
    p, ws = _setup(env.serve_params, None)
    live = LiveIndex(
        ws,
        p.registry,
        p.index,
        refresh_seconds=p.serve.refresh_seconds,
        runtime=p.serve.runtime,
        graph=p.serve,
        models_kept=p.serve.models_kept,
    )
    # The key comes from the environment only: never from params.yaml, never logged.
    key = env.api_key.get_secret_value() if env.api_key else None
    from flows.progress import current_retrain

    return create_app(live, p.serve, p.ingest, api_key=key, progress=lambda: current_retrain(live.ws, live.registry))


@app.command()
def deploy(
    ctx: typer.Context,
    work_pool: Annotated[
        str | None,
        typer.Option(
            "--work-pool",
            help="Register the deployments to this Prefect work pool (its workers run them) instead of serving them here.",
        ),
    ] = None,
    retrain_pool: Annotated[
        str | None,
        typer.Option(
            "--retrain-pool",
            help="With --work-pool: the pool for retrain/scheduled and backfill/compat (they embed images), e.g. a GPU pool (default: --work-pool).",
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="With --work-pool: the mnemo image (built from infra/Dockerfile) that container pools (kubernetes, docker) run.",
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The retrain (cron), ingest (interval) and rollback deployments on the Prefect server in PREFECT_API_URL: served here, or on work pools.

    Without --work-pool it blocks, running each scheduled or triggered flow run here; stopping
    it (Ctrl-C) pauses the schedules. With --work-pool it registers the same deployments to work
    pools and returns: the pools' workers run them, and each run takes MNEMO_WORKSPACE and the
    server URLs from its own environment. Schedules come from params `schedule:`.
    """
    p, ws = _setup(params, workspace)
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        err.print(
            "[red]error:[/] schedules need a Prefect server: run `prefect server start` and set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api)"
        )
        raise typer.Exit(2)
    from flows.deploy import build_deployments, register_deployments, serve_deployments

    if work_pool is None:
        if retrain_pool or image:
            err.print("[red]error:[/] --retrain-pool and --image go with --work-pool")
            raise typer.Exit(2)
        serve_deployments(build_deployments(p, ws))
        return
    source = ctx.get_parameter_source("workspace")  # typer's vendored click: compared by name
    if source is not None and source.name == "COMMANDLINE":
        # A path on this machine means nothing to a worker elsewhere: the workers' environment names it.
        err.print(
            "[red]error:[/] with --work-pool, each run uses MNEMO_WORKSPACE of the worker or job that runs it; "
            "set it there instead of passing --workspace"
        )
        raise typer.Exit(2)
    from flows.deploy import WorkPoolError

    try:
        registered = register_deployments(build_deployments(p, None), work_pool, retrain_pool=retrain_pool, image=image)
    except WorkPoolError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    table = Table(
        "deployment", "work pool", title="registered (start a worker on each pool: `prefect worker start --pool NAME`)"
    )
    for r in registered:
        table.add_row(r.name, r.work_pool)
    Console().print(table)


if __name__ == "__main__":
    app()
