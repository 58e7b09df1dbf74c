"""The ingest flow: scan the inbox; validate, store and record each new arrival; make its
images queryable at once by appending them, embedded by the champion, to the live table.

`mnemo deploy` runs it on an interval (params schedule.inbox_interval); `mnemo ingest`
calls the same components directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from components.config import Params
from components.data.inbox import ingest_inbox
from components.data.ingest import IngestReport
from components.registry.promotion import HotAdd, Promoter
from components.workspace import Workspace, resolve_workspace
from flows.retries import TRANSIENT_RETRIES


@dataclass
class IngestSummary:
    arrivals: list[IngestReport] = field(default_factory=list)
    hot_add: HotAdd | None = None

    @property
    def message(self) -> str:
        """One line for the run's final state: what was stored, rejected, and made queryable."""
        ingested = [r for r in self.arrivals if r.status == "ingested"]
        unrecorded = [r for r in self.arrivals if r.status == "nothing_stored"]
        if not ingested and unrecorded:
            return "nothing stored: " + "; ".join(r.summary() for r in unrecorded)
        if not ingested:
            return "nothing to ingest: the inbox holds no new arrival"
        parts = ["; ".join(r.summary() for r in ingested)]
        if self.hot_add is not None and self.hot_add.table:
            parts.append(
                f"{self.hot_add.added} image(s) queryable now in {self.hot_add.table} (champion v{self.hot_add.version})"
            )
        elif self.hot_add is not None:
            parts.append("no champion yet: the first retrain indexes these images")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "arrivals": [asdict(r) for r in self.arrivals],
            "hot_add": None if self.hot_add is None else asdict(self.hot_add),
        }


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)  # a repeat is safe: an ingested arrival is a no-op
def ingest_arrivals(ws: Workspace, params: Params) -> list[IngestReport]:
    """Every pending arrival validated, stored (bad files quarantined with a reason) and recorded."""
    return ingest_inbox(ws, params.ingest)


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)  # a repeat is safe: rows are merged on their id
def make_queryable(ws: Workspace, params: Params) -> HotAdd:
    """Stored images the live table lacks, embedded by the champion and appended."""
    return Promoter(ws, params.registry, params.index).hot_add()


@flow(name="ingest", log_prints=True)
def ingest(params: Params, workspace: str | None = None) -> IngestSummary:
    """Ingest the inbox and hot-add what was stored; the final state's message says what happened."""
    ws = resolve_workspace(params, workspace)
    summary = IngestSummary(arrivals=ingest_arrivals(ws, params))
    if any(r.stored for r in summary.arrivals):
        summary.hot_add = make_queryable(ws, params)
    logger = get_run_logger()
    for report in summary.arrivals:  # rejections are in the summary; these need a person's eye
        for warning in report.warnings:
            logger.warning(warning)
    logger.info(summary.message)
    return finished(summary)  # type: ignore[return-value]  # Prefect unwraps a returned State: callers get its data


def finished(summary: IngestSummary) -> State:
    """A Completed state named after the outcome, carrying the summary as its result."""
    stored = any(r.status == "ingested" for r in summary.arrivals)
    return Completed(name="Ingested" if stored else "Nothing new", message=summary.message, data=summary)
