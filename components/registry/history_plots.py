"""The history and the embedding map as artifacts of a version's MLflow run, so the MLflow UI shows
what the page shows: drawn with the page's own data (version_history, projection.embedding_map)."""

from __future__ import annotations

from components.evaluation.history import history_figure
from components.registry.mlflow_registry import HISTORY_PLOT, MAP_PLOT, ModelRegistry
from components.registry.version_history import version_history
from components.vectors.projection import EmbeddingMap, embedding_map, map_figure
from components.workspace import Workspace


def log_history_plots(ws: Workspace, registry: ModelRegistry, version: str, before: str | None) -> list[str]:
    """history/history.png (every version so far) and, when the version has a table,
    history/embedding_map.png (its map beside the map of table `before`, the champion it was compared
    with, for the same images) on the version's run; the artifact paths logged."""
    logged = [HISTORY_PLOT]
    registry.log_plot(version, history_figure(version_history(registry)), HISTORY_PLOT)
    table = registry.get(version, with_metrics=False).table
    if table:
        maps: list[tuple[str, EmbeddingMap]] = []
        if before and before != table:
            champion_map, _ = embedding_map(ws, before)
            maps = [(before, champion_map), (f"v{version}", embedding_map(ws, table, like=champion_map)[0])]
        else:
            maps = [(f"v{version}", embedding_map(ws, table)[0])]
        registry.log_plot(version, map_figure(maps), MAP_PLOT)
        logged.append(MAP_PLOT)
    return logged
