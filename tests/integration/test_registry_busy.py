"""A registry another process holds locked: mnemo waits a bounded, stated time, then says so in
one line (no traceback), and an ingest leaves nothing half-done."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from components.ops.transient import is_store_locked, is_transient
from components.registry.mlflow_registry import ModelRegistry
from components.registry.sqlite_store import RegistryBusy
from flows.cli import app
from tests.integration.live_workspace import write_arrival

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
# Holds BEGIN EXCLUSIVE on the file (what a long writer, or `sqlite3 mlflow.db` left open in a
# transaction, does) for the given seconds; says "locked" once it holds it.
HOLDER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
"""

Locker = Callable[[float], subprocess.Popen]


@pytest.fixture()
def lock_registry(live_ws) -> Iterator[Locker]:
    """Start a process that holds the live workspace's mlflow.db exclusively locked for N seconds."""
    procs: list[subprocess.Popen] = []

    def lock(seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(live_ws.mlflow_db), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield lock
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def _busy_line(ws, waited: int) -> str:
    return f"registry busy: {ws.masked_tracking_uri} is locked by another process (waited {waited} s)"


def test_status_on_a_locked_registry_fails_in_one_line_after_the_stated_wait(live_ws, params_file, lock_registry):
    lock_registry(120)
    env = os.environ | {"MNEMO_REGISTRY_BUSY_TIMEOUT": "3", "MNEMO_WORKSPACE": str(live_ws.root)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", "--params", str(params_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "OperationalError" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {_busy_line(live_ws, 3)}; nothing was changed"], done.stderr
    assert elapsed < 60  # the stated 3 s wait (plus start-up), not MLflow's retries


def test_a_lock_released_within_the_wait_is_waited_for(live_ws, params_file, lock_registry, monkeypatch):
    monkeypatch.setenv("MNEMO_REGISTRY_BUSY_TIMEOUT", "60")
    lock_registry(2)
    result = runner.invoke(app, ["status", "--json", "-w", str(live_ws.root), "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    assert '"version": "1"' in result.stdout


def test_an_ingest_on_a_locked_registry_stores_and_says_not_queryable_yet(
    live_ws, params_file, lock_registry, monkeypatch
):
    monkeypatch.setenv("MNEMO_REGISTRY_BUSY_TIMEOUT", "2")
    write_arrival(live_ws.inbox, "a1", ["n0", "n1"], 4, seed=9)
    holder = lock_registry(120)
    common = ["-w", str(live_ws.root), "--params", str(params_file)]
    result = runner.invoke(app, ["ingest", *common])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    expected = (
        f"error: images are stored but not queryable yet (the next ingest appends them): {_busy_line(live_ws, 2)}"
    )
    assert result.stderr.strip() == expected

    holder.kill()
    holder.wait(timeout=10)
    result = runner.invoke(app, ["ingest", *common])  # nothing new to store: the catch-up appends what was stored
    assert result.exit_code == 0, result.output
    assert "queryable now: 8 image(s) appended to embeddings_v1 (champion v1)" in result.stdout


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE"),
            "registry busy: {uri} was locked by another process mid-command (waited 20 s)",
        ),
        (
            sqlite3.OperationalError("database is locked"),
            "busy: a store is locked by another process (database is locked)",
        ),
    ],
    ids=["registry", "another-store"],
)
def test_a_lock_met_mid_command_is_one_line_too(live_ws, params_file, monkeypatch, error, expected):
    """A lock taken after mnemo opened the registry (MLflow's own wait ran out inside a call), or
    on a store that is not the registry: one line that says which, no traceback."""

    def locked(self: ModelRegistry) -> dict[str, str]:
        raise error

    monkeypatch.setattr(ModelRegistry, "aliases", locked)
    result = runner.invoke(app, ["status", "-w", str(live_ws.root), "--params", str(params_file)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.strip() == (
        "error: "
        + expected.format(uri=live_ws.masked_tracking_uri)
        + "; what was done before is kept: run the command again"
    )


def test_a_locked_store_stays_transient_and_the_bounded_wait_is_not_retried():
    locked = MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")
    assert is_transient(locked) and is_store_locked(locked)
    try:
        raise RuntimeError("log_batch failed") from locked
    except RuntimeError as wrapped:
        assert is_store_locked(wrapped)
    busy = RegistryBusy("sqlite:////ws/mlflow.db", 30)
    assert not is_transient(busy)  # it already waited its stated bound: a flow's retries would multiply it
    assert str(busy) == (
        "registry busy: sqlite:////ws/mlflow.db is locked by another process (waited 30 s); nothing was changed"
    )
    assert not is_store_locked(ValueError("no such table"))
