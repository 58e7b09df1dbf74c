"""The retrain flow: ingest pending arrivals -> train -> evaluate -> gate -> register -> index -> promote
(-> backfill).

Each task wraps one component call. A failed or rejected run leaves the live pair
(the `champion` alias and its table) untouched. A candidate the gate declares compatible with the
champion goes live on a table started from the champion's vectors (no re-embedding first); the
backfill flow then re-embeds those rows with the new model while it answers.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from components.config import Params
from components.data.catalog import Catalog, ImageRecord
from components.data.inbox import ingest_inbox
from components.data.ingest import IngestReport
from components.evaluation.assessment import Assessment, assess
from components.evaluation.compat import compat_heatmap
from components.evaluation.forgetting import forgetting_heatmap
from components.evaluation.gate import GateDecision, gate_markdown, gate_report
from components.modeling.embedder import Embedder
from components.ops.failpoints import failpoint
from components.registry.history_plots import log_history_plots
from components.registry.mlflow_registry import ModelRegistry, ModelVersionInfo
from components.registry.promotion import Promoter
from components.registry.version_history import served_history
from components.training.checkpoints import clear_checkpoints
from components.training.compat import Transform
from components.training.continual import Recipe, classes_to_learn
from components.training.distributed import TRAIN_JOB, train_continual_on_devices
from components.training.loop import TrainResult
from components.training.planning import RetrainSummary, concluded, plan_retrain, skipped
from components.vectors.build import IndexBuild
from components.vectors.compat import own_records
from components.vectors.rows import stored_class_means
from components.vectors.search import index_smoke_test
from components.vectors.tables import connect, open_table
from components.workspace import Workspace, resolve_workspace
from flows.backfill import backfill
from flows.ingest import catch_up
from flows.reindex import row_writer
from flows.retries import TRANSIENT_RETRIES
from flows.states import finished
from flows.writers import workspace_writer

CHECKPOINTS = "checkpoints"  # under the workspace: the running retrain's per-epoch checkpoints


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def ingest_pending(ws: Workspace, params: Params) -> list[IngestReport]:
    """Every inbox arrival, under the workspace's ingest lock (the scheduled inbox scan may run too)."""
    return ingest_inbox(ws, params.ingest)


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def load_models(
    ws: Workspace, params: Params
) -> tuple[ModelVersionInfo | None, Embedder | None, ModelVersionInfo | None]:
    """The champion (info and network) and the newest version the gate ruled on (what was last tried)."""
    registry = ModelRegistry(ws, params.registry)
    champion = registry.champion()
    return champion, (registry.load_embedder(champion.version) if champion else None), registry.latest(gated=True)


@task(cache_policy=NO_CACHE)
def train(
    ws: Workspace,
    params: Params,
    new: list[ImageRecord],
    champion: ModelVersionInfo | None,
    init: Embedder | None,
    run_id: str,
) -> tuple[TrainResult, Path, Transform | None, dict[str, float]]:
    """Learn the new images with the champion's replay memory and distillation (and, as `compat.mode`
    says, compatibility with it); returns the result, its saved state, the old -> new transform when
    one was fitted, and the step's own metrics. Each finished epoch's metrics go to the MLflow run
    `run_id` at once, so the page and `mnemo status` can follow the training.

    On more than one device the step runs under torchrun (the job directory <workspace>/train-job, where
    the ranks of every node look); its result comes back from rank 0, and only this process registers it.
    """
    with tempfile.TemporaryDirectory(dir=ws.root) as tmp:
        registry = ModelRegistry(ws, params.registry)
        state = registry.download_state(champion.version, Path(tmp)) if champion else None
        prototypes = None
        if params.compat.mode == "bct" and champion is not None and champion.table:  # its classes where it put them
            table = open_table(connect(ws), ws, champion.table)
            prototypes = stored_class_means(table, classes_to_learn(new, state, params.replay))
        step = train_continual_on_devices(
            new,
            ws.classes_dir,
            Recipe.of(params),
            init=init,
            state=state,
            checkpoint_dir=ws.root / CHECKPOINTS,
            job_dir=ws.root / TRAIN_JOB,
            prototypes=prototypes,
            on_epoch=lambda epoch, metrics: registry.runs.log_epoch(run_id, epoch, metrics),
        )
        saved = step.save_state(Path(tempfile.mkdtemp(prefix="state-", dir=ws.root)))
        return step.train, saved, step.transform, step.metrics()


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def evaluate(
    ws: Workspace,
    params: Params,
    catalog: Catalog,
    candidate: Embedder,
    champion_model: Embedder | None,
    champion: ModelVersionInfo | None,
    transform: Transform | None,
) -> Assessment:
    """Candidate and champion on the same images, forgetting against every served version, compatibility
    with the champion and across the kept versions, the gate's decision."""
    promoter = Promoter(ws, params.registry, params.index, params.train.device)
    return assess(
        ws,
        catalog,
        params.evaluate,
        params.gate,
        candidate,
        champion=champion_model,
        champion_version=champion.version if champion else None,
        champion_arrivals=champion.arrivals if champion else (),
        served=served_history(promoter.registry),
        kept=promoter.kept_versions({champion.version: champion_model} if champion and champion_model else None),
        transform=transform,
    )


