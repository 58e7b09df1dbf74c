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
import io
import json
import os
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from components.config import IMAGE_EXTENSIONS, IngestParams, Workspace
from components.data.class_registry import ClassRegistry
from components.data.transforms import as_rgb

MANIFEST = "manifest.json"
REASONS = "reasons.json"  # in quarantine/<arrival>/
MAX_DEPTH = 16  # folders nested deeper than this are reported, not walked
NAME_BYTES = 255  # the usual file-name limit: an escaped (longer) quarantine name is shortened
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO never blocks
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC: nothing of a PNG follows it


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


def validate_image(data: bytes, limits: IngestParams) -> tuple[str | None, str | None]:
    """(format, None) for a good image, (None, reason) for a bad one. Decodes the whole image."""
    fmt, reason, _ = _checked(data, limits, keep=False)
    return fmt, reason


def decode_image(data: bytes, limits: IngestParams) -> tuple[Image.Image | None, str | None]:
    """(the image upright in RGB, None) for a good image, (None, reason) for a bad one: the checks of
    validate_image and the decode a query needs, in one pass over the pixels."""
    _, reason, image = _checked(data, limits, keep=True)
    return image, reason


def _checked(data: bytes, limits: IngestParams, *, keep: bool) -> tuple[str | None, str | None, Image.Image | None]:
    """(format, reason, image): reason None for a good image; the RGB image too when `keep`."""
    image = None
    if not data:
        return None, "empty file (0 bytes)", None
    if len(data) > limits.max_file_bytes:
        return None, _too_big(len(data), limits.max_file_bytes), None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (width, height) = img.format, img.mode, img.size
                if fmt not in limits.formats:
                    return None, f"format {fmt} is not one of {', '.join(limits.formats)}", None
                if width * height > limits.max_pixels:
                    pixels = f"{width}x{height} = {width * height} pixels"
                    return None, f"{pixels}, over the {limits.max_pixels}-pixel limit", None
                if min(width, height) < limits.min_side:
                    return None, f"{width}x{height} is smaller than {limits.min_side} pixels on a side", None
                if mode not in limits.modes:
                    return None, f"pixel mode {mode} is not one of {', '.join(limits.modes)}", None
                img.load()  # full decode: truncated or corrupt data fails here
                if keep:
                    image = as_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"image dimensions are too large ({exc})", None
    except UnidentifiedImageError:
        return None, "not an image (no decoder recognises the file)", None
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"corrupt or truncated image ({exc})", None
    if fmt == "PNG":
        end = data.rfind(_PNG_END)
        if end >= 0 and end + len(_PNG_END) < len(data):
            extra = len(data) - end - len(_PNG_END)
            return None, f"{extra} bytes after the end of the PNG image (a polyglot or appended payload)", None
    return fmt, None, image


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


def _too_big(size: int, limit: int) -> str:
    return f"file is {size} bytes, over the {limit}-byte limit"


# -- walking an arrival without leaving it ---------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One thing found in the arrival. `digest` is set for a regular file that was read."""

    parts: tuple[str, ...]  # relative path, os names (undecodable bytes surrogate-escaped)
    kind: str  # "file" | "oversized" | "link" | "special" | "unreadable" | "vanished" | "too_deep"
    size: int = 0
    digest: str | None = None
    problem: str | None = None

    @property
    def rel(self) -> str:
        return _printable(self.parts)


class _Changed(Exception):
    """A file differs from what the scan read (it grew, shrank or was replaced)."""


def _open_dir(parent_fd: int, name: str) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _open_file(parent_fd: int, name: str) -> int:
    return os.open(name, _FILE_FLAGS, dir_fd=parent_fd)


