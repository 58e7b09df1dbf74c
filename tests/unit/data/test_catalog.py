"""The catalog's storage: one manifest per arrival (what DVC versions) and a SQLite database derived
from them, rebuilt when the manifests change under it, and caught up after a crash between the
manifest and the database commit."""

from __future__ import annotations

import json
import logging
import random
import shutil

import pytest

from components.data.catalog import Catalog
from components.data.inbox import ingest_inbox
from components.data.ingest import ingest_arrival
from components.data.manifests import ManifestDamaged
from tests.unit.data.test_ingest_corpus import arrival_of, png


def ingest(tmp_path, ws, params, name: str, classes: dict[str, list[int]]):
    root = arrival_of(tmp_path / name, {c: [png(i) for i in seeds] for c, seeds in classes.items()})
    return ingest_arrival(root, ws, params.ingest)


def snapshot(catalog: Catalog) -> dict:
    return {
        "arrivals": catalog.arrivals,
        "classes": dict(catalog.classes.items()),
        "images": dict(catalog.images.items()),
        "seqs": [(r.id, r.seq) for r in catalog.records()],
    }


def test_each_arrival_writes_one_manifest_and_the_database_follows_them(tmp_path, ws, params):
    ingest(tmp_path, ws, params, "a1", {"x": [1, 2, 3], "y": [4, 5], "z": [6]})
    ingest(tmp_path, ws, params, "a2", {"z": [7], "w": [8, 9]})  # completes pending z
    manifests = sorted(p.name for p in (ws.catalog.parent / "arrivals").iterdir())
    assert manifests == ["000001.json", "000002.json"]
    second = json.loads((ws.catalog.parent / "arrivals" / "000002.json").read_text())
    assert set(second["arrivals"]) == {"a2"} and {m["class"] for m in second["images"].values()} == {"z", "w"}

    catalog = Catalog.load(ws.catalog)
    assert catalog.classes["z"]["split"] in ("train", "unseen") and len(catalog.class_images("z")) == 2
    before, version = snapshot(catalog), catalog.version()
    assert [r.seq for r in catalog.records_since(0)] == list(range(1, 10))
    assert {r.arrival for r in catalog.records_since(6)} == {"a2"}

    catalog.close()
    ws.catalog.unlink()  # a fresh `dvc checkout`: the manifests only
    rebuilt = Catalog.load(ws.catalog)
    assert snapshot(rebuilt) == before and rebuilt.version() == version != "none"


def test_other_manifests_checked_out_rebuild_the_database(tmp_path, ws, params):
    ingest(tmp_path, ws, params, "a1", {"x": [1, 2], "y": [3, 4]})
    arrivals = ws.catalog.parent / "arrivals"
    kept = tmp_path / "kept"
    shutil.copytree(arrivals, kept)
    ingest(tmp_path, ws, params, "a2", {"w": [8, 9]})
    assert len(Catalog.load(ws.catalog).images) == 6

    shutil.rmtree(arrivals)
    shutil.copytree(kept, arrivals)  # an older data version, as `dvc checkout` brings it
    older = Catalog.load(ws.catalog)
    assert sorted(older.arrivals) == ["a1"] and len(older.images) == 4


def test_a_manifest_the_database_missed_is_applied_on_the_next_load(tmp_path, ws, params, monkeypatch):
    """A crash after the manifest is written and before the database commits."""
    import components.data.catalog as catalog_module

    ingest(tmp_path, ws, params, "a1", {"x": [1, 2], "y": [3, 4]})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(catalog_module, "_apply", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path, ws, params, "a2", {"w": [8, 9]})
    monkeypatch.undo()
    catalog = Catalog.load(ws.catalog)
    assert sorted(catalog.arrivals) == ["a1", "a2"] and len(catalog.images) == 6


