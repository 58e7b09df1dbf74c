"""Where an arrival's rejected files go: quarantine/<arrival>/, each under its path in the arrival
(made printable and short enough for the file system), beside reasons.json, the reason for each."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from components.data.store import Writes
from components.data.walk import printable
from components.workspace import Workspace

REASONS = "reasons.json"  # in quarantine/<arrival>/
NAME_BYTES = 255  # the usual file-name limit: an escaped (longer) quarantine name is shortened


def safe_name(name: str) -> str:
    """A printable file name that fits the file system, unique for each original name."""
    if len(name.encode("utf-8", "surrogateescape")) <= NAME_BYTES:
        return name
    stem, dot, ext = name.rpartition(".")
    ext = dot + ext if dot and len(ext) <= 10 else ""
    short = name.encode("utf-8", "surrogateescape")[: NAME_BYTES - 40].decode("utf-8", "ignore")
    return f"{short}~{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}{ext}"


def quarantine_folder(ws: Workspace, arrival: str) -> Path:
    return ws.quarantine / safe_name(arrival)


def quarantine_path(parts: tuple[str, ...]) -> str:
    """Where a rejected file at this relative path is kept, relative to its arrival's quarantine folder."""
    names = [safe_name(printable((p,))) for p in parts]
    if names == [REASONS]:
        names = [REASONS + ".quarantined"]
    return "/".join(names)


def write_reasons(writes: Writes, folder: Path, rejected: list[dict[str, Any]]) -> None:
    """reasons.json: every rejected file of the arrival with its reason and where its copy is."""
    writes.write(folder / REASONS, json.dumps(rejected, indent=1, ensure_ascii=False).encode(), sync=False)
