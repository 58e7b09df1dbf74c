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
from components.data.class_registry import ClassRegistry, ImageRecord
from components.data.ingest import IngestReport, ingest_arrival, pending_arrivals
from components.evaluate import GateDecision, decide, score_unseen
from components.index import IndexBuild, build_table, table_name
from components.modeling.embedder import Embedder
from components.registry import TABLE_TAG, ModelRegistry, ModelVersionInfo
from components.train import TrainResult, train_embedder


@dataclass
class RetrainSummary:
    status: str  # "promoted" | "rejected" | "nothing_new"
    message: str
    version: str | None = None
    table: str | None = None
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
def load_champion(ws: Workspace, params: Params) -> tuple[ModelVersionInfo | None, Embedder | None]:
    registry = ModelRegistry(ws, params.registry)
    champion = registry.champion()
    return champion, (registry.load_embedder(champion.version) if champion else None)


@task(cache_policy=NO_CACHE)
def train(ws: Workspace, params: Params, records: list[ImageRecord], init: Embedder | None) -> TrainResult:
    return train_embedder([ws.classes_dir / r.id for r in records], [r.cls for r in records], params.train, params.model, init=init)


@task(cache_policy=NO_CACHE)
def evaluate(ws: Workspace, params: Params, candidate: Embedder, champion: Embedder | None, unseen: list[ImageRecord]) -> dict[str, float]:
    return score_unseen(ws, unseen, params.evaluate, candidate, champion)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register(ws: Workspace, params: Params, result: TrainResult, metrics: dict[str, float], arrivals: list[str]) -> ModelVersionInfo:
    flat = {f"model.{k}": v for k, v in params.model.model_dump().items()}
    flat |= {f"train.{k}": v for k, v in params.train.model_dump().items()}
    flat |= {"train.images": result.images, "train.classes": result.classes, "train.device_used": result.device}
    metrics = metrics | {"train_seconds": result.seconds, "train_images_per_second": result.images_per_second}
    return ModelRegistry(ws, params.registry).log_candidate(
        result.model, params=flat, metrics=metrics, epoch_metrics={"train_loss": result.epoch_losses}, arrivals=arrivals
    )


@task(cache_policy=NO_CACHE)
def build_index(ws: Workspace, params: Params, version: str, model: Embedder) -> IndexBuild:
    records = ClassRegistry.load(ws.class_registry).records()
    return build_table(ws, table_name(params.index.table_prefix, version), model, records, batch_size=params.index.batch_size)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def promote(ws: Workspace, params: Params, version: str, table: str) -> None:
    registry = ModelRegistry(ws, params.registry)
    registry.set_tag(version, TABLE_TAG, table)
    registry.promote(version)


@flow(name="retrain", log_prints=True)
def retrain(params: Params, workspace: str | None = None) -> RetrainSummary:
    start = time.perf_counter()
    logger = get_run_logger()
    ws = resolve_workspace(params, workspace)
    reports = ingest_pending(ws, params)
    catalog = ClassRegistry.load(ws.class_registry)
    champion, champion_model = load_champion(ws, params)
    summary = RetrainSummary(status="nothing_new", message="", classes_known=len(catalog.classes),
                             ingested=[r.arrival for r in reports if r.status == "ingested"])
    arrivals = sorted(catalog.arrivals)
    if not arrivals:
        summary.message = f"no arrivals ingested yet; drop one into {ws.inbox}"
    elif champion is not None and champion.arrivals == arrivals:
        summary.message = f"champion v{champion.version} already learned every arrival; nothing to do"
        summary.version, summary.table = champion.version, champion.table
    if summary.message:
        logger.info(summary.message)
        return summary

    train_records = catalog.records("train")
    result = train(ws, params, train_records, champion_model)
    metrics = evaluate(ws, params, result.model, champion_model, catalog.records("unseen"))
    champion_metrics = {"unseen_recall_at_1": metrics["champion_unseen_recall_at_1"]} if champion else None
    decision: GateDecision = decide(metrics, champion_metrics, params.gate)
    candidate = register(ws, params, result, metrics, arrivals)
    summary.version, summary.metrics, summary.reasons = candidate.version, metrics, decision.reasons
    summary.trained_classes = result.classes
    if decision.promote:
        built = build_index(ws, params, candidate.version, result.model)
        promote(ws, params, candidate.version, built.table)
        summary.status, summary.table = "promoted", built.table
        summary.message = f"v{candidate.version} promoted to champion with table {built.table} ({built.rows} rows)"
    else:
        summary.status = "rejected"
        summary.message = f"v{candidate.version} rejected by the gate; champion unchanged"
    summary.seconds = time.perf_counter() - start
    logger.info(summary.message)
    return summary
