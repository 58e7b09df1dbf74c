"""The live pair's promises at its edges: a move never hides an ingested image, the promotion
log survives a crash on either side of the alias move, one writer at a time, and promotion
fails closed. Real MLflow (SQLite) and LanceDB in tmp_path; the CLI as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import ViewType
from typer.testing import CliRunner

from components.data.catalog import Catalog
from components.data.inbox import ingest_inbox
from components.data.transforms import open_rgb
from components.ops.failpoints import ENV as FAILPOINT
from components.registry.mlflow_registry import ModelRegistry
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex
from components.vectors.search import table_rows
from flows.cli import app
from tests.conftest import REPO
from tests.integration.live_workspace import register_random, write_arrival

runner = CliRunner()


def cli(ws, params_file: Path, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, [*args, "--workspace", str(ws.root), "--params", str(params_file)])
    assert result.exit_code == code, result.output
    return result.output


def cli_process(ws, params_file: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mnemo ...` in its own process (a failpoint kills that process, not the test)."""
    command = [sys.executable, "-m", "flows.cli", *args, "--workspace", str(ws.root), "--params", str(params_file)]
    return subprocess.run(command, cwd=REPO, env=os.environ | (env or {}), capture_output=True, text=True, timeout=300)


def every_image_finds_itself(ws, params) -> None:
    pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=60).current()
    records = Catalog.load(ws.catalog).records()
    assert pair.rows() == len(records)
    hits = pair.query([open_rgb(ws.classes_dir / r.id) for r in records], 1)
    assert [h[0]["id"] for h in hits] == [r.id for r in records]


def test_a_rollback_after_an_ingest_hides_no_image(live_ws, params):
    promoter = Promoter(live_ws, params.registry, params.index)
    promoter.promote("2", reason="test")
    write_arrival(live_ws.inbox, "a1", ["n0", "n1"], 6, seed=9)
    ingest_inbox(live_ws, params.ingest)
    assert promoter.catch_up().added == 12  # queryable at once in v2's table, not yet in v1's
    assert table_rows(live_ws, "embeddings_v1") == 60

    moved = promoter.rollback(reason="v2 answers badly")
    assert (moved.version, moved.table) == ("1", "embeddings_v1")
    assert table_rows(live_ws, "embeddings_v1") == 72  # caught up before the alias moved
    every_image_finds_itself(live_ws, params)


def test_promotion_fails_closed_and_a_forced_one_is_logged_as_forced(live_ws, params, params_file):
    version = register_random(live_ws, params, seed=3, gated=False)  # never gated, never smoke-tested
    Promoter(live_ws, params.registry, params.index).reindex(version)
    refused = cli(live_ws, params_file, "promote", version, code=1)
    assert "was never gated" in refused and "never smoke-tested" in refused
    assert "--force needs a --reason" in cli(live_ws, params_file, "promote", version, "--force", code=1)
    cli(live_ws, params_file, "promote", version, "--force", "--reason", "hotfix, gate skipped on purpose")
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["version"] == version
    assert status["promotions"][-1] | {"time": None} == {
        "time": None,
        "from": "1",
        "to": version,
        "reason": "hotfix, gate skipped on purpose",
        "actor": status["promotions"][-1]["actor"],
        "kind": "promote",
        "forced": True,
    }


def test_a_second_writer_is_refused_naming_the_first(live_ws, params, params_file):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from components.config import load_params\n"
            "from components.workspace import resolve_workspace\n"
            "from components.ops.writer_lock import writer_lock\n"
            "ws = resolve_workspace(load_params(sys.argv[1]), sys.argv[2])\n"
            "with writer_lock(ws, 'a test holding the workspace'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
            str(params_file),
            str(live_ws.root),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["promote", "2", "--reason", "x"], ["rollback"], ["reindex", "2"], ["retrain"]):
            out = cli(live_ws, params_file, *command, code=1)
            assert f"being written by a test holding the workspace (pid {holder.pid} on" in out, command
        stage = subprocess.run(
            [sys.executable, "-m", "flows.stages", "train", "--params", str(params_file)],
            cwd=REPO,
            env=os.environ | {"MNEMO_WORKSPACE": str(live_ws.root)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert stage.returncode != 0 and "being written by a test holding the workspace" in stage.stderr
        assert ModelRegistry(live_ws, params.registry).champion().version == "1"
    finally:
        holder.kill()
        holder.wait()
    cli(live_ws, params_file, "promote", "2", "--reason", "the holder is gone")


def log_runs(ws, params) -> list:
    registry = ModelRegistry(ws, params.registry)
    experiment = registry.client.get_experiment_by_name(registry.log.experiment)
    return registry.client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL) if experiment else []


def test_a_crash_between_the_alias_move_and_the_log_entry_is_recovered(live_ws, params, params_file):
    killed = cli_process(
        live_ws, params_file, "promote", "2", "--reason", "crash after the move", env={FAILPOINT: "alias-moved"}
    )
    assert killed.returncode == -9, killed.stderr
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["version"] == "2"
    assert [(p["from"], p["to"], p["reason"]) for p in status["promotions"]] == [("1", "2", "crash after the move")]
    # The log knows where v2 came from: the rollback goes back to v1, and settles the unfinished entry.
    assert "rolled back: champion v2 -> v1" in cli(live_ws, params_file, "rollback")
    assert sorted(r.info.status for r in log_runs(live_ws, params)) == ["FINISHED", "FINISHED"]


def test_a_crash_between_the_log_entry_and_the_alias_move_is_recovered(live_ws, params, params_file):
    killed = cli_process(
        live_ws,
        params_file,
        "promote",
        "2",
        "--reason",
        "crash before the move",
        env={FAILPOINT: "promotion-log-written"},
    )
    assert killed.returncode == -9, killed.stderr
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["version"] == "1" and status["promotions"] == []  # the move never happened
    assert "nothing to roll back to" in cli(live_ws, params_file, "rollback", code=1)
    cli(live_ws, params_file, "promote", "2", "--reason", "again")
    assert sorted(r.info.status for r in log_runs(live_ws, params)) == ["FAILED", "FINISHED"]
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert [(p["from"], p["to"]) for p in status["promotions"]] == [("1", "2")]


def test_failpoints_are_inert_unless_named(live_ws, params, params_file):
    start = time.perf_counter()
    done = cli_process(live_ws, params_file, "promote", "2", "--reason", "x", env={FAILPOINT: "no-such-point"})
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 120
