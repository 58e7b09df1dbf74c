"""Ingest every pending inbox arrival, one process at a time.

The scheduled inbox scan, a retrain and `mnemo ingest` may all reach the inbox at the same
moment. The class registry is one JSON file rewritten whole, and ingest moves arrivals out
of the inbox, so two of them at once could lose an arrival's record or ingest a folder the
other just removed. A file lock in the workspace makes them take turns.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

from components.config import IngestParams
from components.data.ingest import IngestError, IngestReport, ingest_arrival, pending_arrivals
from components.workspace import Workspace

LOCK_FILE = ".ingest.lock"  # under the workspace root


@contextmanager
def inbox_lock(ws: Workspace) -> Iterator[None]:
    """Hold the workspace's ingest lock (blocking) for the duration of the block."""
    try:
        ws.root.mkdir(parents=True, exist_ok=True)
        handle = open(ws.root / LOCK_FILE, "a")  # closed below, after the lock is released
    except OSError as exc:
        raise IngestError(
            f"{ws.root / LOCK_FILE}: cannot open the ingest lock ({exc.strerror}); nothing was ingested"
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ingest_inbox(ws: Workspace, params: IngestParams) -> list[IngestReport]:
    """Validate, store and record every arrival waiting in the inbox, removing each once recorded."""
    with inbox_lock(ws):  # listed under the lock too: another holder may just have taken an arrival
        return [ingest_arrival(path, ws, params, remove_source=True) for path in pending_arrivals(ws, params)]
