"""A workspace that survives damage: a table whose data file was cut short, a table deleted, a
model whose artifacts are gone. Nothing goes live on a store that cannot answer, and whoever
reads a damaged live pair (the service, `mnemo query`, `mnemo status`) gets one line naming what
is damaged, not a traceback. Real MLflow (SQLite) and LanceDB in tmp_path; the CLI as users run it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from components.data.catalog import Catalog
from components.registry.mlflow_registry import ModelRegistry
from components.registry.promotion import Promoter, PromotionRefused
from components.serving.app import create_app
from components.serving.live import LiveIndex
from flows.cli import app
from tests.integration.live_workspace import register_random, write_arrival

runner = CliRunner()


def cli(ws, params_file: Path, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, [*args, "--workspace", str(ws.root), "--params", str(params_file)])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    return result.output


def truncate(ws, table: str) -> None:
    """Every Lance data file of `table` cut to half its size (a disk that filled, a copy cut short)."""
    files = list((ws.root / "lancedb" / f"{table}.lance" / "data").glob("*.lance"))
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete(ws, table: str) -> None:
    shutil.rmtree(ws.root / "lancedb" / f"{table}.lance")


def stored_image(ws) -> Path:
    return ws.classes_dir / Catalog.load(ws.catalog).records()[0].id


def make_app(ws, params):
    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=60, runtime="torch")
    return create_app(live, params.serve, params.ingest, refresh_in_background=False)


def test_a_forced_promotion_never_goes_live_on_a_table_that_cannot_answer(live_ws, params, params_file):
    cli(live_ws, params_file, "promote", "2", "--reason", "v2 first")
    truncate(live_ws, "embeddings_v2")  # its metadata still reads: only its data is cut short
    cli(live_ws, params_file, "rollback")
    refused = cli(live_ws, params_file, "promote", "2", "--force", "--reason", "x", code=1)
    assert "embeddings_v2 cannot be read" in refused, refused
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["version"] == "1"  # the alias never moved
    assert status["champion"]["damaged"] is None


def test_a_rollback_never_goes_back_to_a_table_that_cannot_answer(live_ws, params, params_file):
    cli(live_ws, params_file, "promote", "2", "--reason", "v2 first")
    truncate(live_ws, "embeddings_v1")
    assert "embeddings_v1 cannot be read" in cli(live_ws, params_file, "rollback", code=1)
    assert json.loads(cli(live_ws, params_file, "status", "--json"))["champion"]["version"] == "2"


def test_a_table_whose_rows_fall_short_of_its_completeness_mark_is_refused(live_ws, params):
    import lancedb

    cut = Catalog.load(live_ws.catalog).records()[0].id
    lancedb.connect(live_ws.root / "lancedb").open_table("embeddings_v2").delete(f"id = '{cut}'")
    # the catch-up trusts the mark (it reads only images recorded since): the check counts the rows
    with pytest.raises(
        PromotionRefused, match="embeddings_v2 is incomplete: 59 rows, but its completeness mark promises 60"
    ):
        Promoter(live_ws, params.registry, params.index).promote("2", reason="x")
    assert ModelRegistry(live_ws, params.registry).champion().version == "1"


@pytest.mark.parametrize("damage", [truncate, delete])
def test_the_service_answers_503_naming_a_damaged_champion_table(live_ws, params, damage):
    damage(live_ws, "embeddings_v1")
    data = stored_image(live_ws).read_bytes()
    with TestClient(make_app(live_ws, params)) as client:
        health = client.get("/health")
        assert health.status_code == 503 and "embeddings_v1" in health.json()["detail"]
        for method, path in [("get", "/live"), ("get", "/random"), ("get", "/images/c0/x.png")]:
            r = getattr(client, method)(path)
            assert r.status_code == 503 and "embeddings_v1" in r.json()["detail"], (path, r.text)
        r = client.post("/query", files=[("image", ("q.png", data, "image/png"))])
        assert r.status_code == 503 and "embeddings_v1" in r.json()["detail"], r.text


def test_the_service_answers_503_when_the_live_table_is_damaged_under_it(live_ws, params):
    data = stored_image(live_ws).read_bytes()
    with TestClient(make_app(live_ws, params)) as client:
        assert client.post("/query", files=[("image", ("q.png", data, "image/png"))]).status_code == 200
        truncate(live_ws, "embeddings_v1")
        r = client.post("/query", files=[("image", ("q.png", data, "image/png"))])
        assert r.status_code == 503 and "embeddings_v1 cannot be read" in r.json()["detail"], r.text
        r = client.get("/random")
        assert r.status_code == 503 and "embeddings_v1 cannot be read" in r.json()["detail"], r.text


@pytest.mark.parametrize("damage", [truncate, delete])
def test_query_and_status_name_a_damaged_champion_table(live_ws, params, params_file, damage):
    damage(live_ws, "embeddings_v1")
    out = cli(live_ws, params_file, "query", str(stored_image(live_ws)), code=1)
    assert "error:" in out and "embeddings_v1" in out and "Traceback" not in out, out
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["version"] == "1" and "embeddings_v1" in status["champion"]["damaged"]
    assert status["data"]["images"] == 60  # the rest still printed
    human = cli(live_ws, params_file, "status")
    assert "damaged" in human and "embeddings_v1" in human


def test_query_names_a_champion_whose_model_artifacts_are_gone(live_ws, params, params_file):
    version = register_random(live_ws, params, seed=3)
    Promoter(live_ws, params.registry, params.index).reindex(version)
    cli(live_ws, params_file, "promote", version, "--reason", "its own artifacts, to delete")
    registry = ModelRegistry(live_ws, params.registry)
    model_id = registry.client.get_model_version(registry.name, version).source.removeprefix("models:/")
    # v3's own artifacts: only this test's registry knows them (v1's and v2's are the template's)
    shutil.rmtree(Path(registry.client.get_logged_model(model_id).artifact_location.removeprefix("file://")))
    out = cli(live_ws, params_file, "query", str(stored_image(live_ws)), code=1)
    assert "error:" in out and f"v{version}" in out and "Traceback" not in out, out


def test_status_says_how_many_stored_images_the_live_table_lacks(live_ws, params, params_file):
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["missing_rows"] == 0
    write_arrival(live_ws.inbox, "a1", ["n0", "n1"], 6, seed=9)
    from components.data.inbox import ingest_inbox

    ingest_inbox(live_ws, params.ingest)  # stored, not yet appended to the live table
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["missing_rows"] == 12 and status["champion"]["table_rows"] == 60
    human = cli(live_ws, params_file, "status")
    assert "12 stored image(s) missing" in " ".join(human.replace("│", " ").split()), human


def test_status_is_typed_and_get_status_has_its_schema(live_ws, params):
    from components.status import workspace_status

    status = workspace_status(live_ws, ModelRegistry(live_ws, params.registry), params.ingest)
    assert status.champion is not None and (status.champion.version, status.champion.damaged) == ("1", None)
    openapi = make_app(live_ws, params).openapi()
    ok = openapi["paths"]["/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].rsplit("/", 1)[1] == "WorkspaceStatus"
    champion = openapi["components"]["schemas"]["ChampionStatus"]["properties"]
    assert {"version", "table", "table_rows", "missing_rows", "damaged", "metrics"} <= set(champion)


def test_force_always_needs_a_reason(live_ws, params, params_file):
    refused = cli(
        live_ws, params_file, "promote", "2", "--force", code=1
    )  # v2 passed its gate: force overrides nothing
    assert "--force needs a --reason" in refused
    assert ModelRegistry(live_ws, params.registry).champion().version == "1"


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_a_missing_or_damaged_manifest_stops_every_writer_in_one_line(live_ws, params, params_file, damage):
    for k in (1, 2):  # three manifests in the chain, the middle one then damaged
        cli(live_ws, params_file, "ingest", str(write_arrival(live_ws.root / "drop", f"a{k}", [f"n{k}"], 3, seed=k)))
    manifests = live_ws.root / "data" / "arrivals"
    middle = sorted(manifests.glob("*.json"))[1]
    if damage == "delete":
        middle.unlink()
    else:
        middle.write_text('{"arrivals": {"a1": ')  # cut short
    (live_ws.root / "data" / "catalog.sqlite").unlink()  # the catalog is rebuilt from the manifests
    write_arrival(live_ws.inbox, "a3", ["n3"], 3, seed=3)
    for command in ("status", "ingest"):
        said = cli(live_ws, params_file, command, code=1)
        assert said.startswith("error: ") and middle.name in said and "dvc checkout" in said, said
        assert len(said.strip().splitlines()) == 1, said
    assert (
        (middle.exists() and middle.read_text() == '{"arrivals": {"a1": ')
        if damage == "garbage"
        else not middle.exists()
    )
    assert len(list(manifests.glob("*.json"))) == (3 if damage == "garbage" else 2)  # nothing written over the gap


def test_a_damaged_catalog_is_set_aside_and_rebuilt(live_ws, params, params_file):
    before = len(Catalog.load(live_ws.catalog).records())
    (live_ws.root / "data" / "catalog.sqlite").write_bytes(b"\x00garbage" * 512)
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["data"]["images"] == before
    assert list((live_ws.root / "data").glob("catalog.sqlite.damaged-*"))  # kept for a person to look at


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_a_damaged_registry_is_named_in_one_line_and_left_for_a_backup(live_ws, params_file, damage):
    db = live_ws.root / "mlflow.db"
    data = db.read_bytes()
    db.write_bytes(b"\x13garbage" * 4096 if damage == "garbage" else data[: len(data) // 3])
    damaged = db.read_bytes()
    for command in ("status", "query"):
        args = (command,) if command == "status" else (command, str(stored_image(live_ws)))
        said = cli(live_ws, params_file, *args, code=1)
        assert said.startswith("error: registry damaged: ") and "restore it from a backup" in said, said
        assert len(said.strip().splitlines()) == 1, said
    assert db.read_bytes() == damaged  # nothing derives it: left as found for a person to restore


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_lance_manifest_is_named_and_never_promoted(live_ws, params, params_file, damage):
    cli(live_ws, params_file, "promote", "2", "--reason", "v2 first")
    cli(live_ws, params_file, "rollback")
    versions = sorted((live_ws.root / "lancedb" / "embeddings_v2.lance" / "_versions").glob("*.manifest"))
    assert versions
    for path in versions:  # every version of the table's manifest: no older one to fall back to
        path.unlink() if damage == "delete" else path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused = cli(live_ws, params_file, "promote", "2", "--reason", "x", code=1)
    assert "embeddings_v2" in refused and len(refused.strip().splitlines()) == 1, refused
    assert ModelRegistry(live_ws, params.registry).champion().version == "1"
    # the champion's own manifest: status marks it, a query names it in one line
    for path in (live_ws.root / "lancedb" / "embeddings_v1.lance" / "_versions").glob("*.manifest"):
        path.unlink() if damage == "delete" else path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    status = json.loads(cli(live_ws, params_file, "status", "--json"))
    assert status["champion"]["version"] == "1" and "embeddings_v1" in status["champion"]["damaged"]
    said = cli(live_ws, params_file, "query", str(stored_image(live_ws)), code=1)
    assert said.startswith("error: ") and "embeddings_v1" in said and len(said.strip().splitlines()) == 1, said
