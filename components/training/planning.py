"""The retrain's decisions, as plain functions the flow calls in order: what to learn (or why
nothing), and what the run's outcome was once the gate has spoken."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from components.data.catalog import Catalog, ImageRecord
from components.evaluation.gate import GateDecision
from components.registry.mlflow_registry import ModelVersionInfo
from components.vectors.backfill import BackfillProgress
from components.vectors.build import IndexBuild

RetrainStatus = Literal["promoted", "rejected", "nothing_new", "insufficient_data"]
OUTCOMES: dict[RetrainStatus, str] = {
    "promoted": "Promoted",
    "rejected": "Rejected",
    "nothing_new": "Nothing new",
    "insufficient_data": "Insufficient data",
}  # status -> the name of the run's final state


def retrain_skip_reason(catalog: Catalog, last_tried: list[str] | None) -> tuple[RetrainStatus, str] | None:
    """(status, message) when a retrain has nothing to do or cannot score what it would learn.

    `last_tried` is the arrival set the newest registered model was trained on, whether it
    was promoted or rejected: the same data is not trained twice.
    """
    arrivals = sorted(catalog.arrivals)
    if not arrivals:
        return "nothing_new", "no arrivals ingested yet"
    if last_tried == arrivals:
        return "nothing_new", f"the newest model already learned arrivals {', '.join(arrivals)}"
    trained = {r.cls for r in catalog.records("train")}
    if len(trained) < 2:
        return "insufficient_data", f"{len(trained)} trained class(es) so far; training needs at least 2"
    per_class: dict[str, int] = {}
    for r in catalog.records("unseen"):
        per_class[r.cls] = per_class.get(r.cls, 0) + 1
    scorable = sum(1 for n in per_class.values() if n >= 2)
    if scorable < 2:
        return "insufficient_data", (
            f"{scorable} unseen class(es) with 2+ images so far; scoring retrieval on "
            "classes no model has seen needs at least 2"
        )
    return None


@dataclass(frozen=True)
class RetrainPlan:
    """What one retrain learns: the training images of arrivals the champion has not learned."""

    arrivals: list[str]  # every ingested arrival: what the candidate will have learned
    new: list[ImageRecord]
    skip: tuple[RetrainStatus, str] | None  # (status, message) when there is nothing to train


def plan_retrain(catalog: Catalog, champion: ModelVersionInfo | None, latest: ModelVersionInfo | None) -> RetrainPlan:
    """The plan against the champion (whose arrivals are learned) and the newest version (whose were tried)."""
    learned = set(champion.arrivals) if champion else set()
    return RetrainPlan(
        arrivals=sorted(catalog.arrivals),
        new=[r for r in catalog.records("train") if r.arrival not in learned],
        skip=retrain_skip_reason(catalog, latest.arrivals if latest else None),
    )


@dataclass
class RetrainSummary:
    status: RetrainStatus
    message: str
    version: str | None = None  # the candidate when one was trained, else the champion
    table: str | None = None  # the table of the live pair after this run
    classes_known: int = 0
    trained_classes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    ingested: list[str] = field(default_factory=list)
    seconds: float = 0.0
    compatible_from: str | None = None  # went live on this version's vectors (a compatible upgrade)
    backfill: dict | None = None  # the backfill that followed: rows, remaining, done, seconds, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def state_name(self) -> str:
        return OUTCOMES[self.status]


def skipped(
    plan: RetrainPlan, catalog: Catalog, champion: ModelVersionInfo | None, ingested: Sequence[str]
) -> RetrainSummary | None:
    """The summary of a run that trains nothing (the live pair unchanged); None when there is work to do."""
    if plan.skip is None:
        return None
    status, why = plan.skip
    return RetrainSummary(
        status=status,
        message=f"{why}; live pair unchanged",
        classes_known=len(catalog.classes),
        version=champion.version if champion else None,
        table=champion.table if champion else None,
        ingested=list(ingested),
    )


def concluded(
    catalog: Catalog,
    champion: ModelVersionInfo | None,
    ingested: Sequence[str],
    candidate: str,
    trained_classes: int,
    metrics: dict[str, float],
    decision: GateDecision,
    built: IndexBuild | None,
    seconds: float,
    backfilled: BackfillProgress | None = None,
) -> RetrainSummary:
    """The summary of a run that trained `candidate`: promoted with its table (on the champion's vectors,
    then backfilled, when compatible), or rejected with the failed checks."""
    summary = RetrainSummary(
        status="rejected",
        message="",
        version=candidate,
        classes_known=len(catalog.classes),
        table=champion.table if champion else None,
        trained_classes=trained_classes,
        metrics=metrics,
        reasons=decision.reasons,
        ingested=list(ingested),
        seconds=seconds,
    )
    if decision.promote and built is not None:
        summary.status, summary.table = "promoted", built.table
        summary.message = f"v{candidate} promoted to champion with table {built.table} ({built.rows} rows)"
        if built.compatible_from:
            summary.compatible_from = built.compatible_from
            summary.message += f", started from v{built.compatible_from}'s vectors"
        if backfilled is not None:
            summary.backfill = backfilled.to_dict()
            summary.message += f"; backfill: {backfilled.message}"
    else:
        summary.message = f"v{candidate} rejected by the gate ({'; '.join(decision.failed)}); champion unchanged"
    return summary
