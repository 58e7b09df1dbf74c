"""mnemo on object storage, by configuration alone: LanceDB tables on `s3://` (MNEMO_LANCEDB_URI) and
MLflow artifacts on S3 (an `mlflow server` on PostgreSQL whose artifact store is a bucket), against
moto's S3-compatible server on 127.0.0.1. The standard AWS_* variables point both at it.

The MLflow server proxies artifacts (`--artifacts-destination s3://...`): clients upload and
download through the server, so only the server holds S3 credentials for MLflow, and mnemo's
processes need them for LanceDB alone. That is the multi-machine set-up of infra/ (DESIGN.md,
"Beyond one machine"); `--default-artifact-root s3://... --no-serve-artifacts` would have every
client write to the bucket itself.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from components.config import Params, with_overrides
from components.data.catalog import Catalog
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.data.transforms import open_rgb
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex
from components.vectors.tables import connect, list_tables, table_schema
from components.workspace import resolve_workspace
from tests.e2e.conftest import BIN, clean_env, mlflow_server, s3_client, s3_env, s3_server
from tests.integration.live_workspace import assert_one_version, build_template, reference

pytestmark = pytest.mark.e2e

LANCE_BUCKET, MLFLOW_BUCKET = "lance", "mlflow"


@dataclass(frozen=True)
class Stack:
    """The servers every test here shares: one S3 endpoint and one MLflow server with its artifacts on it."""

    endpoint: str
    tracking_uri: str
    root: Path

    def env(self, lancedb_uri: str) -> dict[str, str]:
        """What a user exports to run mnemo on this stack: nothing beyond the documented variables."""
        return s3_env(self.endpoint) | {"MLFLOW_TRACKING_URI": self.tracking_uri, "MNEMO_LANCEDB_URI": lancedb_uri}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in the bucket under prefix."""
        pages = s3_client(self.endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("s3-stack")
    with s3_server(root, (LANCE_BUCKET, MLFLOW_BUCKET)) as endpoint:
        # The server alone talks to the artifact bucket: it gets the AWS variables, clients do not need them for MLflow.
        with mlflow_server(root, artifacts=f"s3://{MLFLOW_BUCKET}/artifacts", env=s3_env(endpoint)) as url:
            yield Stack(endpoint=endpoint, tracking_uri=url, root=root)


def lenient(params: Params, **overrides: Any) -> Params:
    # tiny data, one epoch: the second model may score below the first; the gate is not under test here
    return with_overrides(
        params, {"gate.max_unseen_recall_at_1_drop": 1.0, "gate.max_slice_forgetting": 1.0, **overrides}
    )


def test_ingest_retrain_query_and_rollback_keep_every_table_and_artifact_on_s3(stack, params, tmp_path):
    p = lenient(params)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    root = tmp_path / "ws"
    env = clean_env(
        **stack.env(f"s3://{LANCE_BUCKET}/pipeline"),
        MNEMO_WORKSPACE=str(root),
        MNEMO_PARAMS=str(params_file),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )

    def mnemo(*args: str) -> dict:
        """One `mnemo ... --json` as a user runs it; its JSON answer."""
        proc = subprocess.run(
            [str(BIN / "mnemo"), *args, "--json"], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"mnemo {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
        return json.loads(proc.stdout)

    fonts = discover_fonts()
    arrivals = stream_classes(fonts, p.demo)
    inbox = root / "inbox"

    write_arrival(inbox, 0, arrivals[0], fonts, p.demo)
    ingested = mnemo("ingest")
    assert ingested["arrivals"][0]["stored"] > 0 and ingested["hot_add"]["table"] is None  # no champion yet
    first = mnemo("retrain")
    assert (first["status"], first["version"], first["table"]) == ("promoted", "1", "embeddings_v1"), first["reasons"]

    write_arrival(inbox, 1, arrivals[1], fonts, p.demo)
    ingested = mnemo("ingest")
    stored = ingested["arrivals"][0]["stored"]
    # New images are appended to the live table on S3 at once (merge-insert, then compaction).
    assert (ingested["hot_add"]["table"], ingested["hot_add"]["added"]) == ("embeddings_v1", stored) and stored > 0
    second = mnemo("retrain")
    assert (second["status"], second["version"], second["table"]) == ("promoted", "2", "embeddings_v2"), second[
        "reasons"
    ]

    catalog = Catalog.load(root / "data" / "registry.json")
    image = catalog.records("query")[0]

    def query(version: str) -> None:
        answer = mnemo("query", str(root / "data" / "classes" / image.id), "--k", "3")
        assert (answer["model_version"], answer["table"]) == (version, f"embeddings_v{version}")
        [hits] = answer["results"]
        assert any(h["id"] == image.id and h["distance"] - hits[0]["distance"] <= 1e-6 for h in hits)  # finds itself

    query("2")
    assert mnemo("rollback", "--reason", "v2 answers badly")["champion"] == "1"
    status = mnemo("status")
    assert status["lancedb_uri"] == f"s3://{LANCE_BUCKET}/pipeline" and status["tracking_uri"] == stack.tracking_uri
    assert (status["champion"]["version"], status["champion"]["table"]) == ("1", "embeddings_v1")
    assert status["champion"]["table_rows"] == len(catalog.images)  # v1's table holds the hot-added images too
    assert [(e["kind"], e["to"]) for e in status["promotions"]] == [
        ("promote", "1"),
        ("promote", "2"),
        ("rollback", "1"),
    ]
    query("1")
    promoted = mnemo("promote", "2", "--reason", "fixed upstream")
    assert (promoted["champion"], promoted["table"], promoted["promotion"]["from"]) == ("2", "embeddings_v2", "1")

    # The data really is on S3: one Lance dataset per version (manifests and data files) ...
    lance_keys = stack.keys(LANCE_BUCKET, "pipeline/")
    for table in ("embeddings_v1", "embeddings_v2"):
        assert any(k.startswith(f"pipeline/{table}.lance/_versions/") and k.endswith(".manifest") for k in lance_keys)
        assert any(k.startswith(f"pipeline/{table}.lance/data/") for k in lance_keys)
    # ... the registered models and their continual-learning state in the artifact bucket ...
    mlflow_keys = stack.keys(MLFLOW_BUCKET, "artifacts/")
    assert sum(k.endswith("/MLmodel") for k in mlflow_keys) >= 2
    assert any("/continual/" in k for k in mlflow_keys)
    # ... and nowhere on the local disk: no LanceDB directory, no MLflow store or artifacts.
    assert not any((root / name).exists() for name in ("lancedb", "mlartifacts", "mlflow.db"))
    assert not (stack.root / "artifacts").exists()


def test_readers_see_no_errors_while_the_champion_moves_between_tables_on_s3(stack, params, monkeypatch):
    """In-process readers (the query service's LiveIndex) against S3 while promote and rollback alternate."""
    p = with_overrides(params, {"registry.model_name": "mnemo-live", "registry.experiment": "mnemo-live"})
    for key, value in stack.env(f"s3://{LANCE_BUCKET}/live").items():
        monkeypatch.setenv(key, value)
    ws = resolve_workspace(p)
    build_template(ws, p)  # 60 noise images; v1 and v2 with validated tables on S3; champion v1
    assert sorted(list_tables(connect(ws))) == ["embeddings_v1", "embeddings_v2"]

    records = Catalog.load(ws.catalog).records()[::6]
    images = [(ws.classes_dir / r.id).read_bytes() for r in records]
    expected = {v: reference(ws, p, v, images) for v in ("1", "2")}
    promoter = Promoter(ws, p.registry, p.index)
    live = LiveIndex(ws, p.registry, p.index, refresh_seconds=0.2)
    answers: list[tuple[int, str, str, list]] = []
    failures: list[str] = []
    stop = threading.Event()

    def ask(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(len(images))
            try:
                pair = live.current()  # once per request, as the service does
                answers.append((i, pair.version, pair.table_name, pair.query([open_rgb(images[i])], 5)[0]))
            except Exception as exc:  # any failed query is the finding
                failures.append(repr(exc))

    def served(version: str) -> None:
        deadline = time.monotonic() + 60
        while live.pair is None or live.pair.version != version:
            assert time.monotonic() < deadline, f"the readers never moved to v{version}"
            time.sleep(0.05)
        seen = len(answers)
        while len(answers) < seen + 6:  # a few answers on this version
            assert time.monotonic() < deadline and not failures, failures[:3]
            time.sleep(0.05)

    live.start()
    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    try:
        served("1")
        for _ in range(3):
            promoter.promote("2", reason="s3 reliability test")
            served("2")
            promoter.rollback(reason="s3 reliability test")
            served("1")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        live.stop()

    assert failures == []
    per_version = {v: sum(version == v for _, version, _, _ in answers) for v in ("1", "2")}
    assert min(per_version.values()) >= 10, per_version
    for i, version, table, hits in answers:
        assert_one_version(version, table, hits, i, records[i].id, expected)


def test_concurrent_writers_to_one_s3_table_lose_no_commit(stack, params, monkeypatch):
    """Lance commits a table version with a conditional put (If-None-Match); on a store without it,
    racing writers would overwrite each other's manifests and rows would vanish."""
    for key, value in stack.env(f"s3://{LANCE_BUCKET}/race").items():
        monkeypatch.setenv(key, value)
    ws = resolve_workspace(params)
    schema = table_schema(4)
    connect(ws).create_table("race", schema=schema)
    writers, commits = 3, 5
    errors: list[str] = []

    def write(w: int) -> None:
        tbl = connect(ws).open_table("race")  # a connection of its own, as another process would have
        for c in range(commits):
            row = {
                "id": f"{w}-{c}",
                "class": "x",
                "arrival": "a",
                "role": "train",
                "vector": [float(w), float(c), 0.0, 1.0],
            }
            try:
                tbl.add(pa.Table.from_pylist([row], schema=schema))
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    tbl = connect(ws).open_table("race")
    assert tbl.count_rows() == writers * commits
    assert len(tbl.list_versions()) == 1 + writers * commits  # the empty table, then one version per commit