@task(cache_policy=NO_CACHE)  # no retries: a repeat after log_model would register a second version
def register(
    ws: Workspace,
    params: Params,
    result: TrainResult,
    metrics: dict[str, float],
    arrivals: list[str],
    state: Path,
    run_id: str,
) -> ModelVersionInfo:
    info = ModelRegistry(ws, params.registry).log_candidate(
        result.model,
        params=params.flat("model", "train", "replay", "distill", "compat") | result.params(),
        metrics=metrics | result.metrics(),
        epoch_metrics=result.epoch_metrics,
        arrivals=arrivals,
        state_dir=state,  # the verdict comes with the gate report (publish_gate), once the smoke test ran
        device=params.train.device,
        run_id=run_id,
    )
    # Registered: the checkpoints, the ranks' job directory and the local copy of the state have served their purpose.
    clear_checkpoints(ws.root / CHECKPOINTS)
    clear_checkpoints(ws.root / TRAIN_JOB)
    shutil.rmtree(state, ignore_errors=True)
    return info


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def build_index(
    ws: Workspace, params: Params, version: str, model: Embedder, compatible: bool, transform: Transform | None
) -> IndexBuild:
    """The version's validated table: started from the champion's vectors when the gate declared it
    compatible (and the champion's table can seed it), else built over the whole catalog; raises
    (and promotes nothing) when it is not right."""
    return Promoter(ws, params.registry, params.index, params.train.device).table_for(
        version,
        model,
        compatible=compatible,
        transform=transform,
        write=row_writer(ws, params.index, params.train.device),
    )


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def smoke_test(ws: Workspace, params: Params, version: str, built: IndexBuild, decision: GateDecision) -> GateDecision:
    """Record the new table, then query it with the model loaded back as users load it (models:/<name>/<version>)."""
    registry = ModelRegistry(ws, params.registry)
    registry.record_index(version, built.table, ann_recall=built.ann_recall)
    table = open_table(connect(ws), ws, built.table)
    result = index_smoke_test(
        ws,
        built.table,
        registry.load_pyfunc(version),
        own_records(table, version, Catalog.load(ws.catalog).records()),  # a compatible table's others: older
        params.index,
    )
    registry.record_smoke_test(version, result.passed, result.detail)
    return decision.with_check(result.passed, f"index smoke test: {result.detail}")


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def publish_gate(
    ws: Workspace,
    params: Params,
    version: str,
    champion: ModelVersionInfo | None,
    assessment: Assessment,
    decision: GateDecision,
) -> dict:
    """The gate report to the version's MLflow run (JSON, markdown, forgetting heatmap) and as Prefect artifacts."""
    report = gate_report(
        version,
        champion.version if champion else None,
        assessment.metrics,
        decision,
        params.gate,
        assessment.matrix,
        assessment.compat,
    )
    markdown = gate_markdown(report)
    ModelRegistry(ws, params.registry).log_gate(
        version,
        report,
        markdown,
        forgetting_heatmap(assessment.matrix.labelled(version)),
        compat_heatmap(assessment.compat.labelled(version)) if assessment.compat else None,
    )
    create_markdown_artifact(
        markdown=markdown, key="gate-report", description=f"gate verdict for v{version}: {decision.verdict}"
    )
    create_table_artifact(
        table=[{"metric": key, **row} for key, row in report["metrics"].items()],
        key="retrain-metrics",
        description=f"v{version} against champion v{report['champion'] or '-'}: candidate, champion, delta",
    )
    return report


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def promote(ws: Workspace, params: Params, version: str, table: str) -> None:
    Promoter(ws, params.registry, params.index, params.train.device).promote(
        version, table=table, reason="passed the gate and the index smoke test", actor="retrain-flow"
    )


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def publish_history(ws: Workspace, params: Params, version: str, champion: ModelVersionInfo | None) -> list[str]:
    """The history (promotion included) and the embedding map as artifacts of the version's MLflow run."""
    before = champion.table if champion else None
    return log_history_plots(ws, ModelRegistry(ws, params.registry), version, before)