@contextmanager
def _opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _parent_fd(root_fd: int, parts: tuple[str, ...]) -> Iterator[int]:
    """The folder holding parts[-1], opened component by component: no link is followed on the way."""
    fds: list[int] = []
    try:
        fd = root_fd
        for name in parts[:-1]:
            fd = _open_dir(fd, name)
            fds.append(fd)
        yield fd
    finally:
        for opened in fds:
            os.close(opened)


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _read_problem(exc: OSError, what: str) -> tuple[str, str]:
    """(kind, reason) for a file or folder that could not be opened or read."""
    if exc.errno == errno.ENOENT:
        return "vanished", f"{what} vanished during ingest"
    if exc.errno == errno.ELOOP:
        return "link", "symbolic link: links are never followed (nothing outside the arrival is read)"
    return "unreadable", f"cannot read {what} ({exc.strerror or exc})"


def _scan(root_fd: int, limit: int) -> tuple[list[_Entry], list[str]]:
    """Every entry under the arrival (sorted, depth first) with the SHA-256 of each readable regular
    file, and the empty folders. Links are reported, never followed; special files never opened."""
    entries: list[_Entry] = []
    empty: list[str] = []

    def visit(dir_fd: int, prefix: tuple[str, ...]) -> None:
        try:
            with os.scandir(dir_fd) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            kind, reason = _read_problem(exc, "folder")
            entries.append(_Entry(prefix, kind, problem=reason))
            return
        if not children and prefix:
            empty.append(_printable(prefix))
        for child in children:
            parts = (*prefix, child.name)
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                kind, reason = _read_problem(exc, "file")
                entries.append(_Entry(parts, kind, problem=reason))
                continue
            if stat.S_ISLNK(st.st_mode):
                kind, reason = _read_problem(OSError(errno.ELOOP, "link"), "file")
                entries.append(_Entry(parts, kind, problem=reason))
            elif stat.S_ISDIR(st.st_mode):
                if len(parts) > MAX_DEPTH:
                    entries.append(_Entry(parts, "too_deep", problem=f"folder nested over {MAX_DEPTH} levels deep"))
                    continue
                try:
                    sub = _open_dir(dir_fd, child.name)
                except OSError as exc:
                    kind, reason = _read_problem(exc, "folder")
                    entries.append(_Entry(parts, kind, problem=reason))
                    continue
                with _opened(sub):
                    visit(sub, parts)
            elif stat.S_ISREG(st.st_mode):
                entries.append(_hash_file(dir_fd, parts, st, limit))
            else:
                entries.append(
                    _Entry(parts, "special", problem=f"{_kind_of(st.st_mode)}, not a regular file: not opened")
                )

    visit(root_fd, ())
    return entries, empty


