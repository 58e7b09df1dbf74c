"""The live pair under stress: promotions and rollbacks under query load, a re-index killed
mid-write, a read-only LanceDB directory. Real uvicorn, LanceDB and MLflow in tmp_path."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from components.config import with_overrides
from components.data.catalog import Catalog
from components.data.transforms import open_rgb
from components.registry.mlflow_registry import ModelRegistry
from components.registry.promotion import Promoter
from components.serving.app import create_app
from components.serving.live import LiveIndex
from components.vectors.tables import connect, is_validated, list_tables
from tests.integration.live_workspace import assert_one_version, reference, serving

REPO = Path(__file__).resolve().parents[2]  # tests/integration/<file>


def test_queries_stay_consistent_while_the_champion_is_promoted_and_rolled_back(live_ws, params):
    records = Catalog.load(live_ws.catalog).records()[::6]
    images = [(live_ws.classes_dir / r.id).read_bytes() for r in records]
    expected = {v: reference(live_ws, params, v, images) for v in ("1", "2")}
    promoter = Promoter(live_ws, params.registry, params.index)
    live = LiveIndex(live_ws, params.registry, params.index, refresh_seconds=0.05)
    answers: list[tuple[int, int, dict]] = []
    failures: list[str] = []
    stop = threading.Event()

    def ask(url: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                i = rng.randrange(len(images))
                try:
                    r = client.post("/query", files=[("image", ("q.png", images[i], "image/png"))], data={"k": "5"})
                    answers.append((i, r.status_code, r.json()))
                except Exception as exc:  # a failed query is the finding, whatever its kind
                    failures.append(repr(exc))

    def served(url: str, version: str) -> None:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/live").json()["model_version"] != version:
            assert time.monotonic() < deadline, f"the service never moved to v{version}"
            time.sleep(0.02)
        time.sleep(0.3)  # queries on this version for a while

    with serving(create_app(live, params.serve, params.ingest)) as url:
        threads = [threading.Thread(target=ask, args=(url, seed)) for seed in range(3)]
        for t in threads:
            t.start()
        try:
            served(url, "1")
            for _ in range(5):
                promoter.promote("2", reason="reliability test")
                served(url, "2")
                promoter.rollback(reason="reliability test")
                served(url, "1")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)

    assert not failures
    assert [code for _, code, _ in answers if code != 200] == []
    per_version = {v: sum(body["model_version"] == v for _, _, body in answers) for v in ("1", "2")}
    assert min(per_version.values()) >= 10, per_version
    for i, _, body in answers:
        assert_one_version(body["model_version"], body["table"], body["results"][0], i, records[i].id, expected)


def reindex_command(ws, params_file: Path, version: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "reindex",
        version,
        "--params",
        str(params_file),
        "--workspace",
        str(ws.root),
    ]


def write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def answers_with_v1(ws, params) -> None:
    record = Catalog.load(ws.catalog).records()[7]
    pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=60).current()
    [hits] = pair.query([open_rgb(ws.classes_dir / record.id)], 1)
    assert (pair.version, pair.table_name, hits[0]["id"]) == ("1", "embeddings_v1", record.id)


@pytest.mark.slow  # a fresh python process imports torch, MLflow and LanceDB
def test_a_reindex_killed_mid_write_leaves_the_live_pair_and_the_next_one_cleans_up(live_ws, params, tmp_path):
    db = connect(live_ws)
    db.drop_table("embeddings_v2")  # v2 is indexed afresh
    one_row_at_a_time = with_overrides(params, {"index.write_rows": 1, "index.batch_size": 1})
    command = reindex_command(live_ws, write_params(one_row_at_a_time, tmp_path / "slow.yaml"), "2")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    data = Path(live_ws.lancedb_uri) / "embeddings_v2.lance" / "data"
    deadline = time.monotonic() + 240
    while not (data.is_dir() and len(list(data.iterdir())) >= 3):  # a few rows committed, more to come
        assert proc.poll() is None, f"re-index ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "re-index never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    orphan = db.open_table("embeddings_v2")
    assert not is_validated(orphan) and 0 < orphan.count_rows() < 60
    assert ModelRegistry(live_ws, params.registry).champion().version == "1"
    answers_with_v1(live_ws, params)

    built = Promoter(live_ws, params.registry, params.index).reindex("2")
    assert (built.rows, built.probes_ok, built.reused) == (60, True, False)
    rebuilt = connect(live_ws).open_table("embeddings_v2")
    assert is_validated(rebuilt) and rebuilt.count_rows() == 60 and len(rebuilt.list_versions()) == 1
    assert sorted(list_tables(connect(live_ws))) == ["embeddings_v1", "embeddings_v2"]


def _honour_file_modes() -> None:
    """In the child: root without CAP_DAC_OVERRIDE, so a read-only directory is read-only to it too."""
    if os.geteuid() == 0:
        pr_capbset_drop, cap_dac_override = 24, 1
        if ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


@pytest.mark.slow  # a fresh python process imports torch, MLflow and LanceDB
def test_a_read_only_lancedb_directory_fails_the_reindex_before_the_alias_moves(live_ws, params, tmp_path):
    connect(live_ws).drop_table("embeddings_v2")
    lancedb_dir = Path(live_ws.lancedb_uri)
    lancedb_dir.chmod(0o555)
    try:
        proc = subprocess.run(
            reindex_command(live_ws, write_params(params, tmp_path / "p.yaml"), "2"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_honour_file_modes,
        )
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot make a directory read-only for this process: {exc}")
    finally:
        lancedb_dir.chmod(0o755)

    assert proc.returncode == 1, proc.stderr
    assert f"LanceDB directory {lancedb_dir} is not writable (Permission denied)" in proc.stderr
    assert "live pair is unchanged" in proc.stderr
    assert ModelRegistry(live_ws, params.registry).champion().version == "1"
    assert "embeddings_v2" not in list_tables(connect(live_ws))
    answers_with_v1(live_ws, params)


def test_serve_with_two_workers_answers_from_each_and_both_follow_a_promotion(live_ws, params, tmp_path):
    """`mnemo serve --workers 2`: two processes, each resolving the alias on its own; after a
    promotion every answer, whichever worker gives it, comes from the new pair."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params_file = write_params(with_overrides(params, {"serve.refresh_seconds": 0.1}), tmp_path / "params.yaml")
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNEMO_", "MLFLOW_"))}
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--workers", "2", "--port", str(port)]
    server = subprocess.Popen(
        [*cmd, "--workspace", str(live_ws.root), "--params", str(params_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    image = (live_ws.classes_dir / Catalog.load(live_ws.catalog).records()[3].id).read_bytes()

    def versions(n: int) -> set[str]:
        seen = set()
        for _ in range(n):
            with httpx.Client(base_url=url, timeout=60) as client:  # a new connection: either worker may take it
                r = client.post("/query", files=[("image", ("q.png", image, "image/png"))], data={"k": "1"})
                assert r.status_code == 200, r.text
                seen.add(r.json()["model_version"])
        return seen

    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "mnemo serve --workers 2 never became healthy"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert versions(6) == {"1"}
        Promoter(live_ws, params.registry, params.index).promote("2", reason="two workers")
        deadline = time.monotonic() + 60  # each worker's refresher (0.1 s) loads v2 on its own
        while versions(10) != {"2"}:
            assert time.monotonic() < deadline, "a worker kept answering with v1 after the promotion"
    finally:
        server.terminate()
        server.wait(timeout=60)
    started = {
        line.split("[")[1].split("]")[0] for line in log.read_text().splitlines() if "Started server process" in line
    }
    assert len(started) == 2, log.read_text()[-3000:]
    assert "MNEMO_API_KEY is not set: the service and its page" in log.read_text()  # said at start
