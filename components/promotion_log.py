"""The promotion log: every move of the `champion` alias (who, when, from, to, why).

MLflow keeps no alias history, so each move is also recorded as one run in the
experiment `<experiment>-promotions` (params from, to, reason, actor, kind; the run's
start time is the time of the move). It lives in the tracking store itself, so it works
the same against a local SQLite file and a remote MLflow server.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunStatus

MoveKind = Literal["promote", "rollback"]


@dataclass(frozen=True)
class PromotionEntry:
    """One move of the `champion` alias: when, from which version to which, why, and by whom."""

    time: str  # ISO 8601, UTC
    from_version: str | None
    to_version: str
    reason: str
    actor: str
    kind: MoveKind

    def to_dict(self) -> dict[str, str | None]:
        return {
            "time": self.time,
            "from": self.from_version,
            "to": self.to_version,
            "reason": self.reason,
            "actor": self.actor,
            "kind": self.kind,
        }


def default_actor() -> str:
    """Who is moving the alias: $MNEMO_ACTOR, else the login name."""
    try:
        return os.environ.get("MNEMO_ACTOR") or getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return "unknown"


def previous_champion(entries: list[PromotionEntry], current: str) -> str | None:
    """The champion before `current`: where the promotion that made `current` champion came from.

    Rollbacks are not promotions, so rolling back twice walks further back (v3 -> v2 -> v1)
    rather than toggling between two versions; None when nothing came before.
    """
    for entry in reversed(entries):
        if entry.kind == "promote" and entry.to_version == current:
            return entry.from_version
    return None


def _iso(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, tz=UTC).isoformat(timespec="milliseconds")


class PromotionLog:
    """The log of one registered model, kept as finished runs of the experiment `experiment`."""

    def __init__(
        self, client: MlflowClient, model_name: str, experiment: str, experiment_id: Callable[[str], str]
    ) -> None:
        self.client = client
        self.model_name = model_name
        self.experiment = experiment
        self._experiment_id = experiment_id  # creates the experiment on first use

    def _runs(self) -> list[Run]:
        """The finished runs of the log for this model, oldest first."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return []
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(
                [found.experiment_id],
                filter_string=f"tags.model_name = '{self.model_name}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                return sorted(runs, key=lambda r: r.info.start_time)

    def entries(self) -> list[PromotionEntry]:
        """The log, oldest first."""
        entries = []
        for run in self._runs():
            p = run.data.params
            entries.append(
                PromotionEntry(
                    time=_iso(run.info.start_time),
                    from_version=None if p.get("from", "none") == "none" else p["from"],
                    to_version=p["to"],
                    reason=p.get("reason", ""),
                    actor=p.get("actor", "unknown"),
                    kind=cast(MoveKind, p.get("kind", "promote")),
                )
            )
        return entries

    def record(
        self,
        from_version: str | None,
        to_version: str,
        *,
        reason: str,
        actor: str | None,
        kind: MoveKind,
        move: Callable[[], None],
    ) -> PromotionEntry:
        """Log one move around `move()` (the alias switch): a move that raises is not part of the log."""
        params = {
            "from": from_version or "none",
            "to": to_version,
            "reason": reason or "-",
            "actor": actor or default_actor(),
            "kind": kind,
        }
        last = self._runs()[-1:]
        start = max(
            int(time.time() * 1000), last[0].info.start_time + 1 if last else 0
        )  # the log stays strictly ordered
        run = self.client.create_run(
            self._experiment_id(self.experiment),
            start_time=start,
            tags={"model_name": self.model_name},
            run_name=f"{kind} v{params['from']} -> v{to_version}",
        )
        try:
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
            move()
        except Exception:
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))  # not part of the log
            raise
        self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED), end_time=start)
        return PromotionEntry(
            time=_iso(start),
            from_version=from_version,
            to_version=to_version,
            reason=params["reason"],
            actor=params["actor"],
            kind=kind,
        )
