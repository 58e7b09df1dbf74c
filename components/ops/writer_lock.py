"""One writer at a time per workspace: retrain, re-index, promotion, rollback, the DVC stages.

Two builds at once could drop each other's unfinished table and share one checkpoint file;
the Prefect deployment's concurrency limit only covers runs it schedules, not `mnemo
retrain` or `dvc repro` started by hand. Every writer holds this lock, a file lock in the
workspace, so a second one is refused at once with a message naming the holder (what it
is, its pid and host, since when). Readers (queries, the service) never take it; ingest
takes its own lock (components/data/inbox.py), so arrivals keep landing during a retrain.

The lock is re-entrant within a process: the retrain flow holds it for the whole run and
the promotion it ends with takes it again. A file lock covers one machine: where several
machines share a workspace (LanceDB and MLflow on servers), give every writer the same
Prefect global concurrency limit instead (README, "One writer at a time").
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO

from components.workspace import Workspace

LOCK_FILE = ".writer.lock"  # under the workspace root


class WorkspaceBusy(RuntimeError):
    """Another writer holds the workspace; the message names it."""


_held: dict[str, tuple[IO[str], int]] = {}  # lock path -> (open handle, depth), for this process
_guard = threading.Lock()


def holder(ws: Workspace) -> dict | None:
    """Who holds (or last held) the lock, as written by it: what, pid, host, since; None if never taken."""
    try:
        return json.loads((ws.root / LOCK_FILE).read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None


@contextmanager
def writer_lock(ws: Workspace, what: str) -> Iterator[None]:
    """Hold the workspace's writer lock for the block, or raise WorkspaceBusy naming the holder."""
    path = str(ws.root / LOCK_FILE)
    with _guard:
        if path in _held:  # this process holds it already: one writer, nested steps
            handle, depth = _held[path]
            _held[path] = (handle, depth + 1)
        else:
            ws.root.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # held open for as long as the lock is
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise WorkspaceBusy(_busy_message(ws, what)) from None
            handle.seek(0)
            handle.truncate()
            since = datetime.now(UTC).isoformat(timespec="seconds")
            handle.write(json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": since}))
            handle.flush()
            _held[path] = (handle, 1)
    try:
        yield
    finally:
        with _guard:
            handle, depth = _held[path]
            if depth > 1:
                _held[path] = (handle, depth - 1)
            else:
                del _held[path]
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()


def _busy_message(ws: Workspace, what: str) -> str:
    found = holder(ws) or {}
    who = (
        f"{found.get('what', 'another writer')} (pid {found.get('pid', '?')} on {found.get('host', '?')}, "
        f"since {found.get('since', '?')})"
    )
    return f"cannot {what}: workspace {ws.root} is being written by {who}; try again when it has finished"
