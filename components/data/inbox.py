"""Ingest every pending inbox arrival, one process at a time.

The scheduled inbox scan, a retrain and `mnemo ingest` may all reach the inbox at the same
moment. Ingest moves arrivals out of the inbox and numbers the catalog's manifests, so two
of them at once could ingest a folder the other just removed. A file lock in the workspace
makes them take turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock

from components.config import IngestParams
from components.data.identity import pending_arrivals
from components.data.ingest import IngestReport, ingest_arrival
from components.data.store import IngestError
from components.workspace import Workspace

LOCK_FILE = ".ingest.lock"  # under the workspace root


@contextmanager
def inbox_lock(ws: Workspace) -> Iterator[None]:
    """Hold the workspace's ingest lock (blocking) for the duration of the block."""
    path = ws.root / LOCK_FILE
    try:
        ws.root.mkdir(parents=True, exist_ok=True)
        # waits for whoever holds it, in this process or another; fails (never a marker-file lock) where
        # the file system has no flock
        lock = FileLock(path, fallback_to_soft=False).acquire()
    except OSError as exc:
        raise IngestError(f"{path}: cannot open the ingest lock ({exc.strerror}); nothing was ingested") from None
    with lock:
        yield


def ingest_inbox(ws: Workspace, params: IngestParams) -> list[IngestReport]:
    """Validate, store and record every arrival waiting in the inbox, removing each once recorded."""
    with inbox_lock(ws):  # listed under the lock too: another holder may just have taken an arrival
        return [ingest_arrival(path, ws, params, remove_source=True) for path in pending_arrivals(ws, params)]
