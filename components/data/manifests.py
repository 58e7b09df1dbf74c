"""The catalog's manifest chain: data/arrivals/NNNNNN.json, one per recorded arrival, each the rows
that arrival added or changed. Written once, never rewritten; DVC versions them with data/classes,
and the SQLite catalog (components/data/catalog.py) is derived from them.

The chain is numbered from 000001 without a gap, and each manifest's hash is chained over the ones
before it, so a hash names a whole history. The files are listed and read here and only here, and
trusted only whole: a gap in the numbers or a manifest that is not the rows it should hold raises
ManifestDamaged, so nothing builds a smaller catalog from what is left or numbers a new manifest
into the gap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

MANIFESTS = "arrivals"  # beside the database: data/arrivals/
SECTIONS = {"arrivals": (), "classes": ("arrival", "split"), "images": ("class", "arrival", "role")}  # row fields
_NAME = re.compile(r"\d{6,}\.json")
RESTORE = "restore it with `dvc checkout` (DVC keeps every manifest) or from a copy of the workspace"


class ManifestDamaged(RuntimeError):
    """A manifest of the chain is missing or damaged: the message (one line) names it and how to restore it."""


def manifest_name(n: int) -> str:
    return f"{n:06d}.json"


def manifest_files(folder: Path) -> list[tuple[str, int]]:
    """(name, size) of each manifest in `folder`, in chain order (000001.json, 000002.json, ...)."""
    if not folder.is_dir():
        return []
    found = sorted((int(p.name.split(".")[0]), p) for p in folder.iterdir() if _NAME.fullmatch(p.name))
    listing = []
    for n, (number, path) in enumerate(found, start=1):
        if number != n:
            raise ManifestDamaged(f"{folder / manifest_name(n)}: manifest missing ({path.name} is there); {RESTORE}")
        listing.append((path.name, path.stat().st_size))
    return listing


def read_manifest(folder: Path, name: str) -> tuple[str, dict[str, Any]]:
    """A manifest's text (what its chain hash is over) and its rows by section."""
    path = folder / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestDamaged(f"{path}: manifest missing; {RESTORE}") from None
    except UnicodeDecodeError:
        raise ManifestDamaged(f"{path}: manifest damaged (not UTF-8 text); {RESTORE}") from None
    try:
        delta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestDamaged(f"{path}: manifest damaged (not valid JSON: {exc}); {RESTORE}") from None
    problem = _shape_problem(delta)
    if problem is not None:
        raise ManifestDamaged(f"{path}: manifest damaged ({problem}); {RESTORE}")
    return text, delta


def _shape_problem(delta: Any) -> str | None:
    """What makes this parsed manifest not a set of catalog rows, or None."""
    if not isinstance(delta, dict) or set(delta) != set(SECTIONS):
        return f"expected a JSON object with {', '.join(SECTIONS)}"
    for section, fields in SECTIONS.items():
        rows = delta[section]
        if not isinstance(rows, dict) or not all(isinstance(row, dict) for row in rows.values()):
            return f"{section}: expected an object of rows"
        if any(not isinstance(row.get(f), str) for row in rows.values() for f in fields):
            return f"{section}: every row needs {', '.join(fields)}"
    return None


def chain(previous: str, text: str) -> str:
    """The chain hash after a manifest with this text, given the one before it ("" for the first)."""
    return hashlib.sha256((previous + hashlib.sha256(text.encode()).hexdigest()).encode()).hexdigest()


def write_manifest(folder: Path, name: str, text: str) -> None:
    """Create the manifest whole or not at all (never half a file), failing if it exists: a manifest
    is written once; two writers racing for one number cannot overwrite each other."""
    path = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # FileExistsError when taken
    finally:
        Path(tmp).unlink(missing_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)  # the new name survives a power cut too
    finally:
        os.close(handle)
