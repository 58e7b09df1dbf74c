"""Real servers for the e2e tests: `prefect server start` (SQLite or PostgreSQL), `mlflow server`
(PostgreSQL backend store, local or S3 artifact root) and moto's S3 server, each on a free
127.0.0.1 port with its own state, started in its own process group and stopped by its process id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

BIN = Path(sys.executable).parent
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
START_TIMEOUT = 180  # seconds: server start-up on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any MLflow, Prefect API or mnemo pointers, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNEMO_", "PREFECT_"))}
    return env | extra


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A process in its own session (process group), output to `log`; stopped by pid on exit:
    SIGTERM to its group, then SIGKILL after 20 s."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:  # children the leader left behind (uvicorn workers, flow-run processes)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} before {url} answered:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{tail(log)}")


def psql(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on the local PostgreSQL (trust auth); dropped afterwards. Yields its name."""
    import psycopg2

    name = f"mnemo_e2e_{uuid.uuid4().hex[:12]}"
    try:
        psql(f"CREATE DATABASE {name}")
    except psycopg2.OperationalError as exc:
        missing = f"no PostgreSQL at {PG_HOST}:{PG_PORT} (user {PG_USER}, trust auth): {exc}".strip()
        if os.environ.get("CI"):  # CI's machines all run PostgreSQL: a skip there would hide a rotting suite
            pytest.fail(missing)
        pytest.skip(missing)
    try:
        yield name
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def prefect_server(database: str, root: Path) -> Iterator[str]:
    """`prefect server start` on a free port with PREFECT_HOME under root, on SQLite or PostgreSQL; yields the API URL."""
    with postgres_database() if database == "postgresql" else _no_database() as pg_name:
        url = (
            f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{pg_name}"
            if pg_name
            else f"sqlite+aiosqlite:///{root / 'prefect.db'}"
        )
        port = free_port()
        env = clean_env(
            PREFECT_HOME=str(root / "prefect-home"),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            # A queued (AwaitingConcurrencySlot) run is offered again after 2 s, not 30: the test waits less.
            PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2",
        )
        log = root / f"prefect-server-{database}.log"
        cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        with process(cmd, env, log) as proc:
            wait_healthy(f"http://127.0.0.1:{port}/api/health", proc, log)
            yield f"http://127.0.0.1:{port}/api"


@contextmanager
def _no_database() -> Iterator[None]:
    yield None


@contextmanager
def mlflow_server(root: Path, artifacts: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` on a free port: PostgreSQL backend store, artifacts proxied to `artifacts`
    (default: root/artifacts; an s3:// URI with the AWS_* variables in `env`); yields its URL."""
    with postgres_database() as pg_name:
        port = free_port()
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{pg_name}",
            "--artifacts-destination",
            artifacts or str(root / "artifacts"),
        ]
        log = root / "mlflow-server.log"
        with process(cmd, clean_env(**(env or {})), log) as proc:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, log)
            yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def params_file(params, tmp_path: Path) -> Path:
    """The shrunk params written out, for the subprocesses (which read params.yaml at their edge)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


S3_REGION = "us-east-1"


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point LanceDB (Lance's object_store) and boto3 (the MLflow server)
    at an S3-compatible endpoint; nothing mnemo-specific. Both read AWS_ENDPOINT_URL and
    AWS_DEFAULT_REGION; AWS_ALLOW_HTTP is Lance's own: it refuses an http:// endpoint without it."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "mnemo-e2e",
        "AWS_SECRET_ACCESS_KEY": "mnemo-e2e-secret",
        "AWS_DEFAULT_REGION": S3_REGION,
    }


@contextmanager
def s3_server(root: Path, buckets: tuple[str, ...]) -> Iterator[str]:
    """moto's S3-compatible server (`moto_server`, in memory) on a free port, with `buckets` created; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = root / "moto-server.log"
    with process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], clean_env(), log) as proc:
        wait_healthy(f"{endpoint}/moto-api/data.json", proc, log)
        s3 = s3_client(endpoint)
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield endpoint


def s3_client(endpoint: str) -> Any:  # boto3 generates its client classes at run time
    """A boto3 S3 client for the endpoint, with the credentials of s3_env."""
    import boto3

    env = s3_env(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_REGION,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
