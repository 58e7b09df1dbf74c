"""The class registry (the catalog): which arrivals were ingested, which classes and images they
brought, and the fixed role of every image (train, query of a trained class, or unseen class).

A class that arrived with a single image can never form a positive pair: its image is
`pending` (stored and queryable, kept out of training and evaluation) until a later
arrival brings a second image, when the class gets its split like a new class.

Storage, so that an arrival costs what it brings, not what came before it:
- data/catalog.sqlite, the queryable catalog: one row per image (indexed by id, class, role,
  content hash and an insertion sequence number), class and arrival. Ingest reads the rows it
  needs and writes the rows it changes in one transaction; a hot add asks for the images past
  the sequence number the live table is complete up to.
- data/arrivals/NNNNNN.json, one manifest per recorded arrival: the rows that arrival added or
  changed. Written once, never rewritten; DVC versions these with data/classes (dvc.yaml), so
  each arrival adds one small file to DVC's cache. The SQLite file is derived from them: a
  checkout that brings other manifests (dvc checkout, a copied workspace) has it rebuilt, and a
  crash between the manifest and the database commit has the missing manifest applied on the
  next open.
- data/registry.json, the one-file catalog of earlier versions, is imported on first use as
  manifest 000001 and kept as registry.json.migrated: nothing is lost, and it happens once.

`Catalog(path)` without files (or `path` that does not exist yet) is an empty in-memory
catalog; nothing is written before `save()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Role = Literal["train", "query", "unseen", "pending"]
ROLES: tuple[Role, ...] = ("train", "query", "unseen", "pending")
SCORED_ROLES: tuple[Role, ...] = ("train", "query", "unseen")  # what training and evaluation may see
Split = Literal["train", "unseen", "pending"]

MANIFESTS = "arrivals"  # beside the database: data/arrivals/
LEGACY = "registry.json"  # the one-file catalog of earlier versions, beside the database

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


class _Rows(MutableMapping[str, dict]):
    """One table of the catalog as a mapping (key -> row dict), read from SQLite on demand.

    Rows read or assigned are kept in an overlay until `Catalog.save()`, so changing a
    row in place (`images[i]["role"] = "query"`) is recorded like an assignment. Whole scans
    (iteration, len) cost the whole table: the per-arrival paths use Catalog's queries.
    """

    def __init__(self, db: sqlite3.Connection, select: str, keys: str, count: str, decode) -> None:
        self._db, self._select, self._keys, self._count, self._decode = db, select, keys, count, decode
        self.changed: dict[str, dict] = {}  # rows read or assigned since the last save
        self._as_read: dict[str, dict] = {}  # what the rows read looked like then

    def delta(self) -> dict[str, dict]:
        """The rows assigned, or read and changed in place, since the last save."""
        return {k: v for k, v in self.changed.items() if v != self._as_read.get(k)}

    def saved(self) -> None:
        self.changed.clear()
        self._as_read.clear()

    def _read(self, key: str) -> dict | None:
        row = self._db.execute(self._select, (key,)).fetchone()
        return None if row is None else self._decode(row)

    def __getitem__(self, key: str) -> dict:
        if key not in self.changed:
            row = self._read(key)
            if row is None:
                raise KeyError(key)
            self.changed[key] = row  # a caller may change it in place: delta() compares
            self._as_read[key] = dict(row)
        return self.changed[key]

    def __setitem__(self, key: str, value: dict) -> None:
        self.changed[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("catalog rows are never deleted")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self.changed or self._read(key) is not None)

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for (key,) in self._db.execute(self._keys):
            seen.add(key)
            yield key
        yield from (key for key in list(self.changed) if key not in seen)

    def __len__(self) -> int:
        stored = self._db.execute(self._count).fetchone()[0]
        return int(stored) + sum(1 for key in self.changed if self._read(key) is None)

    def items(self):  # one query, not one per key
        for key, row in self._scan():
            yield key, self.changed.get(key, row)
        for key, row in list(self.changed.items()):
            if self._read(key) is None:  # not saved yet
                yield key, row

    def values(self):
        return (row for _, row in self.items())

    def _scan(self) -> Iterator[tuple[str, dict]]:
        raise NotImplementedError


class _Images(_Rows):
    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(
            db,
            "SELECT class, arrival, role FROM images WHERE id = ?",
            "SELECT id FROM images ORDER BY id",
            "SELECT COUNT(*) FROM images",
            lambda r: {"class": r[0], "arrival": r[1], "role": r[2]},
        )

    def _scan(self) -> Iterator[tuple[str, dict]]:
        for image_id, cls, arrival, role in self._db.execute("SELECT id, class, arrival, role FROM images ORDER BY id"):
            yield image_id, {"class": cls, "arrival": arrival, "role": role}


class _Classes(_Rows):
    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(
            db,
            "SELECT arrival, split FROM classes WHERE name = ?",
            "SELECT name FROM classes ORDER BY name",
            "SELECT COUNT(*) FROM classes",
            lambda r: {"arrival": r[0], "split": r[1]},
        )

    def _scan(self) -> Iterator[tuple[str, dict]]:
        for name, arrival, split in self._db.execute("SELECT name, arrival, split FROM classes ORDER BY name"):
            yield name, {"arrival": arrival, "split": split}


def _connect(path: Path | None) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:" if path is None else path, isolation_level=None)  # transactions explicit
    if path is not None:
        # The default rollback journal, not WAL: WAL needs shared memory on one host, and the
        # workspace may be a network volume shared by several machines (infra/).
        db.execute("PRAGMA busy_timeout=30000")
    db.executescript(SCHEMA)
    return db


def _write_new(path: Path, text: str) -> None:
    """Create `path` whole or not at all (never half a file), failing if it exists: a manifest is
    written once; two writers racing for one number cannot overwrite each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # FileExistsError when taken
    finally:
        Path(tmp).unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the new name survives a power cut too
    finally:
        os.close(folder)


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
        self.classes = _Classes(self._db)
        self.images = _Images(self._db)
        self.arrivals.update(arrivals or {})
        self.classes.changed.update(classes or {})
        self.images.changed.update(images or {})

    @property
    def manifests(self) -> Path:
        return self.path.parent / MANIFESTS

    @classmethod
    def load(cls, path: Path) -> Catalog:
        """The catalog at `path`, brought up to its manifests (and migrated from registry.json once)."""
        path = Path(path)
        manifests = path.parent / MANIFESTS
        legacy = path.parent / LEGACY
        if not _manifest_files(manifests):
            if legacy.exists():  # (a database without manifests is a migration that died: it starts over)
                return cls._migrate(path, legacy)
            if not path.exists():
                return cls(path)  # nothing ingested yet: nothing is written until save()
        db = _connect(path)
        try:
            _sync(db, manifests)
        except BaseException:
            db.close()
            raise
        return cls(path, _db=db)

    @classmethod
    def _migrate(cls, path: Path, legacy: Path) -> Catalog:
        try:
            raw = json.loads(legacy.read_text())
            delta = {"arrivals": raw["arrivals"], "classes": raw["classes"], "images": raw["images"]}
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{legacy}: class registry is unreadable ({exc})") from None
        catalog = cls(path, **delta)
        catalog.save()
        legacy.replace(legacy.with_name(LEGACY + ".migrated"))  # kept: nothing is lost
        return cls.load(path)

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
            name = f"{n:06d}.json"
            _write_new(self.manifests / name, text)
            _apply(self._db, n, name, text)
        self.classes.saved()
        self.images.saved()

    def close(self) -> None:
        self._db.close()


