"""The catalog's storage: one manifest per arrival (what DVC versions) and a SQLite database derived
from them, migrated once from the one-file registry.json, rebuilt when the manifests change under
it, and caught up after a crash between the manifest and the database commit."""

from __future__ import annotations

import json
import shutil

import pytest

from components.data.catalog import Catalog
from components.data.ingest import ingest_arrival
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


def test_a_one_file_registry_is_migrated_once_and_nothing_is_lost(tmp_path, ws, params):
    images = {f"c{i % 3}/{i:032x}.png": {"class": f"c{i % 3}", "arrival": "old", "role": "train"} for i in range(9)}
    legacy = {
        "arrivals": {"old": {"name": "old", "stored": 9}},
        "classes": {f"c{i}": {"arrival": "old", "split": "train"} for i in range(3)},
        "images": images,
    }
    ws.catalog.parent.mkdir(parents=True)
    (ws.catalog.parent / "registry.json").write_text(json.dumps(legacy))

    catalog = Catalog.load(ws.catalog)
    assert dict(catalog.images.items()) == images and catalog.arrivals == legacy["arrivals"]
    assert not (ws.catalog.parent / "registry.json").exists()
    assert json.loads((ws.catalog.parent / "registry.json.migrated").read_text()) == legacy
    again = Catalog.load(ws.catalog)  # once: the manifest is there now
    assert len(again.images) == 9 and len(list((ws.catalog.parent / "arrivals").iterdir())) == 1


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


def test_a_migration_that_died_before_its_manifest_starts_over(tmp_path, ws, params):
    from components.data.catalog import _connect

    legacy = {"arrivals": {"old": {}}, "classes": {"c": {"arrival": "old", "split": "train"}}, "images": {}}
    legacy["images"] = {f"c/{i:032x}.png": {"class": "c", "arrival": "old", "role": "train"} for i in range(3)}
    ws.catalog.parent.mkdir(parents=True)
    (ws.catalog.parent / "registry.json").write_text(json.dumps(legacy))
    _connect(ws.catalog).close()  # the database was created, then the process died
    assert dict(Catalog.load(ws.catalog).images.items()) == legacy["images"]
