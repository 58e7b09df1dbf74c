"""dvc.yaml runs the same component functions as the flow: `dvc repro` in a scratch git repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.data.demo import discover_fonts, stream_classes, write_arrival
from tests.conftest import REPO


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_reports_metrics(params, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "components", repo / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    tiny = params.model_copy(update={"paths": params.paths.model_copy(update={"workspace": Path("ws")})})
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny.model_dump(mode="json")))
    fonts = discover_fonts()
    write_arrival(repo / "ws" / "inbox", 0, stream_classes(fonts, params.demo)[0], fonts, params.demo)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNEMO_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml is this one
    env["PYTHONPATH"] = str(repo)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo, env)
    run(dvc + ["init", "-q"], repo, env)
    run(dvc + ["repro"], repo, env)

    metrics = json.loads((repo / "ws" / "dvc" / "metrics.json").read_text())
    assert 0.0 <= metrics["unseen_recall_at_1"] <= 1.0 and "baseline_unseen_map_at_r" in metrics
    shown = json.loads(run(dvc + ["metrics", "show", "--json"], repo, env))
    assert any("unseen_recall_at_1" in json.dumps(v) for v in shown.values())
    # The inbox is a stage dependency, so ingest leaves it in place; a second repro has nothing to do.
    assert (repo / "ws" / "inbox" / "demo-000").is_dir()
    again = run(dvc + ["repro"], repo, env)
    assert "Running stage" not in again and again.count("didn't change, skipping") == 3, again
