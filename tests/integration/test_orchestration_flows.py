"""The ingest and rollback flows, and the retrain flow's final states, on Prefect's ephemeral
server with real MLflow and LanceDB stores in tmp_path."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from components.data.catalog import Catalog
from components.data.inbox import ingest_inbox
from components.data.transforms import open_rgb
from components.registry.mlflow_registry import ModelRegistry
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex
from components.vectors.search import table_rows
from flows.cli import app
from flows.ingest import ingest
from flows.retrain import retrain
from flows.rollback import rollback
from tests.integration.live_workspace import write_arrival


def test_ingest_flow_makes_an_arrival_queryable_and_then_has_nothing_to_do(params, live_ws):
    ws = live_ws
    rows_before = table_rows(ws, "embeddings_v1")
    write_arrival(ws.inbox, "a1", ["d0", "d1"], 4, seed=5)
    (ws.inbox / "a1" / "d0" / "broken.png").write_bytes(b"not an image")

    state = ingest(params, str(ws.root), return_state=True)
    summary = state.result()
    assert state.is_completed() and state.name == "Ingested"
    assert [r.arrival for r in summary.arrivals] == ["a1"] and summary.arrivals[0].stored == 8
    assert summary.catch_up.table == "embeddings_v1" and summary.catch_up.added == 8
    assert "8 image(s) queryable now in embeddings_v1 (champion v1)" in state.message
    assert "broken.png" in summary.arrivals[0].rejected[0].file
    assert table_rows(ws, "embeddings_v1") == rows_before + 8
    assert not (ws.inbox / "a1").exists()

    again = ingest(params, str(ws.root), return_state=True)
    assert again.name == "Nothing new" and again.message == "nothing to ingest: the inbox holds no new arrival"


@pytest.mark.parametrize("entry", ["mnemo ingest", "ingest flow"])
def test_an_ingest_with_an_empty_inbox_makes_what_an_interrupted_one_stored_queryable(
    params, params_file, live_ws, entry
):
    """An ingest that stopped after storing its images but before appending them (here the data
    component stores them alone) leaves them out of the live table; the next ingest, with nothing
    in the inbox, brings the table level with the catalog: every stored image finds itself."""
    ws = live_ws
    rows_before = table_rows(ws, "embeddings_v1")
    write_arrival(ws.inbox, "a1", ["d0", "d1"], 4, seed=5)
    assert ingest_inbox(ws, params.ingest)[0].stored == 8  # stored and recorded, not appended
    assert table_rows(ws, "embeddings_v1") == rows_before and not (ws.inbox / "a1").exists()

    if entry == "mnemo ingest":
        common = ["--workspace", str(ws.root), "--params", str(params_file)]
        result = CliRunner().invoke(app, ["ingest", *common], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "queryable now: 8 image(s) appended to embeddings_v1" in result.stdout
    else:
        state = ingest(params, str(ws.root), return_state=True)
        assert state.is_completed() and state.result().catch_up.added == 8
        assert "8 image(s) stored earlier queryable now in embeddings_v1" in state.message

    records = Catalog.load(ws.catalog).records()
    assert table_rows(ws, "embeddings_v1") == len(records) == rows_before + 8
    pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=60).current()  # as `mnemo query` answers
    hits = pair.query([open_rgb(ws.classes_dir / r.id) for r in records], 1)
    assert [h[0]["id"] for h in hits] == [r.id for r in records]


def test_rollback_flow_moves_the_champion_back_and_refuses_with_a_reason(params, live_ws):
    ws = live_ws
    registry = ModelRegistry(ws, params.registry)
    Promoter(ws, params.registry, params.index).promote("2", table="embeddings_v2", reason="test", actor="pytest")

    state = rollback(params, str(ws.root), reason="v2 answers badly", return_state=True)
    assert state.is_completed() and state.name == "Rolled back"
    assert state.message == "rolled back: champion v2 -> v1 (table embeddings_v1)"
    assert registry.champion().version == "1"
    last = registry.log.entries()[-1]
    assert (last.kind, last.from_version, last.to_version, last.actor) == ("rollback", "2", "1", "rollback-flow")

    # v1 came before any logged promotion: nothing to go back to. The run fails saying so, the pair stays.
    refused = rollback(params, str(ws.root), return_state=True)
    assert refused.is_failed() and "nothing to roll back to" in refused.message
    assert registry.champion().version == "1"


def test_retrain_with_nothing_new_does_nothing_and_says_so(params, ws):
    state = retrain(params, str(ws.root), return_state=True)
    assert state.is_completed() and state.name == "Nothing new"
    assert state.message == "no arrivals ingested yet; live pair unchanged"
    assert state.result().status == "nothing_new"
