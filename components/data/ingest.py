"""Ingest an arrival: validate every file, store good images under content-hash names,
quarantine the rest with a reason, and record the arrival in the catalog.

An arrival is a folder with one sub-folder per class (torchvision ImageFolder layout) and
an optional manifest.json. It is untrusted input, and a scheduled job reads it unattended:

- nothing outside it is read: the walk opens every folder and file relative to its parent
  with O_NOFOLLOW, so a symbolic link (to a file or a folder) is rejected with a reason and
  never followed, and a FIFO or device is never opened;
- an arrival is identified by its name and a fingerprint of its content (components/data/identity.py):
  the same content again is a no-op; other content under a name already recorded is a new arrival;
- every file or folder that cannot be read is in the report, and the arrival is recorded as
  incomplete and left in place, so an ingest after the fix picks the rest up (its content,
  hence its fingerprint, has changed);
- the same bytes under two classes is a label conflict: the second is rejected;
- images take their roles by components/data/roles.py; a class with a single image is stored
  as `pending` with a warning;
- an arrival that stores nothing new is not recorded (the sender can fix it and send it again);
- a workspace that cannot be written (read-only, full) fails with one IngestError naming
  the path, and what this ingest had written is removed: an image is in data/classes and in
  the catalog, or in neither (components/data/store.py); rejected files are copied to quarantine
  (components/data/quarantine.py).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from components.config import IMAGE_EXTENSIONS, IngestParams
from components.data.catalog import Catalog
from components.data.identity import identify
from components.data.quarantine import quarantine_folder, quarantine_path, write_reasons
from components.data.roles import assign_roles
from components.data.store import IngestError, Writes, write_error
from components.data.validation import validate_image
from components.data.walk import (
    DIR_FLAGS,
    Changed,
    Entry,
    content_fingerprint,
    open_file,
    opened,
    parent_fd,
    prune,
    read_again,
    read_problem,
    scan,
)
from components.ops.failpoints import failpoint
from components.workspace import Workspace

MANIFEST = "manifest.json"  # an arrival's optional description, kept in its catalog record


IngestStatus = Literal["ingested", "already_ingested", "nothing_stored"]


@dataclass(frozen=True)
class Rejected:
    file: str  # path relative to the arrival folder
    reason: str
    quarantined_as: str | None = None  # relative to quarantine/<arrival>/; None: the bytes were not copied


@dataclass
class IngestReport:
    arrival: str  # the arrival id: the folder name, or <name>~<fingerprint> when the name was taken
    status: IngestStatus
    folder: str = ""  # the arrival folder's name
    identity: str = ""  # "new" | "same_content" (a no-op) | "changed_content" (other content, name taken)
    fingerprint: str = ""
    complete: bool = True  # False: some files could not be read; they stay in place for a later ingest
    unreadable: list[str] = field(default_factory=list)  # what could not be read (or changed while read)
    new_classes: list[str] = field(default_factory=list)
    unseen_classes: list[str] = field(default_factory=list)
    pending_classes: list[str] = field(default_factory=list)  # one image so far: kept out of training
    stored: int = 0
    duplicates: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        incomplete = "" if self.complete else " (incomplete: some files could not be read)"
        return (
            f"{self.arrival}: {self.status}{incomplete}, {self.stored} stored, {len(self.rejected)} rejected, "
            f"{len(self.new_classes)} new classes"
        )


def _path_problem(parts: tuple[str, ...]) -> str | None:
    """Why a file at this relative path cannot be an image of a class, or None."""
    if len(parts) < 2:
        return "not inside a class folder"
    name = parts[0]
    if name.startswith("."):
        return "inside a hidden folder, not a class folder"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "class folder name is not valid UTF-8"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "class folder name contains a control character"
    if any(part.startswith(".") for part in parts[1:]):
        return "hidden file or folder (name starts with '.'), not taken as an image"
    return None


# -- ingest ----------------------------------------------------------------------------------


def ingest_arrival(
    arrival_dir: Path, ws: Workspace, params: IngestParams, *, remove_source: bool = False
) -> IngestReport:
    """Validate and store one arrival. With remove_source, what was stored, quarantined or is a
    link is deleted from the arrival once recorded (unread and unreadable files stay)."""
    arrival_dir = Path(arrival_dir)
    name = arrival_dir.name
    try:
        root_fd = os.open(arrival_dir, DIR_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and arrival_dir.is_symlink()):
            raise FileNotFoundError(
                f"{arrival_dir}: the arrival folder is a symbolic link; links are not followed"
            ) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(f"{arrival_dir}: arrival folder does not exist") from None
        raise IngestError(f"{arrival_dir}: cannot read the arrival folder ({exc.strerror})") from None
    with opened(root_fd):
        return _ingest(root_fd, arrival_dir, name, ws, params, remove_source)


def _ingest(
    root_fd: int, arrival_dir: Path, name: str, ws: Workspace, params: IngestParams, remove_source: bool
) -> IngestReport:
    entries, empty = scan(root_fd, params.max_file_bytes)
    fingerprint = content_fingerprint(entries)
    catalog = Catalog.load(ws.catalog)
    arrival, identity = identify(name, fingerprint, catalog)
    report = IngestReport(arrival=arrival, status="ingested", folder=name, identity=identity, fingerprint=fingerprint)
    if identity == "same_content":
        report.status = "already_ingested"
        before = catalog.arrivals[arrival]
        if before.get("complete", True) is False:
            report.complete = False
            report.unreadable = list(before.get("unreadable", []))
            report.warnings.append(
                f"{arrival_dir}: recorded as incomplete, {len(report.unreadable)} file(s) or folder(s) "
                "could not be read; fix their permissions and ingest again to store them"
            )
        return report
    if identity == "changed_content":
        report.warnings.append(
            f"{arrival_dir}: an arrival named {name!r} with other content was ingested before; "
            f"this one is recorded as {arrival}"
        )
    report.warnings += [f"empty folder {rel}: nothing in it to ingest" for rel in empty]

    quarantine = quarantine_folder(ws, arrival)
    writes = Writes()
    try:
        stored_by_class, processed = _process(root_fd, entries, ws, params, catalog, report, quarantine, writes)
        if report.rejected:
            write_reasons(writes, quarantine, [r.__dict__ for r in report.rejected])
        recorded = _record(
            arrival,
            name,
            fingerprint,
            _read_manifest(root_fd, arrival_dir, report),
            stored_by_class,
            catalog,
            report,
            params,
        )
        if recorded:
            try:
                catalog.save()
            except OSError as exc:
                raise write_error(catalog.path, exc) from None
            failpoint("arrival-recorded")  # stored and recorded, not yet in any table
    except BaseException:
        writes.undo()
        raise
    if remove_source:
        _remove_processed(root_fd, arrival_dir, processed, entries, report)
    return report


def _process(
    root_fd: int,
    entries: list[Entry],
    ws: Workspace,
    params: IngestParams,
    catalog: Catalog,
    report: IngestReport,
    quarantine: Path,
    writes: Writes,
) -> tuple[dict[str, list[str]], list[tuple[str, ...]]]:
    """Store or quarantine each scanned file: (image ids stored per class, paths done with)."""
    stored_by_class: dict[str, list[str]] = {}
    processed: list[tuple[str, ...]] = []  # stored, quarantined or a duplicate: safe to delete
    by_hash: dict[
        str, str
    ] = {}  # content hash -> class, for this arrival's images (the catalog answers for stored ones)
    first_seen: dict[str, str] = {}  # content hash -> file of this arrival that brought it

    def reject(entry: Entry, reason: str, data: bytes | None) -> None:
        copy = None
        if data is not None:
            copy = quarantine_path(entry.parts)
            writes.write(quarantine / copy, data, sync=False)
            processed.append(entry.parts)
        report.rejected.append(Rejected(file=entry.rel, reason=reason, quarantined_as=copy))

    def left_unread(entry: Entry) -> None:  # a later ingest, once it is readable or complete, stores it
        report.complete = False
        report.unreadable.append(entry.rel)

    for entry in entries:
        if entry.kind != "file":
            assert entry.problem is not None
            if entry.kind == "unreadable":
                left_unread(entry)
            why = entry.problem
            if entry.kind == "link":
                why += "; not copied"
                processed.append(entry.parts)  # deleting a link leaves its target alone
            elif entry.kind == "special":
                why += "; left in place, not copied"
            reject(entry, why, None)
            continue
        if entry.parts == (MANIFEST,):
            processed.append(entry.parts)
            continue
        try:
            data = read_again(root_fd, entry, params.max_file_bytes)
        except Changed as exc:
            left_unread(entry)
            reject(entry, f"changed during ingest ({exc}); left in place, ingest again once it is complete", None)
            continue
        except OSError as exc:
            kind, problem = read_problem(exc, "file")
            if kind == "unreadable":
                left_unread(entry)
            reject(entry, problem, None)
            continue
        reason = _path_problem(entry.parts)
        fmt = None
        if reason is None:
            fmt, reason = validate_image(data, params)
        if reason is not None:
            reject(entry, reason, data)
            continue
        assert fmt is not None and entry.digest is not None  # a file without a reason was read and identified
        cls, content = entry.parts[0], entry.digest[:32]
        other = by_hash.get(content) or catalog.class_of_hash(content)
        if other is not None and other != cls:
            where = first_seen.get(content, f"the stored image {other}/{content}")
            reject(
                entry,
                f"label conflict: the same bytes as {where} in class {other!r}, here in class {cls!r}; "
                "kept under the first class only",
                data,
            )
            continue
        image_id = f"{cls}/{content}.{IMAGE_EXTENSIONS[fmt]}"
        processed.append(entry.parts)
        if image_id in catalog.images or image_id in stored_by_class.get(cls, []):
            report.duplicates += 1
            continue
        dest = ws.classes_dir / image_id
        if not dest.exists():
            writes.write(dest, data, sync=True)
        stored_by_class.setdefault(cls, []).append(image_id)
        by_hash[content] = cls
        first_seen[content] = entry.rel
        report.stored += 1
    return stored_by_class, processed


def _record(
    arrival: str,
    name: str,
    fingerprint: str,
    manifest: dict | None,
    stored_by_class: dict[str, list[str]],
    catalog: Catalog,
    report: IngestReport,
    params: IngestParams,
) -> bool:
    """Classes, roles and the arrival into the catalog (in memory); False when nothing new was stored."""
    if not stored_by_class:
        report.status = "nothing_stored"
        if not report.complete:
            why = "some files or folders could not be read"
        elif report.duplicates:
            why = f"{report.duplicates} already stored"
        else:
            why = "no class folder with a good image"
        report.warnings.append(
            f"{name}: no image was stored ({why}); the arrival is not recorded, "
            "so a corrected one under the same name is ingested"
        )
        return False
    assigned = assign_roles(catalog, arrival, stored_by_class, params)
    report.new_classes, report.unseen_classes, report.pending_classes = assigned.new, assigned.unseen, assigned.pending
    for cls in assigned.pending:
        report.warnings.append(
            f"class {cls!r} has a single image: stored and queryable, kept out of training and evaluation "
            "until an arrival brings a second"
        )
    catalog.arrivals[arrival] = {
        "name": name,
        "fingerprint": fingerprint,
        "complete": report.complete,
        "unreadable": report.unreadable,
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": sorted(stored_by_class),
        "stored": report.stored,
        "duplicates": report.duplicates,
        "quarantined": len(report.rejected),
        "manifest": manifest,
    }
    if not report.complete:
        report.warnings.append(
            f"{name}: {len(report.unreadable)} file(s) or folder(s) could not be read and were left in place; "
            "fix them and ingest the folder again to store them"
        )
    return True


def _remove_processed(
    root_fd: int, arrival_dir: Path, processed: list[tuple[str, ...]], entries: list[Entry], report: IngestReport
) -> None:
    """Delete what was stored or quarantined; what was not copied, or landed meanwhile, stays, with a warning."""
    for parts in processed:
        try:
            with parent_fd(root_fd, parts) as dir_fd:
                os.unlink(parts[-1], dir_fd=dir_fd)
        except OSError:
            pass  # gone already, or its folder became unreadable: it is reported below as left
    left = prune(root_fd, ())
    scanned_left = {e.parts for e in entries if e.kind != "vanished"} - set(processed)
    kept = [p for p in left if p in scanned_left or any(p[: len(q)] == q for q in scanned_left)]
    new = [p for p in left if p not in kept]
    if kept:
        report.warnings.append(
            f"{arrival_dir}: {len(kept)} file(s) or folder(s) that were not copied (special, oversized, "
            "unreadable or changing files) were left there"
        )
    if new:
        report.warnings.append(
            f"{arrival_dir}: {len(new)} file(s) arrived during ingest and were left there; "
            "move them into a new arrival folder"
        )
    if not left:
        try:
            arrival_dir.rmdir()
        except OSError:
            pass  # something landed after the prune: it is ingested with the folder next time


def _read_manifest(root_fd: int, arrival_dir: Path, report: IngestReport) -> dict | None:
    path = arrival_dir / MANIFEST
    try:
        fd = open_file(root_fd, MANIFEST)
    except FileNotFoundError:
        return None
    except OSError as exc:
        report.warnings.append(f"{path}: manifest ignored, cannot read it ({exc.strerror})")
        return None
    with opened(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            report.warnings.append(f"{path}: manifest ignored, not a regular file")
            return None
        raw = os.read(fd, 1 << 20)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.warnings.append(f"{path}: manifest ignored, not valid JSON ({exc})")
        return None
    if not isinstance(manifest, dict):
        report.warnings.append(f"{path}: manifest ignored, expected a JSON object")
        return None
    return manifest
