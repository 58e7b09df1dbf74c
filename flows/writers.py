"""The writer's hold on a workspace, as the flows take it.

Every flow that writes (retrain, rollback) holds the workspace's writer lock
(components/ops/writer_lock.py), a file lock that covers one machine. Where several machines
share a workspace (MLflow and LanceDB on servers), set MNEMO_WRITER_LIMIT to the name of a
Prefect global concurrency limit of 1 (`prefect gcl create mnemo-writer --limit 1`): the
flows then also hold a slot of it, so writers on different machines take turns too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

from components.ops.writer_lock import writer_lock
from components.workspace import Workspace, settings


@contextmanager
def workspace_writer(ws: Workspace, what: str) -> Iterator[None]:
    """Hold the workspace for one writer: the file lock, and the global concurrency limit when one is named."""
    with writer_lock(ws, what):
        name = settings().writer_limit
        if not name:
            yield
            return
        with concurrency(name, occupy=1, strict=True):  # strict: a limit named but missing is an error
            yield
