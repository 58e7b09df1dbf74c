"""MLflow: one run per retrain, the model logged as a standalone pyfunc and registered,
the `champion` alias as the serving pointer, `challenger` on the newest candidate, gate
artifacts, and model loading. All MLflow calls live here and beside it: promotion_log.py (the
log of `champion`'s moves), training_runs.py (a retrain's run while it trains) and
version_history.py (the history the page and the gate read). Which moves are allowed is
promotion.py's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import components
from components.config import Device, RegistryParams
from components.data.catalog import Catalog
from components.modeling.embedder import Embedder, save_embedder
from components.modeling.pyfunc import DEVICE_CONFIG, ENTRY_POINT, WEIGHTS_ARTIFACT, signature
from components.registry.promotion_log import PromotionLog
from components.registry.sqlite_store import open_store
from components.registry.training_runs import TrainingRuns
from components.training.compat import TRANSFORM_FILE, Transform
from components.workspace import Workspace

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.pyfunc import PyFuncModel

CHAMPION = "champion"
CHALLENGER = "challenger"  # alias of the newest registered candidate, promoted or not
TABLE_TAG = "index_table"  # set once the version's table is built and validated
INDEX_VALIDATED_TAG = "index_validated"  # "true" | "false": the table build's own validation
ANN_RECALL_TAG = "index_ann_recall"  # the table's ANN recall@10 against exact search (absent: exact search)
SMOKE_TAG = "index_smoke_test"  # "passed" | "failed": the logged model finds its probes in its table
SMOKE_DETAIL_TAG = "index_smoke_test_detail"
ARRIVALS_TAG = "arrivals"
VERDICT_TAG = "gate_verdict"  # "promote" | "reject"
DATA_VERSION_TAG = "data_version"
GIT_COMMIT_TAG = "git_commit"
GATE_REPORT = "gate/report.json"  # run artifacts: the gate report (JSON, markdown) and the forgetting heatmap
GATE_MARKDOWN = "gate/report.md"
GATE_HEATMAP = "gate/forgetting.png"
GATE_COMPAT_HEATMAP = "gate/compatibility.png"  # unseen Recall@1 across the kept versions
HISTORY_PLOT = "history/history.png"  # run artifacts: the history and the embedding map as they stood at the run
MAP_PLOT = "history/embedding_map.png"
STATE_ARTIFACT = "continual"  # the run artifact folder holding the continual-learning state
COMPATIBLE_TAG = "compatible_with"  # the version whose vectors this one went live on (compat.py)

# What the logged model needs to run on its own, pinned at the versions installed here (the
# set constraints.txt pins and the tests ran with), read from the environment so they never drift.
MODEL_PACKAGES = ("torch", "torchvision", "mlflow", "numpy", "pandas", "pillow", "pydantic", "PyYAML")


def model_requirements() -> list[str]:
    """`name==version` of every package the logged model imports, as installed (local tags like +cu128 dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in MODEL_PACKAGES]


