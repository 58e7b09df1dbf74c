"""MLflow: one run per retrain, the model logged as a standalone pyfunc and registered,
and the `champion` alias as the serving pointer. All MLflow calls live here."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import components
from components.config import RegistryParams, Workspace
from components.modeling.embedder import Embedder, save_embedder
from components.modeling.pyfunc import ENTRY_POINT, WEIGHTS_ARTIFACT, signature

CHAMPION = "champion"
TABLE_TAG = "index_table"
ARRIVALS_TAG = "arrivals"
VERDICT_TAG = "gate_verdict"

# What the logged model needs to run on its own (the versions mnemo is tested with).
MODEL_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "mlflow==3.17.2",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "pillow==13.0.0",
    "pydantic==2.14.3",
    "PyYAML==6.0.3",
]


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
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
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


class ModelRegistry:
    def __init__(self, ws: Workspace, params: RegistryParams) -> None:
        self.ws = ws
        self.name = params.model_name
        self.experiment = params.experiment
        self.client = MlflowClient(tracking_uri=ws.tracking_uri, registry_uri=ws.tracking_uri)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        # A local store keeps artifacts in the workspace; a server decides for itself.
        local = self.ws.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.ws.tracking_uri
        location = self.ws.artifact_root.as_uri() if local else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

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
    ) -> ModelVersionInfo:
        """One MLflow run: params, metrics, the standalone pyfunc model, registered as a new version."""
        with _fluent_uris(self.ws.tracking_uri), mlflow.start_run(experiment_id=self._experiment_id(), run_name=run_name):
            mlflow.log_params(params)
            for key, values in epoch_metrics.items():
                for step, value in enumerate(values):
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
                    code_paths=[str(Path(components.__file__).parent)],
                    signature=signature(model.embedding_dim),
                    pip_requirements=MODEL_REQUIREMENTS,
                    registered_model_name=self.name,
                )
        version = str(info.registered_model_version)
        for key, value in {ARRIVALS_TAG: json.dumps(sorted(arrivals), ensure_ascii=False), **(tags or {})}.items():
            self.client.set_model_version_tag(self.name, version, key, value)
        return self.get(version)

    def get(self, version: str) -> ModelVersionInfo:
        mv = self.client.get_model_version(self.name, str(version))
        return self._info(mv)

    def _info(self, mv: ModelVersion) -> ModelVersionInfo:
        metrics = self.client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        return ModelVersionInfo(name=self.name, version=str(mv.version), run_id=mv.run_id, tags=dict(mv.tags), metrics=dict(metrics))

    def set_tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, str(version), key, value)

    def champion(self) -> ModelVersionInfo | None:
        try:
            mv = self.client.get_model_version_by_alias(self.name, CHAMPION)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return self._info(mv)

    def latest(self) -> ModelVersionInfo | None:
        """The newest registered version, promoted or not."""
        versions = self.client.search_model_versions(f"name = '{self.name}'")
        return self._info(max(versions, key=lambda mv: int(mv.version))) if versions else None

    def promote(self, version: str, table: str) -> None:
        """Record the version's validated table, then move `champion` to it: the atomic switch."""
        self.set_tag(version, TABLE_TAG, table)
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version))

    def load_embedder(self, version: str) -> Embedder:
        return self.load_pyfunc(version).unwrap_python_model().embedder

    def load_pyfunc(self, version: str) -> mlflow.pyfunc.PyFuncModel:
        """The logged model exactly as an outside user would load it."""
        with _fluent_uris(self.ws.tracking_uri):
            return mlflow.pyfunc.load_model(f"models:/{self.name}/{version}")
