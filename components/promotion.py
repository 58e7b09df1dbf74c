"""Moving the live pair by hand: the index checks a version's table must pass before it may
serve, and the rollback that `mnemo rollback` and the rollback flow both run."""

from __future__ import annotations

from dataclasses import dataclass

from components.config import IndexParams, Params, Workspace
from components.index import connect, is_validated, open_table, table_name, written_by
from components.registry import ModelRegistry, ModelVersionInfo, PromotionEntry, PromotionRefused


def table_problems(ws: Workspace, params: IndexParams, info: ModelVersionInfo) -> tuple[str, list[str]]:
    """The version's table (its tag, else the conventional name) and why it may not go live:
    gone from the store (pruned), never validated, or written by another model version."""
    table = info.table or table_name(params.table_prefix, info.version)
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
class Rollback:
    """Where a rollback left the champion; `entry` is None when the target already was champion."""

    version: str
    table: str
    entry: PromotionEntry | None

    @property
    def message(self) -> str:
        if self.entry is None:
            return f"v{self.version} is already the champion; nothing changed"
        return f"rolled back: champion v{self.entry.from_version or '-'} -> v{self.version} (table {self.table})"


def roll_back(ws: Workspace, params: Params, to: str | None = None, *, reason: str = "", actor: str | None = None) -> Rollback:
    """Move `champion` back to the previous champion (or `to`) with its table; logged in the promotion log.

    Raises PromotionRefused, with every reason, when there is nothing to go back to or the
    target's table is missing, unvalidated or not its own; the live pair then stays as it is.
    """
    registry = ModelRegistry(ws, params.registry)
    target = registry.get(registry.rollback_target(to))
    table, problems = table_problems(ws, params.index, target)
    if problems:
        raise PromotionRefused(f"cannot roll back to v{target.version}: " + "; ".join(problems))
    return Rollback(target.version, table, registry.rollback(target.version, table=table, reason=reason, actor=actor))
