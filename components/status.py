"""Where things stand, as one typed, JSON-ready model: champion and challenger, the promotion log,
the latest gate report, the data. `mnemo status` prints it; the service's page shows it (GET /status,
whose OpenAPI schema these models are)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from components.config import IngestParams
from components.data.catalog import Catalog
from components.data.identity import pending_arrivals
from components.evaluation import keys
from components.evaluation.metrics import json_number
from components.progress import RetrainProgress
from components.registry.mlflow_registry import (
    COMPATIBLE_TAG,
    SMOKE_TAG,
    VERDICT_TAG,
    ModelRegistry,
    ModelVersionInfo,
)
from components.vectors.tables import READ_ERRORS, TableDamaged, check_readable, connect, older_rows, open_table
from components.workspace import Workspace


class VersionStatus(BaseModel):
    """A registered version as status shows it: its table, the arrivals it was trained on, its metrics."""

    version: str
    table: str | None
    arrivals: list[str]
    metrics: dict[str, float | None]


class ChampionStatus(VersionStatus):
    """The version serving now, and whether its table can answer."""

    table_rows: int | None = Field(description="rows in its table; None when the table is missing")
    missing_rows: int | None = Field(
        description="stored images its table lacks (the next ingest appends them); None when the table is missing"
    )
    damaged: str | None = Field(description="what is damaged (its table missing or unreadable); None when it answers")
    compatible_from: str | None = Field(
        default=None,
        description="the version whose vectors its table started from (a compatible upgrade); None: built whole",
    )
    older_rows: int | None = Field(
        default=None,
        description="rows of its table still embedded by that older model, which the backfill re-embeds "
        "(0 once it has finished); None when the table cannot be read",
    )


class ChallengerStatus(VersionStatus):
    """The latest candidate and how it fared: gate verdict and index smoke test (None: never run)."""

    verdict: str | None
    index_smoke_test: str | None
    forward_transfer: dict[str, dict[str, float | None]] = Field(
        description="per arrival it learned: the champion of the time on that arrival's classes before "
        "any training on them (recall_at_1, map_at_r, <N>way_1shot), what users got from its hot add"
    )


class DataStatus(BaseModel):
    """The catalog's counts and the arrivals waiting in the inbox."""

    arrivals: list[str]
    classes: int
    unseen_classes: int
    images: int
    pending_arrivals: list[str]


class WorkspaceStatus(BaseModel):
    """Everything `mnemo status` and GET /status say; serialised with the same keys both ways."""

    workspace: str
    model_name: str
    tracking_uri: str
    lancedb_uri: str
    champion: ChampionStatus | None
    challenger: ChallengerStatus | None
    promotions: list[dict[str, Any]] = Field(description="the promotion log, newest last")
    gate: dict[str, Any] | None = Field(description="the latest gate report: verdict, reasons, metrics side by side")
    data: DataStatus
    retrain: RetrainProgress | None = Field(
        default=None, description="the running retrain's stage, epoch and loss (None: not looked up here)"
    )


def workspace_status(ws: Workspace, registry: ModelRegistry, ingest: IngestParams) -> WorkspaceStatus:
    """Champion (version, table, rows, what its table lacks or why it cannot answer, metrics),
    challenger (and its gate verdict), the promotion log newest last, the challenger's gate
    report, and the catalog's counts."""
    champion = registry.champion()
    challenger = registry.challenger() or registry.latest()  # stores from before the alias existed have none
    catalog = Catalog.load(ws.catalog)
    images = len(catalog.images)
    return WorkspaceStatus(
        workspace=str(ws.root),
        model_name=registry.name,
        tracking_uri=ws.masked_tracking_uri,
        lancedb_uri=ws.masked_lancedb_uri,
        champion=None if champion is None else _champion(ws, champion, images),
        challenger=None
        if challenger is None
        else ChallengerStatus(
            version=challenger.version,
            table=challenger.table,
            verdict=challenger.tags.get(VERDICT_TAG),
            index_smoke_test=challenger.tags.get(SMOKE_TAG),
            arrivals=challenger.arrivals,
            metrics=_metrics(challenger),
            forward_transfer={
                s: {k: json_number(v) for k, v in m.items() if k != "r_precision"}
                for s, m in keys.transfer_values(challenger.metrics).items()
            },
        ),
        promotions=[e.to_dict() for e in registry.log.entries()],
        gate=registry.gate_report(challenger.version) if challenger else None,
        data=DataStatus(
            arrivals=sorted(catalog.arrivals),
            classes=len(catalog.classes),
            unseen_classes=len(catalog.classes_with_split("unseen")),
            images=images,
            # cached: an inbox folder is fingerprinted again only once something in it changed
            pending_arrivals=[a.name for a in pending_arrivals(ws, ingest, cached=True)],
        ),
    )


def _champion(ws: Workspace, champion: ModelVersionInfo, images: int) -> ChampionStatus:
    rows, damaged, older = _live_table(ws, champion.table, champion.version) if champion.table else (None, None, None)
    return ChampionStatus(
        version=champion.version,
        table=champion.table,
        table_rows=rows,
        missing_rows=None if rows is None else max(0, images - rows),  # one row per stored image
        damaged=None if damaged is None else ws.redact(damaged),
        compatible_from=champion.tags.get(COMPATIBLE_TAG),
        older_rows=older,
        arrivals=champion.arrivals,
        metrics=_metrics(champion),
    )


def _live_table(ws: Workspace, table: str, version: str) -> tuple[int | None, str | None, int | None]:
    """The table's row count (None when it cannot be counted), why it cannot answer (None when it
    can: every data file's footer and first page are read, not its rows, tables.check_readable), and
    its rows still of an older model (a compatible upgrade's backfill; None when unreadable)."""
    try:
        tbl = open_table(connect(ws), ws, table)
    except (FileNotFoundError, TableDamaged) as exc:  # missing, or its manifest cannot be read
        return None, str(exc), None
    try:
        return check_readable(tbl), None, older_rows(tbl, version)
    except TableDamaged as exc:
        damaged = str(exc)
    try:
        return tbl.count_rows(), damaged, None  # from the table's metadata: a data file cut short still counts
    except READ_ERRORS:
        return None, damaged, None


def _metrics(info: ModelVersionInfo) -> dict[str, float | None]:
    return {k: json_number(v) for k, v in info.metrics.items()}
