"""The promotion log: every move of the `champion` alias (who, when, from, to, why).

MLflow keeps no alias history, so each move is also recorded as one run in the
experiment `<experiment>-promotions` (params from, to, reason, actor, kind, forced; the
run's start time is the time of the move). It lives in the tracking store itself, so it
works the same against a local SQLite file and a remote MLflow server.

The entry is written ahead of the move: the run is created RUNNING with its params, then
the alias moves, then the run is marked FINISHED. A crash between the alias move and the
finish leaves a RUNNING entry whose target is the champion: readers count it (the move
happened), and the next move marks it FINISHED. A RUNNING entry whose target is not the
champion is a move that never happened: readers skip it, the next move marks it FAILED.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunStatus

from components.ops.failpoints import failpoint
from components.workspace import settings

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
    forced: bool = False  # promoted with --force past a failed or missing gate verdict or smoke test

    def to_dict(self) -> dict[str, str | bool | None]:
        return {
            "time": self.time,
            "from": self.from_version,
            "to": self.to_version,
            "reason": self.reason,
            "actor": self.actor,
            "kind": self.kind,
            "forced": self.forced,
        }


def default_actor() -> str:
    """Who is moving the alias: $MNEMO_ACTOR, else the login name."""
    try:
        return settings().actor or getpass.getuser()
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
    """The log of one registered model, kept as runs of the experiment `experiment`.

    `champion` reads where the alias points now: it decides whether an unfinished entry's
    move happened (see the module docstring).
    """

    def __init__(
        self,
        client: MlflowClient,
        model_name: str,
        experiment: str,
        experiment_id: Callable[[str], str],
        champion: Callable[[], str | None],
    ) -> None:
        self.client = client
        self.model_name = model_name
        self.experiment = experiment
        self._experiment_id = experiment_id  # creates the experiment on first use
        self._champion = champion

    def _runs(self) -> list[Run]:
        """The log's runs for this model (finished or not, with their params), oldest first."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return []
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(
                [found.experiment_id],
                filter_string=f"tags.model_name = '{self.model_name}'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
                page_token=token,
            )
            runs += [r for r in page if r.info.status in ("FINISHED", "RUNNING") and "to" in r.data.params]
            token = page.token
            if not token:
                return sorted(runs, key=lambda r: r.info.start_time)

    def _counted(self, runs: list[Run]) -> list[Run]:
        """The runs that are moves that happened: the finished ones, and the newest run if it is
        unfinished and the alias points at its target (a crash fell between the move and the finish)."""
        counted = [r for r in runs if r.info.status == "FINISHED"]
        if runs and runs[-1].info.status == "RUNNING" and self._champion() == runs[-1].data.params["to"]:
            counted.append(runs[-1])
        return counted

    def entries(self) -> list[PromotionEntry]:
        """The log, oldest first."""
        return [_entry(run) for run in self._counted(self._runs())]

    def reconcile(self) -> list[Run]:
        """Settle unfinished entries left by a crash (FINISHED when the move happened, else FAILED);
        the runs that count, oldest first. Called by the writer before each move."""
        runs = self._runs()
        counted = self._counted(runs)
        happened = {r.info.run_id for r in counted}
        for run in runs:
            if run.info.status == "RUNNING":
                done = RunStatus.FINISHED if run.info.run_id in happened else RunStatus.FAILED
                self.client.set_terminated(run.info.run_id, RunStatus.to_string(done), end_time=run.info.start_time)
        return counted

    def record(
        self,
        from_version: str | None,
        to_version: str,
        *,
        reason: str,
        actor: str | None,
        kind: MoveKind,
        move: Callable[[], None],
        forced: bool = False,
    ) -> PromotionEntry:
        """Log one move around `move()` (the alias switch), written ahead; a move that raises is not part of the log."""
        params = {
            "from": from_version or "none",
            "to": to_version,
            "reason": reason or "-",
            "actor": actor or default_actor(),
            "kind": kind,
            "forced": str(forced).lower(),
        }
        last = self.reconcile()[-1:]
        start = max(int(time.time() * 1000), last[0].info.start_time + 1 if last else 0)  # strictly ordered
        run = self.client.create_run(
            self._experiment_id(self.experiment),
            start_time=start,
            tags={"model_name": self.model_name},
            run_name=f"{kind} v{params['from']} -> v{to_version}",
        )
        try:
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
            failpoint("promotion-log-written")
            move()
            failpoint("alias-moved")
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
            forced=forced,
        )


def _entry(run: Run) -> PromotionEntry:
    p = run.data.params
    return PromotionEntry(
        time=_iso(run.info.start_time),
        from_version=None if p.get("from", "none") == "none" else p["from"],
        to_version=p["to"],
        reason=p.get("reason", ""),
        actor=p.get("actor", "unknown"),
        kind=cast(MoveKind, p.get("kind", "promote")),
        forced=p.get("forced") == "true",
    )