def _hash_file(dir_fd: int, parts: tuple[str, ...], st: os.stat_result, limit: int) -> _Entry:
    if st.st_size > limit:
        return _Entry(parts, "oversized", size=st.st_size, problem=_too_big(st.st_size, limit))
    try:
        fd = _open_file(dir_fd, parts[-1])
    except OSError as exc:
        kind, reason = _read_problem(exc, "file")
        return _Entry(parts, kind, problem=reason)
    with _opened(fd):
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode):
            return _Entry(parts, "special", problem=f"{_kind_of(now.st_mode)}, not a regular file: not read")
        digest, size = hashlib.sha256(), 0
        try:
            while chunk := os.read(fd, _CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if size > limit:  # it grew past the limit while being read
                    return _Entry(parts, "oversized", size=size, problem=_too_big(size, limit))
        except OSError as exc:
            kind, reason = _read_problem(exc, "file")
            return _Entry(parts, kind, problem=reason)
    return _Entry(parts, "file", size=size, digest=digest.hexdigest())


def _read_again(root_fd: int, entry: _Entry, limit: int) -> bytes:
    """The file's bytes, which must be the bytes the scan hashed (else _Changed)."""
    with _parent_fd(root_fd, entry.parts) as dir_fd, _opened(_open_file(dir_fd, entry.parts[-1])) as fd:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Changed("replaced by something that is not a regular file")
        chunks, size = [], 0
        while size <= entry.size and (chunk := os.read(fd, _CHUNK)):  # a growing file is not read to its end
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.digest:
        now = f"{len(data)} bytes now" if len(data) <= entry.size else "more now"
        raise _Changed(f"{entry.size} bytes when scanned, {now}")
    return data


def _fingerprint(entries: list[_Entry]) -> str:
    """SHA-256 over every (relative path, content hash): unread things count by kind and size."""
    h = hashlib.sha256()
    for e in entries:
        h.update(os.fsencode("/".join(e.parts)) + b"\0" + (e.digest or f"{e.kind}:{e.size}").encode() + b"\n")
    return h.hexdigest()


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
    names = [_safe_name(_printable((p,))) for p in parts]
    if names == [REASONS]:
        names = [REASONS + ".quarantined"]
    return "/".join(names)


# -- identity ----------------------------------------------------------------------------------


def _identify(
    name: str, fingerprint: str, entries: list[_Entry], registry: ClassRegistry, ws: Workspace
) -> tuple[str, str]:
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


def _matches_legacy(name: str, entries: list[_Entry], registry: ClassRegistry, ws: Workspace) -> bool:
    """An arrival recorded before fingerprints: the same one when it brings nothing that arrival
    did not already store or quarantine (its reasons.json lists what it quarantined)."""
    stored = {image_id.rsplit(".", 1)[0] for image_id in registry.images}
    try:
        listed = {r["file"] for r in json.loads((ws.quarantine / name / REASONS).read_text())}
    except (OSError, ValueError, TypeError, KeyError):
        listed = set()
    listed.add(MANIFEST)
    for e in entries:
        if e.rel in listed:
            continue
        if e.digest is None or len(e.parts) < 2 or f"{e.parts[0]}/{e.digest[:32]}" not in stored:
            return False
    return True


def _stored_classes_by_hash(registry: ClassRegistry) -> dict[str, str]:
    """Content hash (the 32 hex digits of an image id) -> the class it is stored under."""
    out: dict[str, str] = {}
    for image_id, meta in registry.images.items():
        out.setdefault(image_id.rsplit("/", 1)[-1].split(".", 1)[0], meta["class"])
    return out


def pending_arrivals(ws: Workspace, params: IngestParams | None = None) -> list[Path]:
    """Arrival folders in the inbox whose content the class registry has not recorded.

    Folders whose name is not recorded are pending without being read. With params, a folder
    under a recorded name is read and fingerprinted as ingest would (a fixed or different
    arrival under an old name is pending); without, a recorded name counts as ingested (cheap,
    for status pages). Hidden folders and links in the inbox are not arrivals.
    """
    if not ws.inbox.is_dir():
        return []
    registry = ClassRegistry.load(ws.class_registry)
    names = {meta.get("name", arrival) for arrival, meta in registry.arrivals.items()}
    out = []
    for path in sorted(ws.inbox.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        if path.name in names and (params is None or _recorded_as(path, ws, registry, params) is not None):
            continue
        out.append(path)
    return out


def _recorded_as(path: Path, ws: Workspace, registry: ClassRegistry, params: IngestParams) -> str | None:
    """The recorded arrival id with this folder's content, or None."""
    try:
        root_fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return None  # unreadable now: the ingest itself reports why
    with _opened(root_fd):
        entries, _ = _scan(root_fd, params.max_file_bytes)
    fingerprint = _fingerprint(entries)
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
        root_fd = os.open(arrival_dir, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and arrival_dir.is_symlink()):
            raise FileNotFoundError(
                f"{arrival_dir}: the arrival folder is a symbolic link; links are not followed"
            ) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(f"{arrival_dir}: arrival folder does not exist") from None
        raise IngestError(f"{arrival_dir}: cannot read the arrival folder ({exc.strerror})") from None
    with _opened(root_fd):
        return _ingest(root_fd, arrival_dir, name, ws, params, remove_source)


def _ingest(
    root_fd: int, arrival_dir: Path, name: str, ws: Workspace, params: IngestParams, remove_source: bool
) -> IngestReport:
    entries, empty = _scan(root_fd, params.max_file_bytes)
    fingerprint = _fingerprint(entries)
    registry = ClassRegistry.load(ws.class_registry)
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
    entries: list[_Entry],
    ws: Workspace,
    params: IngestParams,
    registry: ClassRegistry,
    report: IngestReport,
    quarantine: Path,
    writes: _Writes,
) -> tuple[dict[str, list[str]], list[tuple[str, ...]]]:
    """Store or quarantine each scanned file: (image ids stored per class, paths done with)."""
    stored_by_class: dict[str, list[str]] = {}
    processed: list[tuple[str, ...]] = []  # stored, quarantined or a duplicate: safe to delete
    by_hash = _stored_classes_by_hash(registry)
    first_seen: dict[str, str] = {}  # content hash -> file of this arrival that brought it

    def reject(entry: _Entry, reason: str, data: bytes | None) -> None:
        copy = None
        if data is not None:
            copy = _quarantine_path(entry.parts)
            writes.write(quarantine / copy, data, sync=False)
            processed.append(entry.parts)
        report.rejected.append(Rejected(file=entry.rel, reason=reason, quarantined_as=copy))

    def left_unread(entry: _Entry) -> None:  # a later ingest, once it is readable or complete, stores it
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
            data = _read_again(root_fd, entry, params.max_file_bytes)
        except _Changed as exc:
            left_unread(entry)
            reject(entry, f"changed during ingest ({exc}); left in place, ingest again once it is complete", None)
            continue
        except OSError as exc:
            kind, problem = _read_problem(exc, "file")
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
        other = by_hash.get(content)
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
    registry: ClassRegistry,
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
    count = Counter(meta["class"] for meta in registry.images.values())
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
            pool += [i for i, m in registry.images.items() if m["class"] == cls]
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
    root_fd: int, arrival_dir: Path, processed: list[tuple[str, ...]], entries: list[_Entry], report: IngestReport
) -> None:
    """Delete what was stored or quarantined; what was not copied, or landed meanwhile, stays, with a warning."""
    for parts in processed:
        try:
            with _parent_fd(root_fd, parts) as dir_fd:
                os.unlink(parts[-1], dir_fd=dir_fd)
        except OSError:
            pass  # gone already, or its folder became unreadable: it is reported below as left
    left = _prune(root_fd, ())
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


