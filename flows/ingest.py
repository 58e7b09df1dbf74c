"""The ingest flow: scan the inbox; validate, store and record each new arrival; then catch
the live table up with the catalog, so its images (and any an earlier, interrupted ingest
stored) are queryable at once, embedded by the champion.

`mnemo deploy` runs it on an interval (params schedule.inbox_interval); `mnemo ingest`
calls the same components directly; the retrain flow runs the same catch-up task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.config import Params
from components.data.inbox import ingest_inbox
from components.data.ingest import IngestReport
from components.registry.promotion import Promoter
from components.vectors.catch_up import CatchUp
from components.workspace import Workspace, resolve_workspace
from flows.retries import TRANSIENT_RETRIES
from flows.states import finished


@dataclass
class IngestSummary:
    arrivals: list[IngestReport] = field(default_factory=list)
    catch_up: CatchUp | None = None

    @property
    def state_name(self) -> str:
        return "Ingested" if any(r.status == "ingested" for r in self.arrivals) else "Nothing new"

    @property
    def message(self) -> str:
        """One line for the run's final state: what was stored, rejected, and made queryable."""
        ingested = [r for r in self.arrivals if r.status == "ingested"]
        unrecorded = [r for r in self.arrivals if r.status == "nothing_stored"]
        if not ingested and unrecorded:
            return "nothing stored: " + "; ".join(r.summary() for r in unrecorded)
        caught = self.catch_up
        if not ingested:
            if caught is not None and caught.added:  # stored by an ingest that stopped before appending them
                return (
                    "nothing to ingest: the inbox holds no new arrival; "
                    f"{caught.added} image(s) stored earlier queryable now in {caught.table} (champion v{caught.version})"
                )
            return "nothing to ingest: the inbox holds no new arrival"
        parts = ["; ".join(r.summary() for r in ingested)]
        if caught is not None and caught.table:
            parts.append(f"{caught.added} image(s) queryable now in {caught.table} (champion v{caught.version})")
        elif caught is not None:
            parts.append("no champion yet: the first retrain indexes these images")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "arrivals": [asdict(r) for r in self.arrivals],
            "hot_add": None if self.catch_up is None else self.catch_up.to_dict(),  # the key scripts read
        }


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)  # a repeat is safe: an ingested arrival is a no-op
def ingest_arrivals(ws: Workspace, params: Params) -> list[IngestReport]:
    """Every pending arrival validated, stored (bad files quarantined with a reason) and recorded."""
    return ingest_inbox(ws, params.ingest)


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)  # a repeat is safe: rows are merged on their id
def catch_up(ws: Workspace, params: Params) -> CatchUp:
    """The live table caught up with the catalog: stored images it lacks, embedded by the champion, appended."""
    return Promoter(ws, params.registry, params.index, params.train.device).catch_up()


@flow(name="ingest", log_prints=True)
def ingest(params: Params, workspace: str | None = None) -> IngestSummary:
    """Ingest the inbox, then catch the live table up (also with an empty inbox: an earlier ingest
    may have stopped after storing); the final state's message says what happened."""
    ws = resolve_workspace(params, workspace)
    summary = IngestSummary(arrivals=ingest_arrivals(ws, params))
    summary.catch_up = catch_up(ws, params)
    logger = get_run_logger()
    for report in summary.arrivals:  # rejections are in the summary; these need a person's eye
        for warning in report.warnings:
            logger.warning(warning)
    return finished(summary)  # type: ignore[return-value]  # Prefect unwraps a returned State: callers get its data