@contextmanager
def _fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for one call only.

    mlflow.set_tracking_uri is process-wide and exports MLFLOW_TRACKING_URI to the
    environment; left in place it would silently redirect every later workspace.
    """
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        # None puts MLflow back on its default; its stubs only name str.
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]  # None resets
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]  # None resets
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def table(self) -> str | None:
        return self.tags.get(TABLE_TAG)

    @property
    def arrivals(self) -> list[str]:
        return sorted(json.loads(self.tags.get(ARRIVALS_TAG, "[]")))

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def data_version(ws: Workspace) -> str:
    """The catalog's content hash, chained over its arrival manifests (which pin every stored image
    by its content-hash name): the data a model saw, without reading the catalog; "none" before any ingest."""
    return Catalog.load(ws.catalog).version()


def git_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout holding this code; None outside one."""
    root = Path(components.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip(), bool(dirty.stdout.strip())


class ModelRegistry:
    def __init__(self, ws: Workspace, params: RegistryParams) -> None:
        self.ws = ws
        self.name = params.model_name
        self.experiment = params.experiment
        # The one place mnemo opens MLflow: a locked SQLite store is waited for (bounded, then
        # RegistryBusy), a copied or moved workspace's artifact locations are rebased onto it.
        open_store(ws)
        self.client = MlflowClient(tracking_uri=ws.tracking_uri, registry_uri=ws.tracking_uri)
        self.log = PromotionLog(
            self.client,
            self.name,
            f"{self.experiment}-promotions",
            self._experiment_id,
            champion=lambda: self.aliases().get(CHAMPION),
        )
        self.runs = TrainingRuns(self.client, self._experiment_id)

    def _experiment_id(self, name: str | None = None) -> str:
        """The id of experiment `name` (default: the retrain runs' experiment), created when missing."""
        name = name or self.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # A local store keeps artifacts in the workspace; a server decides for itself.
        local = self.ws.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.ws.tracking_uri
        location = self.ws.artifact_root.as_uri() if local else None
        return self.client.create_experiment(name, artifact_location=location)

    def log_candidate(
        self,
        model: Embedder,
        *,
        params: dict[str, object],
        metrics: dict[str, float],
        epoch_metrics: dict[str, list[float]],
        arrivals: list[str],
        tags: dict[str, str] | None = None,
        run_name: str | None = None,
        state_dir: Path | None = None,
        device: Device = "auto",
        run_id: str | None = None,
    ) -> ModelVersionInfo:
        """One MLflow run: params, metrics, the standalone pyfunc model, registered as a new version.

        `run_id`: the run runs.start opened when training began (its epochs already logged
        as they finished); it is carried on and finished here. Without it, a new run.

        `state_dir` (the continual-learning state: replay memory, loss proxies) is logged
        as the run's `continual/` artifacts, for the next retrain to restore. `device`
        (train.device) is the logged model's default device, its `model_config`; whoever loads
        it may say otherwise: `mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`.
        """
        with (
            _fluent_uris(self.ws.tracking_uri),
            mlflow.start_run(run_id=run_id)
            if run_id
            else mlflow.start_run(experiment_id=self._experiment_id(), run_name=run_name),
        ):
            mlflow.log_params(params)
            mlflow.set_tags(self._lineage_tags())
            if state_dir is not None:
                mlflow.log_artifacts(str(state_dir), artifact_path=STATE_ARTIFACT)
            for key, values in epoch_metrics.items():
                logged = {m.step for m in self.client.get_metric_history(run_id, key)} if run_id else set()
                for step, value in enumerate(values):
                    if step not in logged:  # an epoch logged as it finished is not logged twice
                        mlflow.log_metric(key, value, step=step)
            mlflow.log_metrics(metrics)
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                # The signature is explicit; MLflow's nudge towards an input example is noise here.
                warnings.filterwarnings("ignore", message=".*An input example was not provided")
                weights = Path(tmp) / "embedder.pt"
                save_embedder(model, weights)
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(ENTRY_POINT),
                    artifacts={WEIGHTS_ARTIFACT: str(weights)},
                    model_config={DEVICE_CONFIG: device},
                    code_paths=[str(Path(components.__file__).parent)],
                    signature=signature(model.embedding_dim),
                    pip_requirements=model_requirements(),
                    registered_model_name=self.name,
                )
        version = str(info.registered_model_version)
        version_tags = {ARRIVALS_TAG: json.dumps(sorted(arrivals), ensure_ascii=False), **(tags or {})}
        for key, tag in version_tags.items():
            self.client.set_model_version_tag(self.name, version, key, tag)
        self.set_alias(CHALLENGER, version)
        return self.get(version)

    def _lineage_tags(self) -> dict[str, str]:
        """What a run was made from: the data version and the code's git commit."""
        tags = {DATA_VERSION_TAG: data_version(self.ws)}
        commit = git_commit()
        if commit is not None:
            tags |= {
                GIT_COMMIT_TAG: commit[0],
                "git_dirty": str(commit[1]).lower(),
                "mlflow.source.git.commit": commit[0],
            }
        return tags

    def get(self, version: str, *, with_metrics: bool = True) -> ModelVersionInfo:
        """The version, its tags and (unless with_metrics is False: one call fewer) its run's metrics."""
        mv = self.client.get_model_version(self.name, str(version))
        return self._info(mv, with_metrics=with_metrics)

    def _info(self, mv: ModelVersion, *, with_metrics: bool = True) -> ModelVersionInfo:
        metrics = self.client.get_run(mv.run_id).data.metrics if mv.run_id and with_metrics else {}
        return ModelVersionInfo(
            name=self.name, version=str(mv.version), run_id=mv.run_id or "", tags=dict(mv.tags), metrics=dict(metrics)
        )

    def set_tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, str(version), key, value)

    def _by_alias(self, alias: str) -> ModelVersionInfo | None:
        # Read from the registered model: a missing alias is then None on every store, where
        # get_model_version_by_alias raises with store-dependent error codes.
        version = self.aliases().get(alias)
        return self.get(version) if version is not None else None

    def aliases(self) -> dict[str, str]:
        """{alias: version} of the registered model (empty before its first version)."""
        try:
            aliases = self.client.get_registered_model(self.name).aliases
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in aliases.items()}  # some stores answer ints

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def champion(self) -> ModelVersionInfo | None:
        """The serving version."""
        return self._by_alias(CHAMPION)

    def challenger(self) -> ModelVersionInfo | None:
        """The newest registered candidate, whatever its verdict."""
        return self._by_alias(CHALLENGER)

    def latest(self, *, gated: bool = False) -> ModelVersionInfo | None:
        """The newest registered version, promoted or not; with `gated`, the newest the gate ruled on
        (a retrain killed between registering and its verdict leaves a version without one)."""
        versions = [
            mv
            for mv in self.client.search_model_versions(f"name = '{self.name}'")
            if not gated or VERDICT_TAG in mv.tags
        ]
        return self._info(max(versions, key=lambda mv: int(mv.version))) if versions else None

    def record_index(
        self, version: str, table: str, *, validated: bool = True, ann_recall: float | None = None
    ) -> None:
        """Record the version's table once built, whether it passed the build's validation, and its ANN recall."""
        self.set_tag(version, TABLE_TAG, table)
        self.set_tag(version, INDEX_VALIDATED_TAG, str(validated).lower())
        if ann_recall is not None:
            self.set_tag(version, ANN_RECALL_TAG, f"{ann_recall:.4f}")

    def record_smoke_test(self, version: str, passed: bool, detail: str) -> None:
        """Record the index smoke test: a failed one bars the version from `champion`, --force or not."""
        self.set_tag(version, SMOKE_TAG, "passed" if passed else "failed")
        self.set_tag(version, SMOKE_DETAIL_TAG, detail[:5000])

    def log_gate(
        self,
        version: str,
        report: dict,
        markdown: str,
        heatmap: Figure | None = None,
        compat_heatmap: Figure | None = None,
    ) -> None:
        """The gate report (JSON + markdown), the forgetting and compatibility heatmaps on the version's
        run; the verdict as a tag."""
        run_id = self.get(version).run_id
        self.client.log_dict(run_id, report, GATE_REPORT)
        self.client.log_text(run_id, markdown, GATE_MARKDOWN)
        for figure, path in ((heatmap, GATE_HEATMAP), (compat_heatmap, GATE_COMPAT_HEATMAP)):
            if figure is not None:
                self.client.log_figure(run_id, figure, path, save_kwargs={"dpi": 120})
        self.set_tag(version, VERDICT_TAG, report["verdict"])

    def log_backfill(self, version: str, rows: int, remaining: int) -> None:
        """The backfill's progress on the version's run: rows still of the older model, stepped by
        the rows re-embedded so far (a resumed backfill carries on the same curve)."""
        run_id = self.get(version, with_metrics=False).run_id
        self.client.log_metric(run_id, "backfill_rows_remaining", remaining, step=rows - remaining)

    def gate_report(self, version: str) -> dict | None:
        """The gate report logged for a version; None when it has none."""
        data = self._artifact(version, GATE_REPORT)
        return None if data is None else json.loads(data)

    def gate_heatmap(self, version: str) -> bytes | None:
        """The forgetting heatmap (PNG) logged with a version's gate report; None when it has none."""
        return self._artifact(version, GATE_HEATMAP)

    def _artifact(self, version: str, path: str) -> bytes | None:
        """One file logged on the version's run, or None when the run has no such file."""
        run_id = self.get(version).run_id
        if not any(f.path == path for f in self.client.list_artifacts(run_id, path.rsplit("/", 1)[0])):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(run_id, path, tmp)).read_bytes()

    def versions(self) -> list[ModelVersionInfo]:
        """Every registered version with its tags and its run's metrics, oldest first."""
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return [self._info(mv) for mv in sorted(found, key=lambda mv: int(mv.version))]

    def log_plot(self, version: str, figure: Figure, path: str) -> None:
        """A figure (the history, the embedding map) as an artifact of the version's run: the MLflow UI shows it."""
        run_id = self.get(version, with_metrics=False).run_id
        self.client.log_figure(run_id, figure, path, save_kwargs={"dpi": 110})

    def load_embedder(self, version: str) -> Embedder:
        return self.load_pyfunc(version).unwrap_python_model().embedder

    def download_state(self, version: str, dst: Path) -> Path | None:
        """The version's continual-learning state, downloaded into dst; None when it has none."""
        run_id = self.get(version).run_id
        if not any(f.path == STATE_ARTIFACT for f in self.client.list_artifacts(run_id)):
            return None
        return Path(self.client.download_artifacts(run_id, STATE_ARTIFACT, str(dst)))

    def load_transform(self, version: str) -> Transform | None:
        """The version's map from its predecessor's vectors (compat.mode transform); None when it has none."""
        run_id = self.get(version).run_id
        path = f"{STATE_ARTIFACT}/{TRANSFORM_FILE}"
        if not any(f.path == path for f in self.client.list_artifacts(run_id, STATE_ARTIFACT)):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Transform.load(Path(self.client.download_artifacts(run_id, path, tmp)))

    def load_pyfunc(self, version: str, model_config: dict[str, str] | None = None) -> PyFuncModel:
        """The logged model exactly as an outside user would load it (`model_config`: e.g. its device)."""
        with _fluent_uris(self.ws.tracking_uri):
            return mlflow.pyfunc.load_model(f"models:/{self.name}/{version}", model_config=model_config)
