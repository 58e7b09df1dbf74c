"""Ingest an arrival: validate every file, store good images under content-hash names,
quarantine the rest with a reason, and record the arrival in the class registry.

An arrival is a folder with one sub-folder per class (torchvision ImageFolder layout) and
an optional manifest.json. It is untrusted input, and a scheduled job reads it unattended:

- nothing outside it is read: the walk opens every folder and file relative to its parent
  with O_NOFOLLOW, so a symbolic link (to a file or a folder) is rejected with a reason and
  never followed, and a FIFO or device is never opened;
- an arrival is identified by its name and a fingerprint of its content (every relative path
  and its SHA-256). The same content again is a no-op; other content under a name already
  recorded is a new arrival, recorded as `<name>~<fingerprint[:12]>`;
- every file or folder that cannot be read is in the report, and the arrival is recorded as
  incomplete and left in place, so an ingest after the fix picks the rest up (its content,
  hence its fingerprint, has changed);
- the same bytes under two classes is a label conflict: the second is rejected;
- a class with a single image is stored as `pending` (see class_registry) with a warning;
- an arrival that stores nothing new is not recorded (the sender can fix it and send it again);
- a workspace that cannot be written (read-only, full) fails with one IngestError naming
  the path, and what this ingest had written is removed: an image is in data/classes and in
  the registry, or in neither.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from components.config import IMAGE_EXTENSIONS, IngestParams
from components.data.catalog import Catalog
from components.data.validation import validate_image
from components.data.walk import (
    DIR_FLAGS,
    Changed,
    Entry,
    content_fingerprint,
    open_file,
    opened,
    parent_fd,
    printable,
    prune,
    read_again,
    read_problem,
    scan,
)
from components.workspace import Workspace

MANIFEST = "manifest.json"
REASONS = "reasons.json"  # in quarantine/<arrival>/
NAME_BYTES = 255  # the usual file-name limit: an escaped (longer) quarantine name is shortened


class IngestError(RuntimeError):
    """The workspace could not take the arrival (read-only, disk full): nothing of it was kept."""


@dataclass(frozen=True)
class Rejected:
    file: str  # path relative to the arrival folder
    reason: str
    quarantined_as: str | None = None  # relative to quarantine/<arrival>/; None: the bytes were not copied


@dataclass
class IngestReport:
    arrival: str  # the arrival id: the folder name, or <name>~<fingerprint> when the name was taken
    status: str  # "ingested" | "already_ingested" | "nothing_stored"
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


def _rank(seed: int, *parts: str) -> str:
    return hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).hexdigest()


def _held_out_share(items: list[str], fraction: float, seed: int, salt: str) -> set[str]:
    """A fixed, deterministic share of `items` (at least one, never all, when there are 2+)."""
    if len(items) < 2:
        return set()
    count = min(max(1, round(fraction * len(items))), len(items) - 1)
    return set(sorted(items, key=lambda item: _rank(seed, salt, item))[:count])


# -- writing into the workspace, all or nothing ----------------------------------------------


class _Writes:
    """Files and folders this ingest created, so a failure can take them all back."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.dirs: list[Path] = []

    def mkdirs(self, folder: Path) -> None:
        missing = []
        for parent in (folder, *folder.parents):
            if parent.is_dir():
                break
            missing.append(parent)
        for parent in reversed(missing):
            try:
                parent.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise _write_error(parent, exc) from None
            self.dirs.append(parent)

    def write(self, dest: Path, data: bytes, *, sync: bool) -> None:
        """dest is absent or complete, whatever happens (short temporary names: any dest name fits)."""
        self.mkdirs(dest.parent)
        try:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
        except OSError as exc:
            raise _write_error(dest.parent, exc) from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if sync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise _write_error(dest, exc) from None
        self.files.append(dest)

    def undo(self) -> None:
        for path in reversed(self.files):
            path.unlink(missing_ok=True)
        for folder in reversed(self.dirs):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: someone else's file is there now


def _write_error(path: Path, exc: OSError) -> IngestError:
    return IngestError(f"{path}: cannot write ({exc.strerror or exc}); nothing of this arrival was kept")


def _safe_name(name: str) -> str:
    """A printable file name that fits the file system, unique for each original name."""
    if len(name.encode("utf-8", "surrogateescape")) <= NAME_BYTES:
        return name
    stem, dot, ext = name.rpartition(".")
    ext = dot + ext if dot and len(ext) <= 10 else ""
    short = name.encode("utf-8", "surrogateescape")[: NAME_BYTES - 40].decode("utf-8", "ignore")
    return f"{short}~{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}{ext}"


def _quarantine_path(parts: tuple[str, ...]) -> str:
    names = [_safe_name(printable((p,))) for p in parts]
    if names == [REASONS]:
        names = [REASONS + ".quarantined"]
    return "/".join(names)


# -- identity ----------------------------------------------------------------------------------


def _identify(name: str, fingerprint: str, entries: list[Entry], registry: Catalog, ws: Workspace) -> tuple[str, str]:
    """(arrival id, identity): the recorded arrival with this content, or the id a new one gets."""
    for arrival, meta in registry.arrivals.items():
        if meta.get("fingerprint") == fingerprint and meta.get("name", arrival) == name:
            return arrival, "same_content"
    legacy = registry.arrivals.get(name)
    if legacy is not None and "fingerprint" not in legacy and _matches_legacy(name, entries, registry, ws):
        return name, "same_content"
    if name not in registry.arrivals:
        return name, "new"
    return f"{name}~{fingerprint[:12]}", "changed_content"


