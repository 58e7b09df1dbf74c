"""Ingest an arrival: validate every file, store good images under content-hash names,
quarantine the rest with a reason, and record the arrival in the class registry.

An arrival is a folder with one sub-folder per class (torchvision ImageFolder layout) and
an optional manifest.json. Re-ingesting an arrival already in the registry changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from components.config import IMAGE_EXTENSIONS, IngestParams, Workspace
from components.data.class_registry import ClassRegistry

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Rejected:
    file: str  # path relative to the arrival folder
    reason: str


@dataclass
class IngestReport:
    arrival: str
    status: str  # "ingested" | "already_ingested"
    new_classes: list[str] = field(default_factory=list)
    unseen_classes: list[str] = field(default_factory=list)
    stored: int = 0
    duplicates: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.arrival}: {self.status}, {self.stored} stored, {len(self.rejected)} quarantined, "
            f"{len(self.new_classes)} new classes"
        )


def validate_image(data: bytes, limits: IngestParams) -> tuple[str | None, str | None]:
    """(format, None) for a good image, (None, reason) for a bad one. Decodes the whole image."""
    if not data:
        return None, "empty file (0 bytes)"
    if len(data) > limits.max_file_bytes:
        return None, _too_big(len(data), limits.max_file_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (width, height) = img.format, img.mode, img.size
                if fmt not in limits.formats:
                    return None, f"format {fmt} is not one of {', '.join(limits.formats)}"
                if width * height > limits.max_pixels:
                    return None, f"{width}x{height} = {width * height} pixels, over the {limits.max_pixels}-pixel limit"
                if min(width, height) < limits.min_side:
                    return None, f"{width}x{height} is smaller than {limits.min_side} pixels on a side"
                if mode not in limits.modes:
                    return None, f"pixel mode {mode} is not one of {', '.join(limits.modes)}"
                img.load()  # full decode: truncated or corrupt data fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"image dimensions are too large ({exc})"
    except UnidentifiedImageError:
        return None, "not an image (no decoder recognises the file)"
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"corrupt or truncated image ({exc})"
    return fmt, None


def _class_folder_problem(rel: Path) -> str | None:
    if len(rel.parts) < 2:
        return "not inside a class folder"
    name = rel.parts[0]
    if name.startswith("."):
        return "inside a hidden folder, not a class folder"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "class folder name is not valid UTF-8"
    return None


def _rank(seed: int, *parts: str) -> str:
    return hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).hexdigest()


def _held_out_share(items: list[str], fraction: float, seed: int, salt: str) -> set[str]:
    """A fixed, deterministic share of `items` (at least one, never all, when there are 2+)."""
    if len(items) < 2:
        return set()
    count = min(max(1, round(fraction * len(items))), len(items) - 1)
    return set(sorted(items, key=lambda item: _rank(seed, salt, item))[:count])


def _write_atomically(dest: Path, source: bytes | Path) -> None:
    """Write bytes (or copy a file) so that dest is either absent or complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    if isinstance(source, Path):
        shutil.copyfile(source, tmp)
    else:
        tmp.write_bytes(source)
    os.replace(tmp, dest)


def _check_file(path: Path, rel: Path, params: IngestParams) -> tuple[str | None, str | None, bytes | None]:
    """(format, reason, bytes). The file is read once, so the bytes checked are the bytes stored;
    an oversized one is judged by its size and never read into memory (bytes None)."""
    size = path.stat().st_size
    if size > params.max_file_bytes:
        return None, _too_big(size, params.max_file_bytes), None
    data = path.read_bytes()
    reason = _class_folder_problem(rel)
    if reason is not None:
        return None, reason, data
    fmt, reason = validate_image(data, params)
    return fmt, reason, data


def _too_big(size: int, limit: int) -> str:
    return f"file is {size} bytes, over the {limit}-byte limit"


def pending_arrivals(ws: Workspace) -> list[Path]:
    """Arrival folders in the inbox that the class registry does not know yet, oldest name first."""
    if not ws.inbox.is_dir():
        return []
    known = ClassRegistry.load(ws.class_registry).arrivals
    return sorted(p for p in ws.inbox.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in known)


