"""`mnemo serve` in its own process, as the benches start it (bench/index.py, bench/query.py)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(workspace: Path, params_file: Path, port: int, *extra: str) -> list[str]:
    """The command line of `mnemo serve` on 127.0.0.1:port over a workspace, with this interpreter."""
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "serve",
        "--port",
        str(port),
        "--workspace",
        str(workspace),
        "--params",
        str(params_file),
        *extra,
    ]


def service_env() -> dict[str, str]:
    """This environment without mnemo's and MLflow's variables: the workspace and params say it all."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MNEMO_", "MLFLOW_"))}
