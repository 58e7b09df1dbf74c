"""Writing an arrival into the workspace all or nothing: every file and folder an ingest creates
is recorded, so a failure (a read-only or full workspace) takes them all back and fails with one
IngestError naming the path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class IngestError(RuntimeError):
    """The workspace could not take the arrival (read-only, disk full): nothing of it was kept."""


class Writes:
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
                raise write_error(parent, exc) from None
            self.dirs.append(parent)

    def write(self, dest: Path, data: bytes, *, sync: bool) -> None:
        """dest is absent or complete, whatever happens (short temporary names: any dest name fits)."""
        self.mkdirs(dest.parent)
        try:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
        except OSError as exc:
            raise write_error(dest.parent, exc) from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if sync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise write_error(dest, exc) from None
        self.files.append(dest)

    def undo(self) -> None:
        for path in reversed(self.files):
            path.unlink(missing_ok=True)
        for folder in reversed(self.dirs):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: someone else's file is there now


def write_error(path: Path, exc: OSError) -> IngestError:
    return IngestError(f"{path}: cannot write ({exc.strerror or exc}); nothing of this arrival was kept")
