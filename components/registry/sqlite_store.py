"""A SQLite MLflow store, checked where mnemo opens it, before MLflow's engine touches it.

- Busy: while another process holds the file locked, mnemo waits a bounded, stated time
  (MNEMO_REGISTRY_BUSY_TIMEOUT, 30 s by default), then `RegistryBusy` says so in one line,
  before anything was read or written. MLflow's own engine gives up after its fixed timeouts
  with a traceback, possibly half-way through a command.
- Damaged: a file that is not a SQLite database, or fails SQLite's quick check, is named in one
  line (`RegistryDamaged`). It holds the runs, versions and the promotion log: nothing derives it,
  so it is restored from a backup, never rebuilt or overwritten.
- Moved: the workspace's own store (sqlite:///<root>/mlflow.db) records artifact locations as
  absolute file URIs. In a copied, moved or restored workspace they point into the old folder's
  mlartifacts/, so reads would come from, and writes go to, another workspace: they are rebased
  onto this workspace's mlartifacts/ in one transaction, and a warning says so.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from components.ops.transient import is_store_locked
from components.workspace import Workspace, settings

logger = logging.getLogger(__name__)

# Every column of MLflow's schema (3.x) that holds an artifact location; checked against the
# tables of a store written by MLflow 3.17 (experiments, runs, registered versions, logged models).
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
    ("logged_models", "artifact_location"),
)
# MLflow's own wait for a lock, per statement (PRAGMA busy_timeout in mlflow/store/db/utils.py):
# what a lock taken after the store was opened, mid-command, costs before MLflow gives up.
MLFLOW_BUSY_TIMEOUT_S = 20
ARTIFACT_DIR = "mlartifacts"  # the folder name every workspace keeps its artifacts under (Workspace.artifact_root)


class RegistryBusy(Exception):
    """The registry's SQLite file stayed locked by another process for the whole bounded wait.

    Raised before the command read or wrote anything in the registry; `reason` is the busy part
    alone, for callers that did change something elsewhere (an ingest that stored images). Not
    transient (components.ops.transient): the wait was the retry, and the flows' retries would
    stretch the stated bound four-fold.
    """

    def __init__(self, masked_uri: str, waited: float) -> None:
        self.reason = f"registry busy: {masked_uri} is locked by another process (waited {waited:.0f} s)"
        super().__init__(f"{self.reason}; nothing was changed")


class RegistryDamaged(Exception):
    """The registry's SQLite file cannot be read as a database; the message names it and what to do."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"registry damaged: {path} is not a readable SQLite database ({why}); it holds the runs, "
            "versions and promotion log and is not derived from anything: restore it from a backup"
        )


@dataclass(frozen=True)
class Rebased:
    """Artifact locations moved from `old` (another folder's artifact root) onto `new`."""

    old: str
    new: str
    rows: int


def sqlite_path(uri: str) -> Path | None:
    """The file of a sqlite:/// tracking URI; None for a server, another database or an in-memory one."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def open_store(ws: Workspace) -> list[Rebased]:
    """Wait (bounded) until no other process holds the SQLite store locked, and rebase the
    embedded store's artifact locations when the workspace was copied or moved.

    Raises RegistryBusy when the wait runs out. What was rebased: nothing, mostly (and always
    for a server, or a store MLflow has not created yet).
    """
    path = sqlite_path(ws.tracking_uri)
    if path is None or not path.is_file():
        return []
    started = time.monotonic()
    con = sqlite3.connect(path, timeout=settings().registry_busy_timeout, isolation_level=None)
    try:
        try:
            con.execute("BEGIN IMMEDIATE")  # waits for another writer to finish, as MLflow's writes would
        except sqlite3.OperationalError as exc:
            if is_store_locked(exc):
                raise RegistryBusy(ws.masked_tracking_uri, time.monotonic() - started) from None
            _read_probe(con, ws, started)  # a store this process may only read (read-only files)
            return []
        except sqlite3.DatabaseError as exc:  # not a database at all: the header is gone
            raise RegistryDamaged(path, str(exc)) from None
        try:
            _check_intact(con, path)
            rebased = _rebase(con, ws) if ws.embedded_registry else []
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()
    for moved in rebased:
        logger.warning(
            "workspace moved from %s: artifact locations rebased to %s (%d rows)",
            _shown(moved.old).removesuffix(f"/{ARTIFACT_DIR}"),
            _shown(moved.new),
            moved.rows,
        )
    return rebased


def _check_intact(con: sqlite3.Connection, path: Path) -> None:
    """SQLite's quick check (milliseconds at a registry's size): a file cut short or overwritten
    in the middle fails it, before MLflow meets the damage half-way through a command."""
    try:
        verdict = con.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise RegistryDamaged(path, str(exc)) from None
    if verdict != "ok":
        raise RegistryDamaged(path, f"quick check: {verdict}")


def _read_probe(con: sqlite3.Connection, ws: Workspace, started: float) -> None:
    """Wait (bounded) until the store can be read, for a store that cannot take a write lock here."""
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if is_store_locked(exc):
            raise RegistryBusy(ws.masked_tracking_uri, time.monotonic() - started) from None
        if not isinstance(exc, sqlite3.OperationalError):  # not a database, or damaged
            raise RegistryDamaged(sqlite_path(ws.tracking_uri) or Path(ws.tracking_uri), str(exc)) from None


def _rebase(con: sqlite3.Connection, ws: Workspace) -> list[Rebased]:
    """Point every artifact location under another folder's mlartifacts/ at this workspace's."""
    here = ws.artifact_root.as_uri()
    # mnemo creates its experiments at exactly <root>/mlartifacts (ModelRegistry._experiment_id):
    # one at another root is the folder the store was written in.
    olds = {
        location
        for (location,) in con.execute("SELECT artifact_location FROM experiments")
        if location and location.endswith(f"/{ARTIFACT_DIR}") and location not in (here, str(ws.artifact_root))
    }
    done = []
    for old in sorted(olds):
        new = here if old.startswith("file:") else str(ws.artifact_root)
        rows = 0
        for table, column in ARTIFACT_COLUMNS:
            if column not in {row[1] for row in con.execute(f"PRAGMA table_info({table})")}:
                continue  # an older schema without this table or column
            rows += con.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # names from ARTIFACT_COLUMNS
                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                (new, len(old) + 1, old, len(old) + 1, f"{old}/"),
            ).rowcount
        done.append(Rebased(old=old, new=new, rows=rows))
    return done


def _shown(location: str) -> str:
    """A location as a path when it is a file URI."""
    return unquote(urlsplit(location).path) if location.startswith("file:") else location
