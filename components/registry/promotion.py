"""Moving the live pair: the one place the `champion` alias moves, and where the tables it
may move to are built and kept complete.

Every move (the retrain flow's promotion, `mnemo promote`, `mnemo rollback`, the rollback
flow) goes through `Promoter.promote`: the checks (a validated table written by the
version's own model; a passed gate unless forced; a passed smoke test), then the alias
move inside its promotion-log entry. `reindex` builds a registered version's table over
the whole catalog; `hot_add` appends newly stored images to the live table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from components.config import IndexParams, RegistryParams
from components.data.catalog import Catalog, ImageRecord
from components.data.inbox import inbox_lock
from components.modeling.embedder import Embedder
from components.ops.writer_lock import writer_lock
from components.registry.mlflow_registry import (
    CHAMPION,
    INDEX_VALIDATED_TAG,
    SMOKE_DETAIL_TAG,
    SMOKE_TAG,
    VERDICT_TAG,
    ModelRegistry,
    ModelVersionInfo,
)
from components.registry.promotion_log import MoveKind, PromotionEntry, previous_champion
from components.vectors.build import (
    IndexBuild,
    IndexBuildError,
    RowWriter,
    append_missing,
    build_table,
    check_writable,
    missing_rows,
    retune_ann_index,
    settle_appends,
)
from components.vectors.tables import (
    CATALOG_SEQ,
    connect,
    ensure_id_index,
    is_validated,
    open_table,
    set_vector_metadata,
    table_name,
    vector_metadata,
    written_by,
)
from components.workspace import Workspace


class PromotionRefused(RuntimeError):
    """A version may not become champion; the message gives every reason."""


class UnknownVersion(PromotionRefused):
    """The registered model has no such version."""


def promotion_refusals(info: ModelVersionInfo, *, force: bool = False, table: str | None = None) -> list[str]:
    """Why `info` may not carry `champion` by its tags (empty when it may): promotion fails closed.

    A version needs a validated table, a passed gate and a passed smoke test. `force` yields
    only on the gate verdict (failed or missing) and a missing smoke test, never on the table
    or a failed smoke test.

    `table` is a validated table found for the version beyond its tag (one built later by
    `mnemo reindex V`); whether it exists is `table_problems`' check.
    """
    v = info.version
    problems = []
    if not (table or info.table):
        problems.append(f"v{v} has no validated index table (build one with `mnemo reindex {v}`)")
    if info.tags.get(INDEX_VALIDATED_TAG) == "false":
        problems.append(f"v{v}'s index table {info.table} failed validation")
    if info.tags.get(SMOKE_TAG) == "failed":
        problems.append(f"v{v} failed the index smoke test ({info.tags.get(SMOKE_DETAIL_TAG, 'no detail')})")
    if not force:
        verdict = info.tags.get(VERDICT_TAG)
        if verdict == "reject":
            problems.append(f"v{v} failed the gate (see `mnemo status`); --force promotes it anyway")
        elif verdict != "promote":
            problems.append(f"v{v} was never gated (no gate verdict); --force promotes it anyway")
        if info.tags.get(SMOKE_TAG) is None:
            problems.append(f"v{v} was never smoke-tested against its table; --force promotes it anyway")
    return problems


def table_problems(
    ws: Workspace, params: IndexParams, info: ModelVersionInfo, table: str | None = None
) -> tuple[str, list[str]]:
    """The version's table (`table`, its tag, else the conventional name) and why it may not go live:
    gone from the store (pruned), never validated, or written by another model version."""
    table = table or info.table or table_name(params.table_prefix, info.version)
    try:
        tbl = open_table(connect(ws), ws, table)
    except FileNotFoundError:
        return table, [f"v{info.version}'s index table {table} is missing from {ws.lancedb_uri}"]
    problems = []
    if not is_validated(tbl):
        problems.append(f"v{info.version}'s index table {table} failed or never finished validation")
    if written_by(tbl) not in (None, info.version):
        problems.append(f"index table {table} was written by model version {written_by(tbl)}, not v{info.version}")
    return table, problems


@dataclass(frozen=True)
class ChampionMove:
    """Where a promotion or rollback left the champion; `entry` is None when the target already was champion."""

    version: str
    table: str
    entry: PromotionEntry | None
    kind: MoveKind = "promote"

    @property
    def message(self) -> str:
        if self.entry is None:
            return f"v{self.version} is already the champion (table {self.table}); nothing changed"
        moved = f"champion v{self.entry.from_version or '-'} -> v{self.version} (table {self.table})"
        return f"rolled back: {moved}" if self.kind == "rollback" else moved


@dataclass(frozen=True)
class HotAdd:
    """Images appended to the live table right after ingest (none when there is no champion yet)."""

    version: str | None
    table: str | None
    added: int
    seconds: float


class Promoter:
    """Moves the live pair of one workspace and keeps the tables it may move to complete."""

    def __init__(self, ws: Workspace, registry: RegistryParams, index: IndexParams) -> None:
        self.ws = ws
        self.index = index
        self.registry = ModelRegistry(ws, registry)

    def version(self, version: str) -> ModelVersionInfo:
        """The registered version, or UnknownVersion naming what is not there."""
        try:
            return self.registry.get(version)
        except MlflowException:
            raise UnknownVersion(f"{self.registry.name} has no version {version!r}") from None

    def promote(
        self,
        version: str,
        *,
        table: str | None = None,
        reason: str = "",
        actor: str | None = None,
        force: bool = False,
        kind: MoveKind = "promote",
    ) -> ChampionMove:
        """Make `version` champion with its table, logged; raises PromotionRefused with every reason.

        `table` is the table just built for it (the retrain flow), recorded on the version when
        its tag says otherwise. Before the alias moves, the table is caught up with every stored
        image (embedded by its own model) under the ingest lock, so no image ingested since the
        table was built disappears from the answers; the log records a forced promotion as such.
        """
        with writer_lock(self.ws, f"{kind} v{version}"):
            info = self.version(version)
            table, problems = table_problems(self.ws, self.index, info, table)
            problems += promotion_refusals(info, force=force, table=table if not problems else None)
            if problems:
                verb = f"roll back to v{info.version}" if kind == "rollback" else f"make v{info.version} champion"
                raise PromotionRefused(f"cannot {verb}: " + "; ".join(problems))
            forced = force and bool(promotion_refusals(info, table=table))  # force overrode a check
            if forced and not reason.strip():
                raise PromotionRefused(
                    f"cannot force v{info.version}: --force needs a --reason, which the promotion log records"
                )
            if info.table != table:
                self.registry.record_index(info.version, table)
            with inbox_lock(self.ws):  # no ingest between the catch-up and the move
                self.catch_up(info.version, table)
                current = self.registry.champion()
                if current is not None and current.version == info.version:
                    return ChampionMove(info.version, table, None, kind)
                entry = self.registry.log.record(
                    current.version if current else None,
                    info.version,
                    reason=reason,
                    actor=actor,
                    kind=kind,
                    forced=forced,
                    move=lambda: self.registry.set_alias(CHAMPION, info.version),
                )
            return ChampionMove(info.version, table, entry, kind)

    def rollback_target(self, to: str | None = None) -> str:
        """The version a rollback moves `champion` to: `to`, else the champion before the current one.

        Raises PromotionRefused, saying why, when there is nothing to roll back to.
        """
        if to is not None:
            return str(to)
        entries = self.registry.log.entries()
        name = self.registry.name
        if not entries:
            raise PromotionRefused(
                f"nothing to roll back to: the promotion log of {name} is empty "
                "(no version was ever promoted with it); name a version with --to"
            )
        current = self.registry.champion()
        if current is None:
            raise PromotionRefused(f"{name} has no champion to roll back from; promote a version instead")
        previous = previous_champion(entries, current.version)
        if previous is None:
            raise PromotionRefused(
                f"nothing to roll back to: v{current.version} has no earlier champion in the "
                f"promotion log ({len(entries)} entries); name a version with --to"
            )
        return previous

    def rollback(self, to: str | None = None, *, reason: str = "", actor: str | None = None) -> ChampionMove:
        """Move `champion` back: to the previous champion in the log, or to `to`.

        A version that served before may return without passing the gate again; any
        other needs a passed gate. The index checks always apply.
        """
        with writer_lock(self.ws, "rollback"):
            target = self.version(self.rollback_target(to)).version
            current = self.registry.champion()
            served_before = target in {e.to_version for e in self.registry.log.entries()}
            default = f"rollback from v{current.version}" if current else "rollback"
            return self.promote(target, reason=reason or default, actor=actor, force=served_before, kind="rollback")

    def reindex(self, version: str, model: Embedder | None = None, write: RowWriter | None = None) -> IndexBuild:
        """Build and validate the table of a registered version over the whole catalog (the alias does not move).

        Tables that an alias (champion, challenger) points at are protected from the clean-up;
        the model is loaded from the registry when not given, exactly as readers will load it.
        """
        with writer_lock(self.ws, f"re-index v{version}"):
            check_writable(self.ws)  # before the model is loaded: a read-only store fails in a second
            tables = {alias: self.registry.get(v).table for alias, v in self.registry.aliases().items()}
            keep = {table for table in tables.values() if table}
            model = model if model is not None else self.registry.load_embedder(version)

            def catalog() -> list[ImageRecord]:
                return Catalog.load(self.ws.catalog).records()

            return build_table(
                self.ws,
                self.index,
                version,
                model,
                catalog(),
                keep=keep,
                live=tables.get(CHAMPION),
                catch_up=catalog,
                write=write,
            )

    def hot_add(self) -> HotAdd:
        """Embed stored images the live table lacks with the champion's model and append them.

        Called after every ingest, so new classes are queryable before the next retrain. It
        appends whatever is missing, not only the last arrival's images.
        """
        start = time.perf_counter()
        champion = self.registry.champion()
        if champion is None or not champion.table:
            return HotAdd(version=None, table=None, added=0, seconds=time.perf_counter() - start)
        added = self.catch_up(champion.version, champion.table)
        return HotAdd(version=champion.version, table=champion.table, added=added, seconds=time.perf_counter() - start)

    def catch_up(self, version: str, table: str) -> int:
        """Append every stored image `table` lacks, embedded by `version`'s own model; how many were added.

        Rows are merged on their id, so two catch-ups racing on one table never duplicate a row;
        the model is loaded only when something is missing.
        """
        tbl = open_table(connect(self.ws), self.ws, table)
        if written_by(tbl) not in (None, version):
            raise IndexBuildError(
                f"table {table} was written by model version {written_by(tbl)}, "
                f"not by v{version}; refusing to mix embeddings"
            )
        ensure_id_index(tbl)  # tables built before it had none: built once, then every hot add uses it
        missing, reached = missing_rows(tbl, Catalog.load(self.ws.catalog))
        if missing:
            append_missing(tbl, self.ws, self.registry.load_embedder(version), missing, self.index)
            retune_ann_index(tbl, self.index)  # the index follows the table's size (params.yaml: ann_*)
        if reached is not None and vector_metadata(tbl, CATALOG_SEQ) != reached:
            set_vector_metadata(tbl, CATALOG_SEQ, reached)
        if missing:  # readers mid-query keep their version's files
            settle_appends(tbl, self.index)
        return len(missing)
