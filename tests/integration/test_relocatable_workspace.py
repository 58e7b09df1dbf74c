"""A workspace copied or moved elsewhere (a backup restored, a folder renamed) is a workspace of
its own: it answers from its own files and writes only into itself."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from typer.testing import CliRunner

from components.config import with_overrides
from components.data.catalog import Catalog
from components.registry.sqlite_store import ARTIFACT_COLUMNS
from components.workspace import resolve_workspace
from flows.cli import app
from tests.integration.live_workspace import write_arrival

runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def artifact_locations(db: Path) -> list[str]:
    """Every artifact location the MLflow store records, in each column that holds one."""
    with sqlite3.connect(db) as con:
        return [
            location
            for table, column in ARTIFACT_COLUMNS
            for (location,) in con.execute(f"SELECT {column} FROM {table}")  # names from the module
            if location and not location.startswith("models:/")
        ]


def test_a_copied_workspace_works_alone_and_writes_only_into_itself(
    live_ws, live_template, params, tmp_path, caplog: pytest.LogCaptureFixture
):
    original = live_ws.root
    cli("status", "-w", str(original), "--params", _params_file(params, original, tmp_path))  # it was in use here
    template_artifacts = sorted(p.name for p in (live_template / "mlartifacts").iterdir())

    # A copy with every file of its own (the artifacts too, as `cp -a` or a restored backup has them).
    copy = tmp_path / "restored" / "ws"
    shutil.copytree(original, copy, symlinks=False)
    shutil.rmtree(original)
    ws = resolve_workspace(with_overrides(params, {"paths.workspace": str(copy)}))
    common = ["-w", str(copy), "--params", _params_file(params, copy, tmp_path)]

    with caplog.at_level(logging.WARNING, logger="components.registry.sqlite_store"):
        status = json.loads(cli("status", "--json", *common))
    assert status["champion"]["version"] == "1"
    assert f"workspace moved from {original}: artifact locations rebased to {ws.artifact_root}" in caplog.text

    stored = next(iter(Catalog.load(ws.catalog).records()))
    answer = json.loads(cli("query", str(ws.classes_dir / stored.id), "--k", "1", "--json", *common))
    assert answer["model_version"] == "1" and answer["results"][0][0]["id"] == stored.id
    cli("promote", "2", "--reason", "restored from backup", *common)

    write_arrival(ws.inbox, "a1", ["n0", "n1", "n2"], 6, seed=5)
    cli("retrain", *common)

    assert not original.exists(), "something was written into the original workspace"
    assert sorted(p.name for p in (live_template / "mlartifacts").iterdir()) == template_artifacts
    locations = artifact_locations(ws.mlflow_db)
    outside = [loc for loc in locations if "/mlartifacts" in loc and not loc.startswith(ws.artifact_root.as_uri())]
    assert not outside, outside
    with sqlite3.connect(ws.mlflow_db) as con:
        models = [row[0] for row in con.execute("SELECT storage_location FROM model_versions")]
    assert len(models) == 3  # v1, v2 and the retrain's candidate, each with its files in the copy
    assert all(Path(unquote(urlsplit(loc).path)).is_dir() for loc in models), models
    assert str(original) not in ws.mlflow_db.read_bytes().decode("utf-8", "replace")


def _params_file(params, root: Path, tmp_path: Path) -> str:
    """The shrunk params with paths.workspace at `root`, written for the CLI."""
    path = tmp_path / f"params-{root.parent.name}-{root.name}.yaml"
    path.write_text(yaml.safe_dump(with_overrides(params, {"paths.workspace": str(root)}).model_dump(mode="json")))
    return str(path)
