"""The retrain flow: ingest pending arrivals -> train -> evaluate -> gate -> register -> index -> promote.

Each task wraps one component call. A failed or rejected run leaves the live pair
(the `champion` alias and its table) untouched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.config import Params, Workspace, resolve_workspace
from components.data.class_registry import ClassRegistry, ImageRecord, retrain_skip_reason
from components.data.ingest import IngestReport, ingest_arrival, pending_arrivals
from components.evaluate import GateDecision, decide, prefixed, score_unseen
from components.index import IndexBuild, build_table, table_name
from components.modeling.embedder import Embedder
from components.registry import VERDICT_TAG, ModelRegistry, ModelVersionInfo
from components.train import TrainResult, train_embedder


@dataclass
class RetrainSummary:
    status: str  # "promoted" | "rejected" | "nothing_new" | "insufficient_data"
    message: str
    version: str | None = None  # the candidate when one was trained, else the champion
    table: str | None = None  # the table of the live pair after this run
    classes_known: int = 0
    trained_classes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    ingested: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@task(cache_policy=NO_CACHE)
def ingest_pending(ws: Workspace, params: Params) -> list[IngestReport]:
    return [ingest_arrival(path, ws, params.ingest, remove_source=True) for path in pending_arrivals(ws)]


@task(cache_policy=NO_CACHE)
def load_models(ws: Workspace, params: Params) -> tuple[ModelVersionInfo | None, Embedder | None, ModelVersionInfo | None]:
    """The champion (info and network) and the newest registered version."""
    registry = ModelRegistry(ws, params.registry)
    champion = registry.champion()
    return champion, (registry.load_embedder(champion.version) if champion else None), registry.latest()


@task(cache_policy=NO_CACHE)
def train(ws: Workspace, params: Params, records: list[ImageRecord], init: Embedder | None) -> TrainResult:
    return train_embedder([ws.classes_dir / r.id for r in records], [r.cls for r in records], params.train, params.model, init=init)


@task(cache_policy=NO_CACHE)
def evaluate(ws: Workspace, params: Params, candidate: Embedder, champion: Embedder | None, unseen: list[ImageRecord]) -> dict[str, float]:
    return score_unseen(ws, unseen, params.evaluate, candidate, champion)


@task(cache_policy=NO_CACHE)  # no retries: a repeat after log_model would register a second version
def register(ws: Workspace, params: Params, result: TrainResult, metrics: dict[str, float], arrivals: list[str],
             decision: GateDecision) -> ModelVersionInfo:
    return ModelRegistry(ws, params.registry).log_candidate(
        result.model,
        params=params.flat("model", "train") | result.params(),
        metrics=metrics | result.metrics(),
        epoch_metrics={"train_loss": result.epoch_losses},
        arrivals=arrivals,
        tags={VERDICT_TAG: "promote" if decision.promote else "reject"},
    )


@task(cache_policy=NO_CACHE)
def build_index(ws: Workspace, params: Params, version: str, model: Embedder) -> IndexBuild:
    records = ClassRegistry.load(ws.class_registry).records()
    return build_table(ws, table_name(params.index.table_prefix, version), model, records, batch_size=params.index.batch_size)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def promote(ws: Workspace, params: Params, version: str, table: str) -> None:
    ModelRegistry(ws, params.registry).promote(version, table)


@flow(name="retrain", log_prints=True)
def retrain(params: Params, workspace: str | None = None) -> RetrainSummary:
    start = time.perf_counter()
    logger = get_run_logger()
    ws = resolve_workspace(params, workspace)
    reports = ingest_pending(ws, params)
    catalog = ClassRegistry.load(ws.class_registry)
    champion, champion_model, latest = load_models(ws, params)
    summary = RetrainSummary(status="", message="", classes_known=len(catalog.classes),
                             version=champion.version if champion else None, table=champion.table if champion else None,
                             ingested=[r.arrival for r in reports if r.status == "ingested"])
    skip = retrain_skip_reason(catalog, latest.arrivals if latest else None)
    if skip is not None:
        summary.status, summary.message = skip[0], f"{skip[1]}; live pair unchanged"
        logger.info(summary.message)
        return summary

    arrivals = sorted(catalog.arrivals)
    result = train(ws, params, catalog.records("train"), champion_model)
    metrics = evaluate(ws, params, result.model, champion_model, catalog.records("unseen"))
    decision = decide(metrics, prefixed(metrics, "champion_"), params.gate)
    candidate = register(ws, params, result, metrics, arrivals, decision)
    summary.version, summary.metrics, summary.reasons = candidate.version, metrics, decision.reasons
    summary.trained_classes = result.classes
    if decision.promote:
        built = build_index(ws, params, candidate.version, result.model)
        promote(ws, params, candidate.version, built.table)
        summary.status, summary.table = "promoted", built.table
        summary.message = f"v{candidate.version} promoted to champion with table {built.table} ({built.rows} rows)"
    else:
        summary.status = "rejected"
        summary.message = f"v{candidate.version} rejected by the gate ({'; '.join(decision.reasons)}); champion unchanged"
    summary.seconds = time.perf_counter() - start
    logger.info(summary.message)
    return summary
