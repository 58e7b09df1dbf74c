"""MLflow: one run per retrain, the model logged as a standalone pyfunc and registered,
the `champion` alias as the serving pointer, `challenger` on the newest candidate, and
the promotion log. All MLflow calls live here.

MLflow keeps no alias history, so every move of `champion` is also recorded as one run
in the experiment `<experiment>-promotions` (params from, to, reason, actor, kind; the
run's start time is the time of the move). It lives in the tracking store itself, so it
works the same against a local SQLite file and a remote MLflow server.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import components
from components.config import RegistryParams, Workspace
from components.modeling.embedder import Embedder, save_embedder
from components.modeling.pyfunc import ENTRY_POINT, WEIGHTS_ARTIFACT, signature

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CHAMPION = "champion"
CHALLENGER = "challenger"  # alias of the newest registered candidate, promoted or not
TABLE_TAG = "index_table"  # set once the version's table is built and validated
INDEX_VALIDATED_TAG = "index_validated"  # "true" | "false": the table build's own validation
SMOKE_TAG = "index_smoke_test"  # "passed" | "failed": the logged model finds its probes in its table
SMOKE_DETAIL_TAG = "index_smoke_test_detail"
ARRIVALS_TAG = "arrivals"
VERDICT_TAG = "gate_verdict"  # "promote" | "reject"
DATA_VERSION_TAG = "data_version"
GIT_COMMIT_TAG = "git_commit"
GATE_REPORT = "gate/report.json"  # run artifacts: the gate report (JSON, markdown) and the forgetting heatmap
GATE_MARKDOWN = "gate/report.md"
GATE_HEATMAP = "gate/forgetting.png"
STATE_ARTIFACT = "continual"  # the run artifact folder holding the continual-learning state

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


class PromotionRefused(RuntimeError):
    """A version may not become champion; the message gives every reason."""


@dataclass(frozen=True)
class PromotionEntry:
    """One move of the `champion` alias: when, from which version to which, why, and by whom."""

    time: str  # ISO 8601, UTC
    from_version: str | None
    to_version: str
    reason: str
    actor: str
    kind: Literal["promote", "rollback"]

    def to_dict(self) -> dict[str, str | None]:
        return {"time": self.time, "from": self.from_version, "to": self.to_version, "reason": self.reason,
                "actor": self.actor, "kind": self.kind}


def default_actor() -> str:
    """Who is moving the alias: $MNEMO_ACTOR, else the login name."""
    try:
        return os.environ.get("MNEMO_ACTOR") or getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return "unknown"


def promotion_refusals(info: ModelVersionInfo, *, force: bool = False, table: str | None = None) -> list[str]:
    """Why `info` may not carry `champion` (empty when it may). Only a failed gate yields to `force`.

    `table` is a validated table found for the version beyond its tag (one built later by
    `python -m components.index --version V`). Whether a table still exists and is
    validated is the caller's check against the index (components.index).
    """
    v = info.version
    problems = []
    if not (table or info.table):
        problems.append(f"v{v} has no validated index table (build one with `python -m components.index --version {v}`)")
    if info.tags.get(INDEX_VALIDATED_TAG) == "false":
        problems.append(f"v{v}'s index table {info.table} failed validation")
    if info.tags.get(SMOKE_TAG) == "failed":
        problems.append(f"v{v} failed the index smoke test ({info.tags.get(SMOKE_DETAIL_TAG, 'no detail')})")
    if info.tags.get(VERDICT_TAG) == "reject" and not force:
        problems.append(f"v{v} failed the gate (see `mnemo status`); --force promotes it anyway")
    return problems


def previous_champion(entries: list[PromotionEntry], current: str) -> str | None:
    """The champion before `current`: where the promotion that made `current` champion came from.

    Rollbacks are not promotions, so rolling back twice walks further back (v3 -> v2 -> v1)
    rather than toggling between two versions; None when nothing came before.
    """
    for entry in reversed(entries):
        if entry.kind == "promote" and entry.to_version == current:
            return entry.from_version
    return None


def data_version(ws: Workspace) -> str:
    """Content hash of the class registry (which pins every stored image by its content-hash name).

    Stands in for the DVC data version until data/ is DVC-tracked; "none" before any ingest.
    """
    try:
        return "md5:" + hashlib.md5(ws.class_registry.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "none"


def git_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout holding this code; None outside one."""
    root = Path(components.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip(), bool(dirty.stdout.strip())


class ModelRegistry:
    def __init__(self, ws: Workspace, params: RegistryParams) -> None:
        self.ws = ws
        self.name = params.model_name
        self.experiment = params.experiment
        self.client = MlflowClient(tracking_uri=ws.tracking_uri, registry_uri=ws.tracking_uri)

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

    @property
    def log_experiment(self) -> str:
        """The experiment holding the promotion log: one run per move of `champion`."""
        return f"{self.experiment}-promotions"

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
    ) -> ModelVersionInfo:
        """One MLflow run: params, metrics, the standalone pyfunc model, registered as a new version.

        `state_dir` (the continual-learning state: replay memory, loss proxies) is logged
        as the run's `continual/` artifacts, for the next retrain to restore.
        """
        with _fluent_uris(self.ws.tracking_uri), mlflow.start_run(experiment_id=self._experiment_id(), run_name=run_name):
            mlflow.log_params(params)
            mlflow.set_tags(self._lineage_tags())
            if state_dir is not None:
                mlflow.log_artifacts(str(state_dir), artifact_path=STATE_ARTIFACT)
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
        self.client.set_registered_model_alias(self.name, CHALLENGER, version)
        return self.get(version)

    def _lineage_tags(self) -> dict[str, str]:
        """What a run was made from: the data version and the code's git commit."""
        tags = {DATA_VERSION_TAG: data_version(self.ws)}
        commit = git_commit()
        if commit is not None:
            tags |= {GIT_COMMIT_TAG: commit[0], "git_dirty": str(commit[1]).lower(), "mlflow.source.git.commit": commit[0]}
        return tags

    def get(self, version: str) -> ModelVersionInfo:
        mv = self.client.get_model_version(self.name, str(version))
        return self._info(mv)

    def _info(self, mv: ModelVersion) -> ModelVersionInfo:
        metrics = self.client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        return ModelVersionInfo(name=self.name, version=str(mv.version), run_id=mv.run_id, tags=dict(mv.tags), metrics=dict(metrics))

    def set_tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, str(version), key, value)

    def _by_alias(self, alias: str) -> ModelVersionInfo | None:
        # Read from the registered model: a missing alias is then None on every store, where
        # get_model_version_by_alias raises with store-dependent error codes.
        try:
            version = self.client.get_registered_model(self.name).aliases.get(alias)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return self.get(version) if version is not None else None

    def champion(self) -> ModelVersionInfo | None:
        """The serving version."""
        return self._by_alias(CHAMPION)

    def challenger(self) -> ModelVersionInfo | None:
        """The newest registered candidate, whatever its verdict."""
        return self._by_alias(CHALLENGER)

    def latest(self) -> ModelVersionInfo | None:
        """The newest registered version, promoted or not."""
        versions = self.client.search_model_versions(f"name = '{self.name}'")
        return self._info(max(versions, key=lambda mv: int(mv.version))) if versions else None

    def record_index(self, version: str, table: str, *, validated: bool = True) -> None:
        """Record the version's table once built, and whether it passed the build's validation."""
        self.set_tag(version, TABLE_TAG, table)
        self.set_tag(version, INDEX_VALIDATED_TAG, str(validated).lower())

    def record_smoke_test(self, version: str, passed: bool, detail: str) -> None:
        """Record the index smoke test: a failed one bars the version from `champion`, --force or not."""
        self.set_tag(version, SMOKE_TAG, "passed" if passed else "failed")
        self.set_tag(version, SMOKE_DETAIL_TAG, detail[:5000])

    def log_gate(self, version: str, report: dict, markdown: str, heatmap: Figure | None = None) -> None:
        """The gate report (JSON + markdown) and the forgetting heatmap on the version's run; the verdict as a tag."""
        run_id = self.get(version).run_id
        self.client.log_dict(run_id, report, GATE_REPORT)
        self.client.log_text(run_id, markdown, GATE_MARKDOWN)
        if heatmap is not None:
            self.client.log_figure(run_id, heatmap, GATE_HEATMAP, save_kwargs={"dpi": 120})
        self.set_tag(version, VERDICT_TAG, report["verdict"])

    def gate_report(self, version: str) -> dict | None:
        """The gate report logged for a version; None when it has none."""
        run_id = self.get(version).run_id
        if not any(f.path == GATE_REPORT for f in self.client.list_artifacts(run_id, GATE_REPORT.rsplit("/", 1)[0])):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(self.client.download_artifacts(run_id, GATE_REPORT, tmp)).read_text())

    def served_history(self) -> list[tuple[str, dict[str, float]]]:
        """(version, run metrics) of every version that was ever champion, oldest version first."""
        served = {e.to_version for e in self.promotions()}
        champion = self.champion()
        if champion is not None:
            served.add(champion.version)
        rows = []
        for version in sorted(served, key=int):
            try:
                rows.append((version, self.get(version).metrics))
            except MlflowException:  # a version deleted from the registry since
                continue
        return rows

    # --- the promotion log and the alias moves ---------------------------------------------

    def _log_runs(self) -> list[Run]:
        """The finished runs of the promotion log for this model, oldest first."""
        found = self.client.get_experiment_by_name(self.log_experiment)
        if found is None:
            return []
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(
                [found.experiment_id], filter_string=f"tags.model_name = '{self.name}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time ASC"], max_results=1000, page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                return sorted(runs, key=lambda r: r.info.start_time)

    def promotions(self) -> list[PromotionEntry]:
        """The promotion log, oldest first."""
        entries = []
        for run in self._log_runs():
            p = run.data.params
            entries.append(PromotionEntry(
                time=datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).isoformat(timespec="milliseconds"),
                from_version=None if p.get("from", "none") == "none" else p["from"], to_version=p["to"],
                reason=p.get("reason", ""), actor=p.get("actor", "unknown"), kind=p.get("kind", "promote"),  # type: ignore[arg-type]
            ))
        return entries

    def promote(
        self,
        version: str,
        table: str | None = None,
        *,
        reason: str = "",
        actor: str | None = None,
        force: bool = False,
        kind: Literal["promote", "rollback"] = "promote",
    ) -> PromotionEntry | None:
        """Move `champion` to the version (the atomic switch) and log the move; None when it already is champion.

        With `table`, the freshly built and validated table is recorded first (the retrain
        flow's call). Raises PromotionRefused when the version has no validated table, failed
        the smoke test, or failed the gate without `force`.
        """
        version = str(version)
        if table is not None:
            self.record_index(version, table)
        refusals = promotion_refusals(self.get(version), force=force, table=table)
        if refusals:
            raise PromotionRefused(f"cannot make v{version} champion: " + "; ".join(refusals))
        current = self.champion()
        if current is not None and current.version == version:
            return None
        entry_params = {"from": current.version if current else "none", "to": version, "reason": reason or "-",
                        "actor": actor or default_actor(), "kind": kind}
        last = self._log_runs()[-1:]
        start = max(int(time.time() * 1000), last[0].info.start_time + 1 if last else 0)  # the log stays strictly ordered
        run = self.client.create_run(self._experiment_id(self.log_experiment), start_time=start, tags={"model_name": self.name},
                                     run_name=f"{kind} v{entry_params['from']} -> v{version}")
        try:
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in entry_params.items()])
            self.client.set_registered_model_alias(self.name, CHAMPION, version)
        except Exception:
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))  # not part of the log
            raise
        self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED), end_time=start)
        return PromotionEntry(time=datetime.fromtimestamp(start / 1000, tz=timezone.utc).isoformat(timespec="milliseconds"),
                              from_version=current.version if current else None, to_version=version,
                              reason=entry_params["reason"], actor=entry_params["actor"], kind=kind)

    def rollback_target(self, to: str | None = None) -> str:
        """The version a rollback moves `champion` to: `to`, else the champion before the current one.

        Raises PromotionRefused, saying why, when there is nothing to roll back to.
        """
        if to is not None:
            return str(to)
        entries = self.promotions()
        if not entries:
            raise PromotionRefused(f"nothing to roll back to: the promotion log of {self.name} is empty "
                                   "(no version was ever promoted with it); name a version with --to")
        current = self.champion()
        if current is None:
            raise PromotionRefused(f"{self.name} has no champion to roll back from; promote a version instead")
        previous = previous_champion(entries, current.version)
        if previous is None:
            raise PromotionRefused(f"nothing to roll back to: v{current.version} has no earlier champion in the promotion "
                                   f"log ({len(entries)} entries); name a version with --to")
        return previous

    def rollback(self, to: str | None = None, *, table: str | None = None, reason: str = "", actor: str | None = None
                 ) -> PromotionEntry | None:
        """Move `champion` back: to the previous champion in the log, or to `to`.

        A version that served before may return without passing the gate again; any
        other needs a passed gate. The index checks always apply.
        """
        target = self.rollback_target(to)
        current = self.champion()
        served_before = target in {e.to_version for e in self.promotions()}
        default = f"rollback from v{current.version}" if current else "rollback"
        return self.promote(target, table, reason=reason or default, actor=actor, force=served_before, kind="rollback")

    def load_embedder(self, version: str) -> Embedder:
        return self.load_pyfunc(version).unwrap_python_model().embedder

    def download_state(self, version: str, dst: Path) -> Path | None:
        """The version's continual-learning state, downloaded into dst; None when it has none."""
        run_id = self.get(version).run_id
        if not any(f.path == STATE_ARTIFACT for f in self.client.list_artifacts(run_id)):
            return None
        return Path(self.client.download_artifacts(run_id, STATE_ARTIFACT, str(dst)))

    def load_pyfunc(self, version: str) -> mlflow.pyfunc.PyFuncModel:
        """The logged model exactly as an outside user would load it."""
        with _fluent_uris(self.ws.tracking_uri):
            return mlflow.pyfunc.load_model(f"models:/{self.name}/{version}")