def _manifest_files(manifests: Path) -> list[str]:
    if not manifests.is_dir():
        return []
    return sorted(p.name for p in manifests.iterdir() if p.name.endswith(".json") and p.name[:6].isdigit())


def _chain(previous: str, text: str) -> str:
    return hashlib.sha256((previous + hashlib.sha256(text.encode()).hexdigest()).encode()).hexdigest()


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


def _apply(db: sqlite3.Connection, n: int, name: str, text: str) -> None:
    """One manifest's rows and its place in the chain, inside the caller's transaction."""
    delta: dict[str, Any] = json.loads(text)
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
        (n, name, _chain(previous[0] if previous else "", text), len(text.encode())),
    )


def _in_step(db: sqlite3.Connection, manifests: Path) -> bool:
    """Whether the database holds exactly the manifests on disk, judged by their count and the last
    one's name and size (a read, no lock, no hashing: the last manifest may be a migrated history)."""
    files = _manifest_files(manifests)
    last = db.execute("SELECT n, name, bytes FROM manifests ORDER BY n DESC LIMIT 1").fetchone()
    if last is None or not files:
        return last is None and not files
    return (last[0], last[1], last[2]) == (len(files), files[-1], (manifests / files[-1]).stat().st_size)


def _sync(db: sqlite3.Connection, manifests: Path) -> None:
    """Bring the database up to the manifests on disk (see _sync_locked); nothing to do is one read."""
    if not _in_step(db, manifests):
        with _writing(db):
            _sync_locked(db, manifests)


def _sync_locked(db: sqlite3.Connection, manifests: Path) -> int:
    """Inside a write transaction: apply the manifests the database lacks; rebuild it from all of
    them when it was built from others (another data version was checked out); the rebuild is
    one transaction, so no reader sees it half done. Returns how many manifests it holds."""
    files = _manifest_files(manifests)
    applied = db.execute("SELECT n, name, bytes FROM manifests ORDER BY n").fetchall()
    consistent = len(applied) <= len(files) and all(name == files[n - 1] for n, name, _ in applied)
    if consistent and applied:  # the last one applied is still the file it was (its size: no re-reading history)
        _, name, size = applied[-1]
        consistent = (manifests / name).stat().st_size == size
    if not consistent:
        for table in ("images", "classes", "arrivals", "manifests"):
            db.execute(f"DELETE FROM {table}")
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'images'")
        applied = []
    for n in range(len(applied) + 1, len(files) + 1):
        _apply(db, n, files[n - 1], (manifests / files[n - 1]).read_text())
    return len(files)
