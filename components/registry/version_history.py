"""The model's history as the registry holds it: every version's metrics, what the gate and the promotion
log did with each (components/evaluation/history.py shapes it), the versions that ever served (what the
gate's forgetting is measured against), and a cheap stamp that changes whenever any of it can (what the
page's cache keys on).
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from components.evaluation.history import ModelHistory, model_history
from components.registry.mlflow_registry import CHAMPION, VERDICT_TAG, ModelRegistry


def served_history(registry: ModelRegistry) -> list[tuple[str, dict[str, float]]]:
    """(version, run metrics) of every version that was ever champion, oldest version first."""
    served = {e.to_version for e in registry.log.entries()}
    champion = registry.champion()
    if champion is not None:
        served.add(champion.version)
    rows = []
    for version in sorted(served, key=int):
        try:
            rows.append((version, registry.get(version).metrics))
        except MlflowException:  # a version deleted from the registry since
            continue
    return rows


def version_history(registry: ModelRegistry) -> ModelHistory:
    """Every version's headline metrics and forgetting, what the gate and the promotion log did with each."""
    return model_history(
        registry.name,
        [(v.version, v.metrics, v.tags) for v in registry.versions()],
        registry.log.entries(),
        registry.aliases().get(CHAMPION),
        verdict_tag=VERDICT_TAG,
    )


def history_stamp(registry: ModelRegistry) -> tuple:
    """What changes whenever the history can: every version, its last update and its tags (verdicts,
    tables), the aliases and the promotion log's newest run; four cheap calls, for caching version_history."""
    client = registry.client
    found = client.search_model_versions(f"name = '{registry.name}'")
    experiment = client.get_experiment_by_name(registry.log.experiment)
    newest = (
        client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if experiment is not None
        else []
    )
    return (
        # tags too: setting one (a verdict, a table) does not move a version's last_updated_timestamp
        tuple(
            sorted((str(mv.version), mv.last_updated_timestamp or 0, tuple(sorted(mv.tags.items()))) for mv in found)
        ),
        tuple(sorted(registry.aliases().items())),
        tuple((r.info.run_id, r.info.status) for r in newest),
    )
