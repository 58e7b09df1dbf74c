"""The catalog's tables (images, classes) as mappings, read from its SQLite database on demand,
so a caller changes a row as it would a dict's and the catalog saves what changed."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, MutableMapping


class Rows(MutableMapping[str, dict]):
    """One table of the catalog as a mapping (key -> row dict), read from SQLite on demand.

    Rows read or assigned are kept in an overlay until `Catalog.save()` (components/data/catalog.py), so changing a
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


class ImageRows(Rows):
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


class ClassRows(Rows):
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
