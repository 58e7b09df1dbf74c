"""Where things stand, as one JSON-ready dict: champion and challenger, the promotion log, the
latest gate report, the data. `mnemo status` prints it; the service's page shows it."""

from __future__ import annotations

from typing import Any

from components.config import IngestParams
from components.data.catalog import Catalog
from components.data.identity import pending_arrivals
from components.evaluation.metrics import json_number
from components.registry.mlflow_registry import SMOKE_TAG, VERDICT_TAG, ModelRegistry
from components.vectors.search import table_rows
from components.workspace import Workspace


def workspace_status(ws: Workspace, registry: ModelRegistry, ingest: IngestParams) -> dict[str, Any]:
    """Champion (version, table, rows, metrics), challenger (and its gate verdict), the promotion
    log newest last, the challenger's gate report, and the catalog's counts."""
    champion = registry.champion()
    challenger = registry.challenger() or registry.latest()  # stores from before the alias existed have none
    catalog = Catalog.load(ws.catalog)
    return {
        "workspace": str(ws.root),
        "model_name": registry.name,
        "tracking_uri": ws.masked_tracking_uri,
        "lancedb_uri": ws.masked_lancedb_uri,
        "champion": None
        if champion is None
        else {
            "version": champion.version,
            "table": champion.table,
            "table_rows": table_rows(ws, champion.table) if champion.table else None,
            "arrivals": champion.arrivals,
            "metrics": {k: json_number(v) for k, v in champion.metrics.items()},
        },
        "challenger": None
        if challenger is None
        else {
            "version": challenger.version,
            "table": challenger.table,
            "verdict": challenger.tags.get(VERDICT_TAG),
            "index_smoke_test": challenger.tags.get(SMOKE_TAG),
            "arrivals": challenger.arrivals,
            "metrics": {k: json_number(v) for k, v in challenger.metrics.items()},
        },
        "promotions": [e.to_dict() for e in registry.log.entries()],  # the promotion log, newest last
        # the latest gate report: verdict, reasons, metrics side by side
        "gate": registry.gate_report(challenger.version) if challenger else None,
        "data": {
            "arrivals": sorted(catalog.arrivals),
            "classes": len(catalog.classes),
            "unseen_classes": len(catalog.classes_with_split("unseen")),
            "images": len(catalog.images),
            # cached: an inbox folder is fingerprinted again only once something in it changed
            "pending_arrivals": [a.name for a in pending_arrivals(ws, ingest, cached=True)],
        },
    }