def _prune(dir_fd: int, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Remove empty folders under dir_fd (links not followed); what is left, as relative paths."""
    try:
        with os.scandir(dir_fd) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError:
        return [prefix]
    left: list[tuple[str, ...]] = []
    for child in children:
        parts = (*prefix, child.name)
        if child.is_dir(follow_symlinks=False):
            try:
                sub = _open_dir(dir_fd, child.name)
            except OSError:
                left.append(parts)
                continue
            with _opened(sub):
                inside = _prune(sub, parts)
            if inside:
                left += inside
                continue
            try:
                os.rmdir(child.name, dir_fd=dir_fd)
            except OSError:
                left.append(parts)
        else:
            left.append(parts)
    return left


def _printable(parts: tuple[str, ...]) -> str:
    """A relative path safe to write to JSON and to the disk (undecodable bytes escaped)."""
    return os.fsencode(os.path.join(*parts)).decode("utf-8", errors="backslashreplace") if parts else "."


def _read_manifest(root_fd: int, arrival_dir: Path, report: IngestReport) -> dict | None:
    path = arrival_dir / MANIFEST
    try:
        fd = _open_file(root_fd, MANIFEST)
    except FileNotFoundError:
        return None
    except OSError as exc:
        report.warnings.append(f"{path}: manifest ignored, cannot read it ({exc.strerror})")
        return None
    with _opened(fd):
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
