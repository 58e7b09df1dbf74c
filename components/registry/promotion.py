"""Moving the live pair: the one place the `champion` alias moves, and where the tables it
may move to are built and kept complete.

Every move (the retrain flow's promotion, `mnemo promote`, `mnemo rollback`, the rollback
flow) goes through `Promoter.promote`: the checks (a validated table written by the
version's own model; a passed gate unless forced; a passed smoke test), the table caught up
and proved able to answer (validate.verify_table, never skipped, forced or not), then the
alias move inside its promotion-log entry. `reindex` builds a registered version's table over
the whole catalog; `catch_up` brings the live table level with the catalog
(components/vectors/catch_up.py), after every ingest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from mlflow.exceptions import MlflowException

from components.config import Device, IndexParams, RegistryParams
from components.data.catalog import Catalog
from components.data.inbox import inbox_lock
from components.evaluation.compat import KeptVersion
from components.modeling.embedder import Embedder, pick_device
from components.ops.writer_lock import writer_lock
from components.registry.mlflow_registry import (
    CHAMPION,
    COMPATIBLE_TAG,
    INDEX_VALIDATED_TAG,
    SMOKE_DETAIL_TAG,
    SMOKE_TAG,
    VERDICT_TAG,
    ModelRegistry,
    ModelVersionInfo,
)
from components.registry.promotion_log import MoveKind, PromotionEntry, previous_champion
from components.training.compat import Transform
from components.vectors.build import IndexBuild, RowWriter, build_table, check_writable
from components.vectors.catch_up import CatchUp, catch_up
from components.vectors.compat import NotCompatible, start_compatible_table
from components.vectors.rows import stored_vectors
from components.vectors.tables import (
    TableDamaged,
    authorship_problem,
    check_readable,
    connect,
    is_validated,
    list_tables,
    open_table,
    table_name,
    table_version,
    written_by,
)
from components.vectors.validate import verify_table
from components.workspace import Workspace

log = logging.getLogger(__name__)


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
    except TableDamaged as exc:
        return table, [str(exc)]
    if not is_validated(tbl):
        return table, [f"v{info.version}'s index table {table} failed or never finished validation"]
    problem = authorship_problem(table, tbl.schema, info.version)
    return table, [] if problem is None else [problem]


@dataclass(frozen=True)
class ChampionMove:
    """Where a promotion or rollback left the champion; `entry` is None when the target already was champion."""

    version: str
    table: str
    entry: PromotionEntry | None
    kind: MoveKind = "promote"

    @property
    def state_name(self) -> str:
        """The name a flow run that made this move ends in."""
        return (
            "Rolled back"
            if self.entry is not None and self.entry.kind == "rollback"
            else ("Promoted" if self.entry is not None else "Unchanged")
        )

    @property
    def message(self) -> str:
        if self.entry is None:
            return f"v{self.version} is already the champion (table {self.table}); nothing changed"
        moved = f"champion v{self.entry.from_version or '-'} -> v{self.version} (table {self.table})"
        return f"rolled back: {moved}" if self.kind == "rollback" else moved


class Promoter:
    """Moves the live pair of one workspace and keeps the tables it may move to complete."""

    def __init__(self, ws: Workspace, registry: RegistryParams, index: IndexParams, device: Device = "auto") -> None:
        self.ws = ws
        self.index = index
        self.device = device  # train.device: where builds and catch-ups run the network
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
        table was built disappears from the answers, and proved able to answer (verify_table:
        `force` never skips it); the log records a forced promotion as such.
        """
        with writer_lock(self.ws, f"{kind} v{version}"):
            info = self.version(version)
            verb = f"roll back to v{info.version}" if kind == "rollback" else f"make v{info.version} champion"
            table, problems = table_problems(self.ws, self.index, info, table)
            problems += promotion_refusals(info, force=force, table=table if not problems else None)
            if force and not reason.strip():  # README: --force needs --reason, whether or not it overrides a check
                problems.append("--force needs a --reason, which the promotion log records")
            if problems:
                raise PromotionRefused(f"cannot {verb}: " + "; ".join(problems))
            forced = force and bool(promotion_refusals(info, table=table))  # force overrode a check
            if info.table != table:
                self.registry.record_index(info.version, table)
            with inbox_lock(self.ws):  # no ingest between the catch-up and the move
                tbl = open_table(connect(self.ws), self.ws, table)
                try:
                    check_readable(tbl)  # a damaged file is named here, not mid catch-up
                    catch_up(self.ws, self.index, tbl, info.version, self._model(info.version))
                    verify_table(self.ws, tbl, self.index)  # the table answers: only then may the alias move
                except TableDamaged as exc:
                    raise PromotionRefused(f"cannot {verb}: {exc}") from None
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

            return build_table(
                self.ws,
                self.index,
                version,
                model,
                Catalog.load(self.ws.catalog).records(),
                keep=keep,
                live=tables.get(CHAMPION),
                write=write,
                device=self.device,
            )

    def table_for(
        self,
        version: str,
        model: Embedder,
        *,
        compatible: bool,
        transform: Transform | None = None,
        write: RowWriter | None = None,
    ) -> IndexBuild:
        """The validated table `version` may go live on: started from the champion's vectors when the
        gate declared it `compatible` (vectors/compat.py; mapped by `transform`, if it has one) and
        the champion's table can seed it, else built whole over the catalog (reindex), as before."""
        champion = self.registry.champion() if compatible else None
        if champion is not None and champion.table:
            try:
                with writer_lock(self.ws, f"start v{version} on v{champion.version}'s vectors"):
                    tables = {t for v in self.registry.aliases().values() if (t := self.registry.get(v).table)}
                    built = start_compatible_table(
                        self.ws,
                        self.index,
                        version,
                        model.to(pick_device(self.device)).eval(),
                        (champion.version, champion.table),
                        Catalog.load(self.ws.catalog).records(),
                        transform=transform,
                        keep=tables,
                    )
                self.registry.set_tag(version, COMPATIBLE_TAG, champion.version)
                return built
            except NotCompatible as exc:
                log.warning("v%s is compatible, but %s: building its table whole", version, exc)
        return self.reindex(version, model, write)

    def kept_versions(self, loaded: Mapping[str, Embedder] | None = None) -> list[KeptVersion]:
        """The versions whose validated tables are kept (the rollback targets), oldest first: each
        one's model (`loaded`, else loaded from the registry when asked for) and stored vectors."""
        db, loaded = connect(self.ws), dict(loaded or {})
        kept = []
        for name in list_tables(db):
            if table_version(self.index.table_prefix, name) is None:
                continue
            try:
                tbl = open_table(db, self.ws, name)
            except (FileNotFoundError, TableDamaged):
                continue
            version = written_by(tbl)
            if version is None or not is_validated(tbl):
                continue
            model = (
                partial(_given, loaded[version]) if version in loaded else partial(self.registry.load_embedder, version)
            )
            kept.append(KeptVersion(version, model=model, stored=partial(stored_vectors, tbl)))
        return sorted(kept, key=lambda k: int(k.version))

    def catch_up(self) -> CatchUp:
        """The live table caught up with the catalog: every stored image it lacks, embedded by the
        champion's model, appended (components/vectors/catch_up.py).

        Every ingest calls it, the CLI's and the flow's, even with an empty inbox: whatever
        stopped an earlier ingest between storing and appending, this one makes those images
        queryable. With nothing missing it reads the table's completeness mark and no more.
        """
        champion = self.registry.champion()
        if champion is None or not champion.table:
            return CatchUp(version=None, table=None, appended=(), seconds=0.0)
        tbl = open_table(connect(self.ws), self.ws, champion.table)
        return catch_up(self.ws, self.index, tbl, champion.version, self._model(champion.version))

    def _model(self, version: str) -> Callable[[], Embedder]:
        """The version's network as the registry holds it, loaded when called (only when rows are missing)."""
        return lambda: self.registry.load_embedder(version).to(pick_device(self.device))


def _given(model: Embedder) -> Embedder:
    return model
