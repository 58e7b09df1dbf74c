"""An arrival's identity: its folder name and a fingerprint of its content (every relative path
and its SHA-256, components/data/walk.py). The same content again is the arrival already
recorded (a no-op); other content under a name already recorded is a new arrival, recorded as
`<name>~<fingerprint[:12]>`. Which inbox folders are pending follows from it.
"""

from __future__ import annotations

import os
from pathlib import Path

from components.config import IngestParams
from components.data.catalog import Catalog
from components.data.walk import DIR_FLAGS, content_fingerprint, opened, scan, stat_signature
from components.workspace import Workspace

_SEEN_MAX = 4096  # folders whose answer `pending_arrivals(..., cached=True)` remembers
_seen: dict[tuple, bool] = {}  # (folder, catalog version, size limit, stat signature) -> pending


def identify(name: str, fingerprint: str, catalog: Catalog) -> tuple[str, str]:
    """(arrival id, identity): the recorded arrival with this content ("same_content"), or the id a
    new one gets ("new", or "changed_content" when its name is taken)."""
    for arrival, meta in catalog.arrivals.items():
        if meta.get("fingerprint") == fingerprint and meta.get("name", arrival) == name:
            return arrival, "same_content"
    if name not in catalog.arrivals:
        return name, "new"
    return f"{name}~{fingerprint[:12]}", "changed_content"


def pending_arrivals(ws: Workspace, params: IngestParams | None = None, *, cached: bool = False) -> list[Path]:
    """Arrival folders in the inbox whose content the catalog has not recorded.

    Folders whose name is not recorded are pending without being read. With params, a folder
    under a recorded name is read and fingerprinted as ingest would (a fixed or different
    arrival under an old name is pending); without, a recorded name counts as ingested. With
    `cached` (status pages), such a folder is fingerprinted once: while the names, sizes and
    change times of everything in it and the catalog stay as they were, this process keeps the
    answer. Hidden folders and links in the inbox are not arrivals.
    """
    if not ws.inbox.is_dir():
        return []
    catalog = Catalog.load(ws.catalog)
    names = {meta.get("name", arrival) for arrival, meta in catalog.arrivals.items()}
    out = []
    for path in sorted(ws.inbox.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        if path.name in names and (params is None or not _pending(path, catalog, params, cached)):
            continue
        out.append(path)
    return out


def _pending(path: Path, catalog: Catalog, params: IngestParams, cached: bool) -> bool:
    """Whether the content of this folder (under a recorded name) is not recorded."""
    try:
        root_fd = os.open(path, DIR_FLAGS)
    except OSError:
        return True  # unreadable now: the ingest itself reports why
    with opened(root_fd):
        key = (str(path), catalog.version(), params.max_file_bytes, stat_signature(root_fd)) if cached else None
        if key is not None and key in _seen:
            return _seen[key]
        entries, _ = scan(root_fd, params.max_file_bytes)
    pending = identify(path.name, content_fingerprint(entries), catalog)[1] != "same_content"
    if key is not None:
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen[key] = pending
    return pending
