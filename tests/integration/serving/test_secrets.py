"""A password in the tracking URI never reaches what mnemo prints, logs or returns: the CLI's
answers and errors, `mnemo status --json`, and the service's bodies (503 included).

MLflow runs on the local PostgreSQL (trust auth, so any password is accepted: the one in the
URI is a marker that must appear nowhere); skipped where there is none."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from components.serving.app import create_app
from components.serving.live import LiveIndex
from components.workspace import resolve_workspace
from flows.cli import app
from tests.conftest import REPO
from tests.integration.live_workspace import noise_png

SECRET = "pw-Secret-4711"


@pytest.fixture()
def secret_uri(monkeypatch):
    from tests.e2e.conftest import PG_HOST, PG_PORT, PG_USER, postgres_database

    with postgres_database() as name:
        uri = f"postgresql+psycopg2://{PG_USER}:{SECRET}@{PG_HOST}:{PG_PORT}/{name}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def test_no_output_carries_the_password(secret_uri, params, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    ws = resolve_workspace(params)
    assert ws.tracking_uri == secret_uri
    common = ["--workspace", str(ws.root), "--params", str(params_file)]
    image = tmp_path / "q.png"
    image.write_bytes(noise_png(np.random.default_rng(0)))

    outputs = []
    runner = CliRunner()
    for args, code in (
        (["status", "--json"], 0),
        (["status"], 0),
        (["query", str(image)], 1),
        (["promote", "7", "--reason", "x"], 2),
        (["rollback"], 1),
        (["reindex", "7"], 2),
    ):
        result = runner.invoke(app, [*args, *common])
        assert result.exit_code == code, result.output
        outputs.append(result.output)
    assert '"tracking_uri": "postgresql+psycopg2://postgres:***@' in outputs[0]
    assert "no champion model in postgresql+psycopg2://postgres:***@" in outputs[2]

    # The real CLI, errors and all, in its own process.
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "query", str(image), *common],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    outputs += [done.stdout, done.stderr]

    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=60)
    with TestClient(create_app(live, params.serve, params.ingest)) as client:
        for response in (
            client.get("/health"),
            client.get("/live"),
            client.post("/live/refresh"),
            client.post("/query", files=[("image", ("q.png", image.read_bytes(), "image/png"))]),
        ):
            assert response.status_code == 503
            outputs.append(response.text)
    outputs.append(caplog.text)

    leaked = [out for out in outputs if SECRET in out]
    assert not leaked, leaked[0][:2000]


def test_a_key_sent_in_the_query_string_is_refused_and_never_logged(live_ws, params_file, tmp_path):
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key, log = "k3y-Sent-Wrongly-0815", tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MNEMO_API_KEY": key}
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--workspace", str(live_ws.root), "--params", str(params_file)]
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.monotonic() + 120, None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/live?api_key={key}", timeout=5)
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.5)
        assert status == 401, log.read_text()  # the key is read from the Authorization header only
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert '"GET /live?<query dropped> HTTP/1.1" 401' in text, text
    assert key not in text