def _matches_legacy(name: str, entries: list[Entry], registry: Catalog, ws: Workspace) -> bool:
    """An arrival recorded before fingerprints: the same one when it brings nothing that arrival
    did not already store or quarantine (its reasons.json lists what it quarantined)."""
    try:
        listed = {r["file"] for r in json.loads((ws.quarantine / name / REASONS).read_text())}
    except (OSError, ValueError, TypeError, KeyError):
        listed = set()
    listed.add(MANIFEST)
    for e in entries:
        if e.rel in listed:
            continue
        if e.digest is None or len(e.parts) < 2 or e.parts[0] not in _classes_of_hash(registry, e.digest[:32]):
            return False
    return True


def _classes_of_hash(registry: Catalog, digest: str) -> set[str]:
    return {image_id.split("/", 1)[0] for image_id in registry.images_with_hash(digest)}


def pending_arrivals(ws: Workspace, params: IngestParams | None = None) -> list[Path]:
    """Arrival folders in the inbox whose content the class registry has not recorded.

    Folders whose name is not recorded are pending without being read. With params, a folder
    under a recorded name is read and fingerprinted as ingest would (a fixed or different
    arrival under an old name is pending); without, a recorded name counts as ingested (cheap,
    for status pages). Hidden folders and links in the inbox are not arrivals.
    """
    if not ws.inbox.is_dir():
        return []
    registry = Catalog.load(ws.catalog)
    names = {meta.get("name", arrival) for arrival, meta in registry.arrivals.items()}
    out = []
    for path in sorted(ws.inbox.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        if path.name in names and (params is None or _recorded_as(path, ws, registry, params) is not None):
            continue
        out.append(path)
    return out


def _recorded_as(path: Path, ws: Workspace, registry: Catalog, params: IngestParams) -> str | None:
    """The recorded arrival id with this folder's content, or None."""
    try:
        root_fd = os.open(path, DIR_FLAGS)
    except OSError:
        return None  # unreadable now: the ingest itself reports why
    with opened(root_fd):
        entries, _ = scan(root_fd, params.max_file_bytes)
    fingerprint = content_fingerprint(entries)
    arrival, identity = _identify(path.name, fingerprint, entries, registry, ws)
    return arrival if identity == "same_content" else None


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
    registry = Catalog.load(ws.catalog)
    arrival, identity = _identify(name, fingerprint, entries, registry, ws)
    report = IngestReport(arrival=arrival, status="ingested", folder=name, identity=identity, fingerprint=fingerprint)
    if identity == "same_content":
        report.status = "already_ingested"
        before = registry.arrivals[arrival]
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

    quarantine = ws.quarantine / _safe_name(arrival)
    writes = _Writes()
    try:
        stored_by_class, processed = _process(root_fd, entries, ws, params, registry, report, quarantine, writes)
        if report.rejected:
            writes.write(
                quarantine / REASONS,
                json.dumps([r.__dict__ for r in report.rejected], indent=1, ensure_ascii=False).encode(),
                sync=False,
            )
        recorded = _record(
            arrival,
            name,
            fingerprint,
            _read_manifest(root_fd, arrival_dir, report),
            stored_by_class,
            registry,
            report,
            params,
        )
        if recorded:
            try:
                registry.save()
            except OSError as exc:
                raise _write_error(registry.path, exc) from None
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
    registry: Catalog,
    report: IngestReport,
    quarantine: Path,
    writes: _Writes,
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
            copy = _quarantine_path(entry.parts)
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
        other = by_hash.get(content) or registry.class_of_hash(content)
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
        if image_id in registry.images or image_id in stored_by_class.get(cls, []):
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
    registry: Catalog,
    report: IngestReport,
    params: IngestParams,
) -> bool:
    """Classes, roles and the arrival into the registry (in memory); False when nothing new was stored."""
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
    count = registry.image_counts(sorted(stored_by_class))
    report.new_classes = sorted(c for c in stored_by_class if c not in registry.classes)
    completing = sorted(
        c
        for c, ids in stored_by_class.items()
        if count[c] + len(ids) >= 2 and (c in report.new_classes or registry.classes[c]["split"] == "pending")
    )
    singles = sorted(c for c in report.new_classes if c not in completing)
    unseen = _held_out_share(completing, params.unseen_class_fraction, params.seed, "unseen")
    report.unseen_classes = sorted(unseen)
    report.pending_classes = singles
    for cls in singles:
        registry.classes[cls] = {"arrival": arrival, "split": "pending"}
        report.warnings.append(
            f"class {cls!r} has a single image: stored and queryable, kept out of training and evaluation "
            "until an arrival brings a second"
        )
    for cls in completing:
        registry.classes[cls] = {"arrival": arrival, "split": "unseen" if cls in unseen else "train"}
    was_pending = [c for c in completing if c not in report.new_classes]
    for cls, image_ids in stored_by_class.items():
        split = registry.classes[cls]["split"]
        pool = list(image_ids)
        if cls in was_pending:  # its queries are drawn from all its images, the earlier pending one too
            pool += registry.class_images(cls)
        queries = set()
        if split == "train":
            queries = _held_out_share(sorted(pool), params.query_image_fraction, params.seed, "query")
        for image_id in image_ids:
            registry.images[image_id] = {"class": cls, "arrival": arrival, "role": split}
        for image_id in pool:
            if split == "train":
                registry.images[image_id]["role"] = "query" if image_id in queries else "train"
            else:
                registry.images[image_id]["role"] = split
    registry.arrivals[arrival] = {
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
