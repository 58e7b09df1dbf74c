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
    for package in ("components", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    tiny = params.model_copy(update={"paths": params.paths.model_copy(update={"workspace": Path("ws")})})
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny.model_dump(mode="json")))
    fonts = discover_fonts()
    stream = stream_classes(fonts, params.demo)
    for step in (0, 1):  # two arrivals: the second is learned with the first's memory and model
        write_arrival(repo / "ws" / "inbox", step, stream[step], fonts, params.demo)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNEMO_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml is this one
    env["PYTHONPATH"] = str(repo)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo, env)
    run(dvc + ["init", "-q"], repo, env)
    run(dvc + ["repro"], repo, env)

    # The train stage is the retrain flow's continual training: one step per arrival, the
    # second replaying the first's exemplars and distilling from the first's model.
    first, second = json.loads((repo / "ws" / "dvc" / "train.json").read_text())["steps"]
    assert (first["arrival"], second["arrival"]) == ("demo-000", "demo-001")
    assert not first["distilled_from_previous"] and first["replay_exemplars"] == 0
    assert second["distilled_from_previous"] and second["replay_exemplars"] == first["memory_after"] > 0
    assert any(k.startswith("distill_") for k in second["last_epoch"]), second["last_epoch"]

    metrics = json.loads((repo / "ws" / "dvc" / "metrics.json").read_text())
    assert 0.0 <= metrics["unseen_recall_at_1"] <= 1.0 and "baseline_unseen_map_at_r" in metrics
    shown = json.loads(run(dvc + ["metrics", "show", "--json"], repo, env))
    assert any("unseen_recall_at_1" in json.dumps(v) for v in shown.values())
    # The inbox is a stage dependency, so ingest leaves it in place; a second repro has nothing to do.
    assert (repo / "ws" / "inbox" / "demo-000").is_dir() and (repo / "ws" / "inbox" / "demo-001").is_dir()
    again = run(dvc + ["repro"], repo, env)
    assert "Running stage" not in again and again.count("didn't change, skipping") == 4, again

    # The report stage's plots: Recall@K of the model next to raw pixels, Recall@1 per arrival slice.
    curve = json.loads((repo / "ws" / "dvc" / "plots" / "unseen_recall_at_k.json").read_text())
    assert [row["k"] for row in curve] == params.evaluate.recall_at
    assert (
        curve[0]["model"] == metrics["unseen_recall_at_1"]
        and curve[0]["pixels"] == metrics["baseline_unseen_recall_at_1"]
    )
    plots = json.loads(run(dvc + ["plots", "show", "--json"], repo, env))["data"]
    assert {
        "unseen Recall@K, model vs raw pixels",
        "seen-class Recall@1 per arrival",
        "ws/dvc/plots/seen_recall.png",
    } <= set(plots)

    # The data is DVC-tracked: data/classes and the class registry are cached outputs in dvc.lock.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["ingest"]
    assert {o["path"] for o in lock["outs"]} == {"ws/data/classes", "ws/data/arrivals"}

    # An experiment on a train param: DVC re-runs train, evaluate and report, and reports its metrics.
    git = ["git", "-c", "user.name=mnemo-test", "-c", "user.email=test@mnemo.invalid"]
    run(git + ["add", "-A"], repo, env)
    run(git + ["commit", "-q", "-m", "baseline"], repo, env)
    exp = run(dvc + ["exp", "run", "-S", "train.epochs=2"], repo, env)
    assert "Running stage 'train'" in exp and "Running stage 'report'" in exp and "Running stage 'ingest'" not in exp, (
        exp
    )
    shown = json.loads(run(dvc + ["metrics", "show", "--json"], repo, env))
    assert "unseen_recall_at_1" in json.dumps(shown)
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"] == 2
    table = json.loads(run(dvc + ["exp", "show", "--json"], repo, env))
    assert "unseen_recall_at_1" in json.dumps(table) and '"epochs": 2' in json.dumps(table)


def test_every_stage_declares_exactly_the_params_it_may_read(repo_params):
    from flows.stages import SECTIONS, STAGES, StageParams

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES) == set(SECTIONS)
    for name, stage in stages.items():
        declared = set(stage["params"])
        assert declared == set(SECTIONS[name]), name  # dvc.yaml and what the stage may read agree
        assert declared <= set(type(repo_params).model_fields), name  # and every declared section exists
    # A stage reading what it did not declare fails, naming the stage and the section.
    view = StageParams(repo_params, "report")
    assert view.evaluate == repo_params.evaluate
    with pytest.raises(AttributeError, match="stage report reads params section 'train', which dvc.yaml does not"):
        _ = view.train