@flow(name="retrain", log_prints=True)
def retrain(params: Params, workspace: str | None = None) -> RetrainSummary:
    ws = resolve_workspace(params, workspace)
    with workspace_writer(ws, "retrain"):  # one writer per workspace, whoever started it
        return _retrain(params, ws)


def _retrain(params: Params, ws: Workspace) -> RetrainSummary:
    start = time.perf_counter()
    ingested = [r.arrival for r in ingest_pending(ws, params) if r.status == "ingested"]
    caught = catch_up(ws, params)  # the ingest flow's task: what was stored is queryable at once
    if caught.older_rows:  # a backfill cut short (killed): finished first, so the live table is one model's again
        backfill(params, str(ws.root))
    catalog = Catalog.load(ws.catalog)
    champion, champion_model, latest = load_models(ws, params)
    plan = plan_retrain(catalog, champion, latest)
    nothing_to_do = skipped(plan, catalog, champion, ingested)
    if nothing_to_do is not None:
        return finished(nothing_to_do)  # type: ignore[return-value]  # Prefect unwraps a returned State: callers get its data

    registry = ModelRegistry(ws, params.registry)
    run_id = registry.runs.start(
        run_name=f"retrain {flow_run.get_name() or ''}".strip(),
        flow_run_id=flow_run.get_id(),
        epochs=params.train.epochs,
    )
    try:
        result, state, transform, step_metrics = train(ws, params, plan.new, champion, champion_model, run_id)
        assessment = evaluate(ws, params, catalog, result.model, champion_model, champion, transform)
        decision = assessment.decision
        candidate = register(ws, params, result, assessment.metrics | step_metrics, plan.arrivals, state, run_id)
    except BaseException:
        registry.runs.fail(run_id)  # the MLflow UI shows it failed, not running forever
        raise
    failpoint("registered")
    built = None
    if decision.promote:  # register -> build index -> smoke test -> promote; a failed step promotes nothing
        built = build_index(ws, params, candidate.version, result.model, decision.compatible, transform)
        decision = smoke_test(ws, params, candidate.version, built, decision)
    publish_gate(ws, params, candidate.version, champion, assessment, decision)
    backfilled = None
    if decision.promote and built is not None:
        promote(ws, params, candidate.version, built.table)  # catches the table up, then moves the alias
        if built.older_rows:  # live on the champion's vectors: re-embed them now, answering all along
            backfilled = backfill(params, str(ws.root), candidate.version)
    publish_history(ws, params, candidate.version, champion)
    summary = concluded(
        catalog,
        champion,
        ingested,
        candidate.version,
        result.classes,
        assessment.metrics,
        decision,
        built,
        time.perf_counter() - start,
        backfilled,
    )
    return finished(summary)  # type: ignore[return-value]  # Prefect unwraps a returned State: callers get its data