def ingest_arrival(
    arrival_dir: Path, ws: Workspace, params: IngestParams, *, remove_source: bool = False
) -> IngestReport:
    """Validate and store one arrival. With remove_source, the folder is deleted once recorded."""
    arrival_dir = Path(arrival_dir)
    arrival = arrival_dir.name
    if not arrival_dir.is_dir():
        raise FileNotFoundError(f"{arrival_dir}: arrival folder does not exist")
    registry = ClassRegistry.load(ws.class_registry)
    if arrival in registry.arrivals:
        return IngestReport(arrival=arrival, status="already_ingested")

    report = IngestReport(arrival=arrival, status="ingested")
    quarantine = ws.quarantine / arrival
    manifest = _read_manifest(arrival_dir, report)

    stored_by_class: dict[str, list[str]] = {}
    processed: list[Path] = []
    for path in sorted(p for p in arrival_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(arrival_dir)
        if rel.as_posix() == MANIFEST:
            processed.append(path)
            continue
        try:
            fmt, reason, data = _check_file(path, rel, params)
        except OSError as exc:  # vanished or unreadable: nothing to store or quarantine
            report.rejected.append(Rejected(file=_printable(rel), reason=f"cannot read file ({exc.strerror})"))
            continue
        processed.append(path)
        if reason is not None:
            report.rejected.append(Rejected(file=_printable(rel), reason=reason))
            _write_atomically(quarantine / _printable(rel), path if data is None else data)
            continue
        assert fmt is not None and data is not None  # a file without a reason was read and identified
        cls = rel.parts[0]
        image_id = f"{cls}/{hashlib.sha256(data).hexdigest()[:32]}.{IMAGE_EXTENSIONS[fmt]}"
        if image_id in registry.images or image_id in stored_by_class.get(cls, []):
            report.duplicates += 1
            continue
        dest = ws.classes_dir / image_id
        if not dest.exists():
            _write_atomically(dest, data)
        stored_by_class.setdefault(cls, []).append(image_id)
        report.stored += 1

    if report.rejected:
        quarantine.mkdir(parents=True, exist_ok=True)
        (quarantine / "reasons.json").write_text(
            json.dumps([r.__dict__ for r in report.rejected], indent=1, ensure_ascii=False)
        )

    report.new_classes = sorted(c for c in stored_by_class if c not in registry.classes)
    unseen = _held_out_share(report.new_classes, params.unseen_class_fraction, params.seed, "unseen")
    report.unseen_classes = sorted(unseen)
    for cls in report.new_classes:
        registry.classes[cls] = {"arrival": arrival, "split": "unseen" if cls in unseen else "train"}
    for cls, image_ids in stored_by_class.items():
        trained = registry.classes[cls]["split"] == "train"
        queries = _held_out_share(image_ids, params.query_image_fraction, params.seed, "query") if trained else set()
        for image_id in image_ids:
            role = "unseen" if not trained else ("query" if image_id in queries else "train")
            registry.images[image_id] = {"class": cls, "arrival": arrival, "role": role}

    registry.arrivals[arrival] = {
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": sorted(stored_by_class),
        "stored": report.stored,
        "duplicates": report.duplicates,
        "quarantined": len(report.rejected),
        "manifest": manifest,
    }
    registry.save()
    if remove_source:
        _remove_processed(arrival_dir, processed, report)
    return report


def _remove_processed(arrival_dir: Path, processed: list[Path], report: IngestReport) -> None:
    """Delete what was stored or quarantined; anything that landed meanwhile stays, with a warning."""
    for path in processed:
        path.unlink(missing_ok=True)
    for folder in sorted((p for p in arrival_dir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    left = [p for p in arrival_dir.rglob("*") if p.is_file()]
    if left:
        report.warnings.append(
            f"{arrival_dir}: {len(left)} file(s) arrived during ingest and were left there; "
            "move them into a new arrival folder"
        )
    else:
        arrival_dir.rmdir()


def _printable(rel: Path) -> str:
    """A relative path safe to write to JSON and to the disk (undecodable bytes escaped)."""
    return os.fsencode(rel).decode("utf-8", errors="backslashreplace")


def _read_manifest(arrival_dir: Path, report: IngestReport) -> dict | None:
    path = arrival_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.warnings.append(f"{path}: manifest ignored, not valid JSON ({exc})")
        return None
    if not isinstance(manifest, dict):
        report.warnings.append(f"{path}: manifest ignored, expected a JSON object")
        return None
    return manifest
