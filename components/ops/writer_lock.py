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

import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from filelock import FileLock, Timeout

from components.workspace import Workspace

LOCK_FILE = ".writer.lock"  # under the workspace root
# A backfill (components/vectors/backfill.py) writes only rows of the live table, as catch-ups do, so
# it runs beside retrains and promotions; its own lock keeps it to one backfill per workspace.
BACKFILL_LOCK_FILE = ".backfill.lock"


class WorkspaceBusy(RuntimeError):
    """Another writer holds the workspace; the message names it."""


_guard = threading.Lock()  # taking or leaving the lock and writing its holder, one thread at a time


def holder(ws: Workspace, lock_file: str = LOCK_FILE) -> dict | None:
    """Who holds (or last held) the lock, as written by it: what, pid, host, since; None if never taken."""
    try:
        return json.loads((ws.root / lock_file).read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None


@contextmanager
def writer_lock(ws: Workspace, what: str, lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Hold the workspace's writer lock (or another of its locks: `lock_file`) for the block, or raise
    WorkspaceBusy naming the holder."""
    path = ws.root / lock_file
    with _guard:
        ws.root.mkdir(parents=True, exist_ok=True)
        # One lock object per file in this process, shared by its threads: nested steps of one writer
        # take it again; never a soft (marker-file) lock a crash would leave behind.
        lock = FileLock(path, thread_local=False, is_singleton=True, fallback_to_soft=False)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            raise WorkspaceBusy(_busy_message(ws, what, lock_file)) from None
        if lock.lock_counter == 1:  # taken now, not again: say who holds it
            since = datetime.now(UTC).isoformat(timespec="seconds")
            with open(path, "r+") as fh:
                fh.truncate()
                fh.write(json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": since}))
    try:
        yield
    finally:
        with _guard:
            lock.release()


def _busy_message(ws: Workspace, what: str, lock_file: str) -> str:
    found = holder(ws, lock_file) or {}
    who = (
        f"{found.get('what', 'another writer')} (pid {found.get('pid', '?')} on {found.get('host', '?')}, "
        f"since {found.get('since', '?')})"
    )
    return f"cannot {what}: workspace {ws.root} is being written by {who}; try again when it has finished"
