"""Walking an arrival without leaving it. An arrival folder is untrusted input: every folder
and file is opened relative to its parent with O_NOFOLLOW, so a symbolic link (to a file or a
folder) is reported and never followed, and a FIFO or device is never opened. Each regular
file is hashed as it is read; reading it again later must give the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from components.data.validation import too_big

MAX_DEPTH = 16  # folders nested deeper than this are reported, not walked
CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO never blocks


@dataclass(frozen=True)
class Entry:
    """One thing found in the arrival. `digest` is set for a regular file that was read."""

    parts: tuple[str, ...]  # relative path, os names (undecodable bytes surrogate-escaped)
    kind: str  # "file" | "oversized" | "link" | "special" | "unreadable" | "vanished" | "too_deep"
    size: int = 0
    digest: str | None = None
    problem: str | None = None

    @property
    def rel(self) -> str:
        return printable(self.parts)


class Changed(Exception):
    """A file differs from what the scan read (it grew, shrank or was replaced)."""


def open_dir(parent_fd: int, name: str) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def open_file(parent_fd: int, name: str) -> int:
    return os.open(name, FILE_FLAGS, dir_fd=parent_fd)


@contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def parent_fd(root_fd: int, parts: tuple[str, ...]) -> Iterator[int]:
    """The folder holding parts[-1], opened component by component: no link is followed on the way."""
    fds: list[int] = []
    try:
        fd = root_fd
        for name in parts[:-1]:
            fd = open_dir(fd, name)
            fds.append(fd)
        yield fd
    finally:
        for opened in fds:
            os.close(opened)


def kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def read_problem(exc: OSError, what: str) -> tuple[str, str]:
    """(kind, reason) for a file or folder that could not be opened or read."""
    if exc.errno == errno.ENOENT:
        return "vanished", f"{what} vanished during ingest"
    if exc.errno == errno.ELOOP:
        return "link", "symbolic link: links are never followed (nothing outside the arrival is read)"
    return "unreadable", f"cannot read {what} ({exc.strerror or exc})"


def scan(root_fd: int, limit: int) -> tuple[list[Entry], list[str]]:
    """Every entry under the arrival (sorted, depth first) with the SHA-256 of each readable regular
    file, and the empty folders. Links are reported, never followed; special files never opened."""
    entries: list[Entry] = []
    empty: list[str] = []

    def visit(dir_fd: int, prefix: tuple[str, ...]) -> None:
        try:
            with os.scandir(dir_fd) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            kind, reason = read_problem(exc, "folder")
            entries.append(Entry(prefix, kind, problem=reason))
            return
        if not children and prefix:
            empty.append(printable(prefix))
        for child in children:
            parts = (*prefix, child.name)
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                kind, reason = read_problem(exc, "file")
                entries.append(Entry(parts, kind, problem=reason))
                continue
            if stat.S_ISLNK(st.st_mode):
                kind, reason = read_problem(OSError(errno.ELOOP, "link"), "file")
                entries.append(Entry(parts, kind, problem=reason))
            elif stat.S_ISDIR(st.st_mode):
                if len(parts) > MAX_DEPTH:
                    entries.append(Entry(parts, "too_deep", problem=f"folder nested over {MAX_DEPTH} levels deep"))
                    continue
                try:
                    sub = open_dir(dir_fd, child.name)
                except OSError as exc:
                    kind, reason = read_problem(exc, "folder")
                    entries.append(Entry(parts, kind, problem=reason))
                    continue
                with opened(sub):
                    visit(sub, parts)
            elif stat.S_ISREG(st.st_mode):
                entries.append(hash_file(dir_fd, parts, st, limit))
            else:
                entries.append(
                    Entry(parts, "special", problem=f"{kind_of(st.st_mode)}, not a regular file: not opened")
                )

    visit(root_fd, ())
    return entries, empty


def hash_file(dir_fd: int, parts: tuple[str, ...], st: os.stat_result, limit: int) -> Entry:
    if st.st_size > limit:
        return Entry(parts, "oversized", size=st.st_size, problem=too_big(st.st_size, limit))
    try:
        fd = open_file(dir_fd, parts[-1])
    except OSError as exc:
        kind, reason = read_problem(exc, "file")
        return Entry(parts, kind, problem=reason)
    with opened(fd):
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode):
            return Entry(parts, "special", problem=f"{kind_of(now.st_mode)}, not a regular file: not read")
        digest, size = hashlib.sha256(), 0
        try:
            while chunk := os.read(fd, CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if size > limit:  # it grew past the limit while being read
                    return Entry(parts, "oversized", size=size, problem=too_big(size, limit))
        except OSError as exc:
            kind, reason = read_problem(exc, "file")
            return Entry(parts, kind, problem=reason)
    return Entry(parts, "file", size=size, digest=digest.hexdigest())


def read_again(root_fd: int, entry: Entry, limit: int) -> bytes:
    """The file's bytes, which must be the bytes the scan hashed (else Changed)."""
    with parent_fd(root_fd, entry.parts) as dir_fd, opened(open_file(dir_fd, entry.parts[-1])) as fd:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Changed("replaced by something that is not a regular file")
        chunks, size = [], 0
        while size <= entry.size and (chunk := os.read(fd, CHUNK)):  # a growing file is not read to its end
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.digest:
        now = f"{len(data)} bytes now" if len(data) <= entry.size else "more now"
        raise Changed(f"{entry.size} bytes when scanned, {now}")
    return data


def stat_signature(root_fd: int) -> tuple[tuple[str, int, int, int, int, int], ...]:
    """(path, mode, size, mtime, ctime, inode) of everything under the arrival, nothing opened but
    folders (links not followed): it changes when a file is added, removed, replaced, written or
    made readable, which is what a content fingerprint would see, without reading a byte."""
    out: list[tuple[str, int, int, int, int, int]] = []

    def visit(dir_fd: int, prefix: tuple[str, ...]) -> None:
        try:
            with os.scandir(dir_fd) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:
            out.append((printable(prefix), -1, 0, 0, 0, 0))
            return
        for child in children:
            parts = (*prefix, child.name)
            try:
                st = child.stat(follow_symlinks=False)
            except OSError:
                out.append((printable(parts), -1, 0, 0, 0, 0))
                continue
            out.append((printable(parts), st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            if stat.S_ISDIR(st.st_mode) and len(parts) <= MAX_DEPTH:
                try:
                    sub = open_dir(dir_fd, child.name)
                except OSError:
                    continue  # its mode is in the signature: made readable, it changes
                with opened(sub):
                    visit(sub, parts)

    visit(root_fd, ())
    return tuple(out)


def content_fingerprint(entries: list[Entry]) -> str:
    """SHA-256 over every (relative path, content hash): unread things count by kind and size."""
    h = hashlib.sha256()
    for e in entries:
        h.update(os.fsencode("/".join(e.parts)) + b"\0" + (e.digest or f"{e.kind}:{e.size}").encode() + b"\n")
    return h.hexdigest()


def prune(dir_fd: int, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
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
                sub = open_dir(dir_fd, child.name)
            except OSError:
                left.append(parts)
                continue
            with opened(sub):
                inside = prune(sub, parts)
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


def printable(parts: tuple[str, ...]) -> str:
    """A relative path safe to write to JSON and to the disk (undecodable bytes escaped)."""
    return os.fsencode(os.path.join(*parts)).decode("utf-8", errors="backslashreplace") if parts else "."
