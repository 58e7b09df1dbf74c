"""Kill mnemo (SIGKILL, through a failpoint) at every step where state changes, and prove it recovers.

One workspace lives through its crashes in turn: mid training, after registering before the
index build, mid index build, between the alias move and the promotion-log entry, mid
catch-up, an ingest crash loop (stored but not appended, then twice mid catch-up), mid rollback. A reader thread queries the live pair the whole time. After each crash:
no query failed, `mnemo status` says what is true, the next command (`mnemo retrain`, or
the rollback again) completes, and every stored image is found by a query against the
champion. Real Prefect, MLflow (SQLite) and LanceDB; the killed command runs in its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from prefect.settings import get_current_settings
from typer.testing import CliRunner

from components.config import with_overrides
from components.data.catalog import Catalog
from components.data.transforms import open_rgb
from components.ops.failpoints import ENV as FAILPOINT
from components.registry.mlflow_registry import ModelRegistry
from components.serving.live import LiveIndex
from components.vectors.search import table_rows
from components.vectors.tables import connect
from components.workspace import resolve_workspace
from flows.cli import app
from flows.retrain import retrain
from tests.conftest import REPO
from tests.integration.live_workspace import write_arrival

runner = CliRunner()
CLASSES_PER_ARRIVAL = 4


class Reader:
    """Queries one stored image through the live pair every 50 ms until stopped; keeps every failure."""

    def __init__(self, ws, params, image: Path) -> None:
        self.live = LiveIndex(ws, params.registry, params.index, refresh_seconds=0.2)
        self.image = open_rgb(image)
        self.answers = 0
        self.within = 1  # the stored image must be its own nearest neighbour (or among this many)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                pair = self.live.current()
                [hits] = pair.query([self.image], self.within)
                if self.within == 1 and (not hits or hits[0]["distance"] > 1e-3):
                    self.failures.append(f"v{pair.version}: the stored image did not find itself: {hits}")
                elif self.within > 1 and len(hits) != self.within:
                    self.failures.append(f"v{pair.version}: {len(hits)} answers for k={self.within}")
                self.answers += 1
            except Exception as exc:  # any failure is a broken promise
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Reader:
        self.live.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.live.stop()


@pytest.fixture()
def crash_params(params):
    # Small write chunks, so a build and a catch-up each take several writes: a kill lands mid-way. A gate
    # that lets every candidate through (one epoch on noise): each retrain reaches the build and the move.
    return with_overrides(
        params,
        {
            "index.write_rows": 8,
            "index.probes": 4,
            "gate.max_unseen_recall_at_1_drop": 1.0,
            "gate.max_slice_forgetting": 1.0,
            "gate.min_embedding_spread": 0.0,
        },
    )


def test_every_crash_is_recovered(crash_params, tmp_path):
    params = crash_params
    ws = resolve_workspace(params)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    arrivals = iter(range(100))

    def arrive() -> Path:
        k = next(arrivals)
        classes = [f"a{k}c{i}" for i in range(CLASSES_PER_ARRIVAL)]
        return write_arrival(ws.inbox, f"arrival-{k}", classes, 8, seed=k)

    def mnemo(*args: str) -> dict:
        result = runner.invoke(app, [*args, "--json", "--workspace", str(ws.root), "--params", str(params_file)])
        assert result.exit_code == 0, (result.exception, result.output[-3000:])
        return json.loads(result.stdout)

    # The killed processes use this session's Prefect server: no ephemeral server of their own to orphan.
    env = os.environ | {"PREFECT_API_URL": str(get_current_settings().api.url)}

    def killed(point: str, *args: str) -> None:
        command = [sys.executable, "-m", "flows.cli", *args, "--workspace", str(ws.root), "--params", str(params_file)]
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env | {FAILPOINT: point},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything it started dies with it
        assert proc.returncode == -9, f"{point}: not killed ({proc.returncode}): {stdout[-2000:]}\n{stderr[-2000:]}"

    def truthful_status() -> dict:
        status = mnemo("status")
        registry = ModelRegistry(ws, params.registry)
        champion = registry.champion()
        assert status["champion"]["version"] == champion.version
        assert status["champion"]["table"] == champion.table
        assert status["champion"]["table_rows"] == table_rows(ws, champion.table)
        if status["promotions"]:
            assert status["promotions"][-1]["to"] == champion.version  # the log ends where the alias is
        return status

    def every_image_found() -> None:
        pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=60).current()
        records = Catalog.load(ws.catalog).records()
        assert pair.rows() == len(records), f"v{pair.version}: {pair.rows()} rows for {len(records)} images"
        hits = pair.query([open_rgb(ws.classes_dir / r.id) for r in records], 1)
        lost = [r.id for r, h in zip(records, hits) if h[0]["id"] != r.id]
        assert not lost, f"v{pair.version} does not find {len(lost)} stored images: {lost[:3]}"

    def retrain_once() -> str:
        """The retrain flow in this process (as `mnemo retrain` runs it); its outcome."""
        return retrain(params, str(ws.root)).status

    arrive()
    arrive()
    assert retrain_once() == "promoted"  # the first champion
    first = Catalog.load(ws.catalog).records()[0]

    with Reader(ws, params, ws.classes_dir / first.id) as reader:
        for point in ("train-epoch", "registered", "index-chunk-written", "alias-moved"):
            arrive()
            killed(point, "retrain")
            truthful_status()
            assert retrain_once() in ("promoted", "rejected", "nothing_new"), point
            truthful_status()
            every_image_found()

        # Mid catch-up: the arrival is stored, the live table has only part of it.
        killed("catch-up-chunk-written", "ingest", str(arrive()))
        truthful_status()
        assert retrain_once() in ("promoted", "rejected")
        every_image_found()

        # A crash loop on ingest: killed once stored and recorded (not yet in the live table), then
        # twice mid catch-up; the next ingests, with nothing new in the inbox, bring the table level.
        arrive()
        for point in ("arrival-recorded", "catch-up-chunk-written", "catch-up-chunk-written"):
            killed(point, "ingest")
        for _ in range(2):
            assert mnemo("ingest")["hot_add"]["table"] == truthful_status()["champion"]["table"]
        every_image_found()

        # Mid rollback: the log entry is written, the alias has not moved yet.
        before = truthful_status()["champion"]["version"]
        killed("promotion-log-written", "rollback")
        assert truthful_status()["champion"]["version"] == before
        moved = mnemo("rollback")
        assert moved["promotion"]["from"] == before and moved["champion"] != before
        truthful_status()
        every_image_found()

    assert reader.answers > 20 and not reader.failures, reader.failures[:5]


def test_a_killed_backfill_resumes_and_loses_nothing(crash_params, tmp_path):
    """A compatible promotion's backfill killed after a committed batch (inside `mnemo retrain`), then
    killed again before committing one and after one (inside `mnemo backfill`): the live table answers
    throughout, status says how many rows are still the older model's, and the next retrain finishes
    the job before anything else."""
    params = with_overrides(
        crash_params,
        {"compat.mode": "bct", "compat.backfill_rows": 8, "gate.min_compat_gain": -1.0},  # the path under test
    )
    ws = resolve_workspace(params)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = os.environ | {"PREFECT_API_URL": str(get_current_settings().api.url)}
    for k in range(2):
        write_arrival(ws.inbox, f"arrival-{k}", [f"a{k}c{i}" for i in range(CLASSES_PER_ARRIVAL)], 8, seed=k)
    assert retrain(params, str(ws.root)).status == "promoted"
    write_arrival(ws.inbox, "arrival-2", [f"a2c{i}" for i in range(CLASSES_PER_ARRIVAL)], 8, seed=2)

    def mnemo(*args: str) -> dict:
        result = runner.invoke(app, [*args, "--json", "--workspace", str(ws.root), "--params", str(params_file)])
        assert result.exit_code == 0, (result.exception, result.output[-3000:])
        return json.loads(result.stdout)

    def killed(point: str, *args: str) -> None:
        command = [sys.executable, "-m", "flows.cli", *args, "--workspace", str(ws.root), "--params", str(params_file)]
        done = subprocess.run(
            command, cwd=REPO, env=env | {FAILPOINT: point}, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == -9, f"{point}: not killed ({done.returncode}): {done.stderr[-2000:]}"

    first = Catalog.load(ws.catalog).records()[0]
    with Reader(ws, params, ws.classes_dir / first.id) as reader:
        reader.within = 10  # a compatible table answers with the older model's vectors until backfilled
        killed("backfill-batch-committed", "retrain")
        status = mnemo("status")["champion"]
        rows = len(Catalog.load(ws.catalog).records())
        assert (status["version"], status["compatible_from"]) == ("2", "1")
        assert status["table_rows"] == rows and 0 < status["older_rows"] < rows - 8  # one batch landed
        left = status["older_rows"]
        killed("backfill-embed", "backfill")  # before its first commit: nothing changes
        assert mnemo("status")["champion"]["older_rows"] == left
        killed("backfill-batch-committed", "backfill")  # one more batch landed
        assert mnemo("status")["champion"]["older_rows"] == left - 8
        resumed = mnemo("retrain")  # nothing new: it finishes the backfill before anything else
        assert resumed["status"] == "nothing_new", resumed
        assert mnemo("status")["champion"]["older_rows"] == 0
        done = mnemo("backfill")  # and a backfill by hand finds nothing left
        assert done["finished"] and done["done"] == 0 and done["remaining"] == 0
    assert reader.answers > 20 and not reader.failures, reader.failures[:5]
    status = mnemo("status")["champion"]
    assert (status["older_rows"], status["table_rows"], status["missing_rows"]) == (0, rows, 0)
    tbl = connect(ws).open_table(status["table"])
    assert set(tbl.to_arrow()["embedded_by"].to_pylist()) == {"2"}
    pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=60).current()
    records = Catalog.load(ws.catalog).records()
    hits = pair.query([open_rgb(ws.classes_dir / r.id) for r in records], 1)
    assert [h[0]["id"] for h in hits] == [r.id for r in records]  # every stored image finds itself, by v2
