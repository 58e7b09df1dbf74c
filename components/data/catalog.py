"""The catalog: which arrivals were ingested, which classes and images they brought, and the
fixed role of every image (components/data/roles.py decides them).

A class's split is the role its images take: `train` (a share of a train class's images are
`query` instead), `unseen` (held out from every model) or `pending` (a single image so far:
stored and queryable, kept out of training and evaluation until a later arrival brings a
second one, when the class gets its split like a new class).

Storage, so that an arrival costs what it brings, not what came before it:
- data/catalog.sqlite, the queryable catalog: one row per image (indexed by id, class, role,
  content hash and an insertion sequence number), class and arrival. Ingest reads the rows it
  needs and writes the rows it changes in one transaction; a hot add asks for the images past
  the sequence number the live table is complete up to.
- data/arrivals/NNNNNN.json, the manifest chain (components/data/manifests.py), one manifest
  per recorded arrival. The SQLite file is derived from them: a checkout that brings other
  manifests (dvc checkout, a copied workspace) has it rebuilt, and a crash between the
  manifest and the database commit has the missing manifest applied on the next open.

`Catalog(path)` without files (or `path` that does not exist yet) is an empty in-memory
catalog; nothing is written before `save()`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from components.data.catalog_rows import ClassRows, ImageRows
from components.data.manifests import MANIFESTS, chain, manifest_files, manifest_name, read_manifest, write_manifest

Role = Literal["train", "query", "unseen", "pending"]
ROLES: tuple[Role, ...] = ("train", "query", "unseen", "pending")
SCORED_ROLES: tuple[Role, ...] = ("train", "query", "unseen")  # what training and evaluation may see
Split = Literal["train", "unseen", "pending"]  # a class's split: the role its images take (see above)

log = logging.getLogger(__name__)
DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # "malformed", "not a database": not a lock or I/O error

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: what a table is complete up to
    id TEXT NOT NULL UNIQUE,                -- "<class>/<content-hash>.<ext>", relative to data/classes
    class TEXT NOT NULL,
    arrival TEXT NOT NULL,
    role TEXT NOT NULL,
    hash TEXT NOT NULL                      -- the content hash in the id: duplicates across classes
);
CREATE INDEX IF NOT EXISTS images_class ON images (class);
CREATE INDEX IF NOT EXISTS images_role ON images (role);
CREATE INDEX IF NOT EXISTS images_hash ON images (hash);
CREATE TABLE IF NOT EXISTS classes (name TEXT PRIMARY KEY, arrival TEXT NOT NULL, split TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS classes_split ON classes (split);
CREATE TABLE IF NOT EXISTS arrivals (id TEXT PRIMARY KEY, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS manifests (
    n INTEGER PRIMARY KEY, name TEXT NOT NULL, chain TEXT NOT NULL, last_seq INTEGER NOT NULL, bytes INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class ImageRecord:
    id: str  # "<class>/<content-hash>.<ext>", relative to data/classes
    cls: str
    arrival: str
    role: Role
    seq: int = 0  # the catalog's insertion order (0: not from a catalog)


def content_hash(image_id: str) -> str:
    """The content hash in an image id: "<class>/<hash>.<ext>" -> "<hash>"."""
    return image_id.rsplit("/", 1)[-1].split(".", 1)[0]


def _connect(path: Path | None) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:" if path is None else path, isolation_level=None)  # transactions explicit
    if path is not None:
        # The default rollback journal, not WAL: WAL needs shared memory on one host, and the
        # workspace may be a network volume shared by several machines (infra/).
        db.execute("PRAGMA busy_timeout=30000")
    try:
        db.executescript(SCHEMA)  # the first read of an existing file: a damaged one fails here
    except BaseException:
        db.close()
        raise
    return db


class Catalog:
    """The catalog of one workspace (data/catalog.sqlite and data/arrivals/), or an empty one in memory."""

    def __init__(
        self,
        path: Path,
        arrivals: dict[str, dict] | None = None,
        classes: dict[str, dict] | None = None,
        images: dict[str, dict] | None = None,
        *,
        _db: sqlite3.Connection | None = None,
    ) -> None:
        self.path = Path(path)
        self._db = _db if _db is not None else _connect(None)
        self.arrivals: dict[str, dict] = {
            k: json.loads(v) for k, v in self._db.execute("SELECT id, meta FROM arrivals")
        }
        self.classes = ClassRows(self._db)
        self.images = ImageRows(self._db)
        self.arrivals.update(arrivals or {})
        self.classes.changed.update(classes or {})
        self.images.changed.update(images or {})

    @property
    def manifests(self) -> Path:
        return self.path.parent / MANIFESTS

    @classmethod
    def load(cls, path: Path) -> Catalog:
        """The catalog at `path`, brought up to its manifests. A database that is not one (damaged,
        truncated) is set aside and rebuilt from the manifests; a manifest missing from the chain
        or damaged raises ManifestDamaged (components/data/manifests.py)."""
        path = Path(path)
        manifests = path.parent / MANIFESTS
        if not path.exists() and not manifest_files(manifests):
            return cls(path)  # nothing ingested yet: nothing is written until save()
        try:
            found = os.stat(path).st_ino
        except FileNotFoundError:
            found = None
        try:
            return cls._open(path, manifests)
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorcode & 0xFF not in DAMAGED:
                raise
            _set_aside(path, found, exc)
        return cls._open(path, manifests)

    @classmethod
    def _open(cls, path: Path, manifests: Path) -> Catalog:
        db = _connect(path)
        try:
            _sync(db, manifests)
            return cls(path, _db=db)
        except BaseException:
            db.close()
            raise

    # -- reading ---------------------------------------------------------------------------

    def records(self, *roles: Role) -> list[ImageRecord]:
        """Images with the given roles (all, `pending` included, when none given), in a stable order.

        The index wants every stored image; training and evaluation ask for their roles by name
        (SCORED_ROLES for a whole gallery), so a pending image reaches neither.
        """
        wanted = list(roles or ROLES)
        if self.images.delta():  # unsaved rows: the merged view
            seqs = dict(self._db.execute("SELECT id, seq FROM images"))
            return [
                ImageRecord(id=i, cls=m["class"], arrival=m["arrival"], role=m["role"], seq=seqs.get(i, 0))
                for i, m in sorted(self.images.items())
                if m["role"] in wanted
            ]
        marks = ",".join("?" * len(wanted))
        rows = self._db.execute(
            f"SELECT id, class, arrival, role, seq FROM images WHERE role IN ({marks}) ORDER BY id", wanted
        )
        return [ImageRecord(id=i, cls=c, arrival=a, role=r, seq=s) for i, c, a, r, s in rows]

    def records_since(self, seq: int) -> list[ImageRecord]:
        """Saved images recorded after sequence number `seq` (a hot add's work), in recording order."""
        rows = self._db.execute("SELECT id, class, arrival, role, seq FROM images WHERE seq > ? ORDER BY seq", (seq,))
        return [ImageRecord(id=i, cls=c, arrival=a, role=r, seq=s) for i, c, a, r, s in rows]

    def last_seq(self) -> int:
        """The sequence number of the newest saved image (0 for an empty catalog)."""
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM images").fetchone()[0])

    def classes_with_split(self, split: Split) -> list[str]:
        if self.classes.delta():
            return sorted(name for name, meta in self.classes.items() if meta["split"] == split)
        return [n for (n,) in self._db.execute("SELECT name FROM classes WHERE split = ? ORDER BY name", (split,))]

    def image_counts(self, classes: list[str]) -> Counter[str]:
        """Saved images per class, for these classes only."""
        counts: Counter[str] = Counter()
        for lo in range(0, len(classes), 500):
            chunk = classes[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            counts.update(
                dict(
                    self._db.execute(
                        f"SELECT class, COUNT(*) FROM images WHERE class IN ({marks}) GROUP BY class", chunk
                    )
                )
            )
        return counts

    def class_images(self, cls: str) -> list[str]:
        """Ids of the saved images of one class."""
        return [r.id for r in self.class_records(cls)]

    def class_records(self, cls: str) -> list[ImageRecord]:
        """The saved images of one class, by id."""
        rows = self._db.execute("SELECT id, class, arrival, role, seq FROM images WHERE class = ? ORDER BY id", (cls,))
        return [ImageRecord(id=i, cls=c, arrival=a, role=r, seq=s) for i, c, a, r, s in rows]

    def class_counts(self) -> Counter[str]:
        """Saved images per class, every class."""
        return Counter(dict(self._db.execute("SELECT class, COUNT(*) FROM images GROUP BY class")))

    def images_with_hash(self, digest: str) -> list[str]:
        """Ids of saved images with this content hash (one per class it is stored under)."""
        return [i for (i,) in self._db.execute("SELECT id FROM images WHERE hash = ? ORDER BY id", (digest,))]

    def class_of_hash(self, digest: str) -> str | None:
        """The class a saved image with this content hash is stored under (the first by id), or None."""
        row = self._db.execute("SELECT class FROM images WHERE hash = ? ORDER BY id LIMIT 1", (digest,)).fetchone()
        return None if row is None else str(row[0])

    def mark(self, seq: int) -> str | None:
        """Names the catalog's history up to image `seq`: "seq:hash" of the manifest that recorded it,
        so a table's mark still means the same images after the database is rebuilt, and means
        nothing once other manifests were checked out. None when no manifest ends at `seq`."""
        row = self._db.execute("SELECT chain FROM manifests WHERE last_seq = ? ORDER BY n LIMIT 1", (seq,)).fetchone()
        return None if row is None else f"{seq}:{row[0][:32]}"

    def version(self) -> str:
        """Identifies the catalog's content: a hash chained over its manifests ("none" when empty)."""
        row = self._db.execute("SELECT chain FROM manifests ORDER BY n DESC LIMIT 1").fetchone()
        return "none" if row is None else f"sha256:{row[0][:32]}"

    # -- writing ---------------------------------------------------------------------------

    def _delta(self) -> dict[str, dict]:
        arrivals = {k: v for k, v in self.arrivals.items() if json.dumps(v, sort_keys=True) != self._saved(k)}
        return {"arrivals": arrivals, "classes": self.classes.delta(), "images": self.images.delta()}

    def _saved(self, arrival: str) -> str | None:
        row = self._db.execute("SELECT meta FROM arrivals WHERE id = ?", (arrival,)).fetchone()
        return None if row is None else json.dumps(json.loads(row[0]), sort_keys=True)

    def save(self) -> None:
        """Record what changed since load: a new manifest and its rows, inside one database write
        transaction (so the number is taken once, after any manifest another writer added).

        The manifest is written before the transaction commits: a crash in between leaves a
        manifest the database lacks, which the next load applies. Nothing is written when
        nothing changed.
        """
        delta = self._delta()
        if not any(delta.values()):
            return
        text = json.dumps(delta, indent=1, sort_keys=True, ensure_ascii=False)
        if self._db.execute("PRAGMA database_list").fetchone()[2] == "":  # in memory until the first save
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db.close()
            self._db = self.classes._db = self.images._db = _connect(self.path)
        with _writing(self._db):
            n = _sync_locked(self._db, self.manifests) + 1
            name = manifest_name(n)
            write_manifest(self.manifests, name, text)
            _apply(self._db, n, name, text, delta)
        self.classes.saved()
        self.images.saved()

    def close(self) -> None:
        self._db.close()


@contextmanager
def _writing(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: other writers (and readers bringing the database up to date) wait."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _apply(db: sqlite3.Connection, n: int, name: str, text: str, delta: dict[str, Any]) -> None:
    """One manifest's rows (`delta`, parsed from `text`) and its place in the chain, inside the
    caller's transaction."""
    previous = db.execute("SELECT chain FROM manifests WHERE n = ?", (n - 1,)).fetchone()
    db.executemany(
        "INSERT INTO arrivals (id, meta) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET meta = excluded.meta",
        [(k, json.dumps(v, sort_keys=True)) for k, v in delta["arrivals"].items()],
    )
    db.executemany(
        "INSERT INTO classes (name, arrival, split) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET arrival = excluded.arrival, split = excluded.split",
        [(k, v["arrival"], v["split"]) for k, v in delta["classes"].items()],
    )
    db.executemany(  # an existing id keeps its sequence number: only its role or class changes
        "INSERT INTO images (id, class, arrival, role, hash) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET class = excluded.class, arrival = excluded.arrival, role = excluded.role",
        [(k, v["class"], v["arrival"], v["role"], content_hash(k)) for k, v in sorted(delta["images"].items())],
    )
    db.execute(
        "INSERT INTO manifests (n, name, chain, bytes, last_seq) "
        "VALUES (?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) FROM images))",
        (n, name, chain(previous[0] if previous else "", text), len(text.encode())),
    )


def _set_aside(path: Path, found: int | None, exc: sqlite3.DatabaseError) -> None:
    """Move a damaged database (and its journal) out of the way, unless another process did already
    (`found`: the inode found damaged), so the next open builds it again from the manifests."""
    try:
        if os.stat(path).st_ino != found:
            return  # replaced since: another process set it aside and rebuilt it
    except FileNotFoundError:
        return
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
    journal = path.with_name(path.name + "-journal")
    os.replace(path, aside)
    if journal.exists():  # a hot journal of the damaged file must not be played into the new one
        os.replace(journal, aside.with_name(aside.name + "-journal"))
    log.warning("%s: damaged (%s); set aside as %s, rebuilding it from the manifests", path, exc, aside.name)


def _in_step(db: sqlite3.Connection, manifests: Path) -> bool:
    """Whether the database holds exactly the manifests on disk, judged by their names and sizes
    (a read, no lock, no hashing)."""
    return _applied(db) == manifest_files(manifests)


def _applied(db: sqlite3.Connection) -> list[tuple[str, int]]:
    return [(name, size) for name, size in db.execute("SELECT name, bytes FROM manifests ORDER BY n")]


def _sync(db: sqlite3.Connection, manifests: Path) -> None:
    """Bring the database up to the manifests on disk (see _sync_locked); nothing to do is one read."""
    if not _in_step(db, manifests):
        with _writing(db):
            _sync_locked(db, manifests)


def _sync_locked(db: sqlite3.Connection, manifests: Path) -> int:
    """Inside a write transaction: apply the manifests the database lacks; rebuild it from all of
    them when it was built from others (another data version was checked out, or a manifest it
    applied changed size); the rebuild is one transaction, so no reader sees it half done, and a
    damaged manifest leaves the database as it was. Returns how many manifests it holds."""
    files = manifest_files(manifests)
    applied = _applied(db)
    if files[: len(applied)] != applied:
        if len(files) < len(applied):
            log.warning(
                "%s: %d manifest(s) where the catalog was built from %d: rebuilding it from those there",
                manifests,
                len(files),
                len(applied),
            )
        for table in ("images", "classes", "arrivals", "manifests"):
            db.execute(f"DELETE FROM {table}")
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'images'")
        applied = []
    for n in range(len(applied) + 1, len(files) + 1):
        name = files[n - 1][0]
        _apply(db, n, name, *read_manifest(manifests, name))
    return len(files)