def test_reading_rows_records_nothing_and_two_writers_each_get_their_own_manifest(tmp_path, ws, params):
    ingest(tmp_path, ws, params, "a1", {"x": [1, 2], "y": [3, 4]})
    arrivals = ws.catalog.parent / "arrivals"
    reader = Catalog.load(ws.catalog)
    assert reader.classes["x"]["split"] and reader.images[reader.class_images("y")[0]]["class"] == "y"
    reader.save()  # read, not changed: no manifest
    assert len(list(arrivals.iterdir())) == 1

    first, second = Catalog.load(ws.catalog), Catalog.load(ws.catalog)
    first.arrivals["b1"] = {"name": "b1"}
    first.save()
    second.arrivals["b2"] = {"name": "b2"}  # loaded before first saved
    second.save()
    assert sorted(p.name for p in arrivals.iterdir()) == ["000001.json", "000002.json", "000003.json"]
    assert sorted(Catalog.load(ws.catalog).arrivals) == ["a1", "b1", "b2"]


def two_arrivals(tmp_path, ws, params) -> dict:
    ingest(tmp_path, ws, params, "a1", {"x": [1, 2], "y": [3, 4]})
    ingest(tmp_path, ws, params, "a2", {"w": [5, 6]})
    ingest(tmp_path, ws, params, "a3", {"v": [7, 8]})
    catalog = Catalog.load(ws.catalog)
    before = snapshot(catalog)
    catalog.close()
    return before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
def test_a_damaged_catalog_database_is_set_aside_and_rebuilt(tmp_path, ws, params, damage, caplog):
    before = two_arrivals(tmp_path, ws, params)
    data = ws.catalog.read_bytes()
    damaged = data[: len(data) // 2] if damage == "truncated" else random.Random(0).randbytes(len(data))
    if damage == "deleted":
        ws.catalog.unlink()
    else:
        ws.catalog.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="components.data.catalog"):
        catalog = Catalog.load(ws.catalog)
    assert snapshot(catalog) == before
    aside = sorted(p.name for p in ws.catalog.parent.glob("catalog.sqlite.damaged-*"))
    if damage == "deleted":  # nothing to set aside: built again from the manifests, as after a dvc checkout
        assert aside == [] and not caplog.records
    else:
        assert len(aside) == 1 and (ws.catalog.parent / aside[0]).read_bytes() == damaged  # kept, not lost
        (line,) = [r.getMessage() for r in caplog.records]
        assert aside[0] in line and "rebuilding it from the manifests" in line and "\n" not in line
    assert ingest(tmp_path, ws, params, "a4", {"u": [9, 10]}).status == "ingested"  # and writers go on


@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
@pytest.mark.parametrize("which", ["000002.json", "000003.json"])
def test_a_damaged_or_missing_manifest_stops_writers_with_one_line(tmp_path, ws, params, damage, which, caplog):
    before = two_arrivals(tmp_path, ws, params)
    arrivals = ws.catalog.parent / "arrivals"
    manifest = arrivals / which
    text = manifest.read_bytes()
    if damage == "truncated":
        manifest.write_bytes(text[: len(text) // 2])
    elif damage == "garbage":
        manifest.write_bytes(random.Random(0).randbytes(len(text) + 1))
    else:
        manifest.unlink()
    if damage == "deleted" and which == "000003.json":
        # the last one gone looks like an older data version checked out: rebuilt from the rest, said
        with caplog.at_level(logging.WARNING, logger="components.data.catalog"):
            assert sorted(Catalog.load(ws.catalog).arrivals) == ["a1", "a2"]
        assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
            "2 manifest(s) where the catalog was built from 3: rebuilding it from those there"
        ]
        return
    arrival_of(ws.inbox / "a5", {"t": [png(11), png(12)]})
    for attempt in (
        lambda: Catalog.load(ws.catalog),
        lambda: ingest(tmp_path, ws, params, "a4", {"u": [9, 10]}),
        lambda: ingest_inbox(ws, params.ingest),
    ):
        with pytest.raises(ManifestDamaged) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"{manifest}: manifest ") and "dvc checkout" in message and "\n" not in message
    assert {p.name for p in arrivals.iterdir()} <= {"000001.json", "000002.json", "000003.json"}  # none new
    assert not list(ws.classes_dir.glob("u/*")) and (ws.inbox / "a5").is_dir()  # the refused ingests kept nothing
    if damage == "deleted":
        assert not manifest.exists()  # never written over
    manifest.write_bytes(text)  # restored (dvc checkout): all is as it was
    assert snapshot(Catalog.load(ws.catalog)) == before
