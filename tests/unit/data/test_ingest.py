"""Ingest: every bad file is quarantined with its reason, every good one is kept, once."""

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from components.data.catalog import Catalog
from components.data.identity import pending_arrivals
from components.data.ingest import ingest_arrival
from components.data.validation import validate_image
from tests.conftest import png_bytes


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data to speak of."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def noise_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def arrival(tmp_path: Path) -> Path:
    root = tmp_path / "inbox-src" / "arrival-1"
    for k, cls in enumerate(("cat", "dog", "owl", "eel")):
        (root / cls).mkdir(parents=True)
        for i in range(5):  # distinct bytes in every class: the same bytes under two classes is a label conflict
            (root / cls / f"{i}.png").write_bytes(png_bytes(color=20 + 40 * k + 5 * i))
    good = png_bytes(size=(40, 40), color=7)
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    noisy = noise_png()
    mid = len(noisy) // 2
    (root / "dog" / "corrupt.png").write_bytes(
        noisy[:mid] + bytes(b ^ 0x5A for b in noisy[mid : mid + 64]) + noisy[mid + 64 :]
    )
    (root / "dog" / "notes.txt").write_text("not an image at all")
    (root / "owl" / "huge.png").write_bytes(huge_png_header(100_000, 100_000))
    (root / "owl" / "tiny.png").write_bytes(png_bytes(size=(2, 2)))
    (root / "stray.png").write_bytes(png_bytes())
    (root / "manifest.json").write_text(json.dumps({"source": "test"}))
    return root


BAD = {
    "cat/zero.png": "empty file",
    "cat/truncated.png": "truncated",
    "dog/corrupt.png": "corrupt",
    "dog/notes.txt": "not an image",
    "owl/huge.png": "dimensions are too large",
    "owl/tiny.png": "smaller than",
    "stray.png": "not inside a class folder",
}


def test_each_bad_file_is_quarantined_with_its_reason(arrival, ws, params):
    report = ingest_arrival(arrival, ws, params.ingest)
    reasons = {r.file: r.reason for r in report.rejected}
    assert set(reasons) == set(BAD)
    for file, expected in BAD.items():
        assert expected in reasons[file], f"{file}: {reasons[file]}"
        assert (ws.quarantine / arrival.name / file).read_bytes() == (arrival / file).read_bytes()
    saved = json.loads((ws.quarantine / arrival.name / "reasons.json").read_text())
    assert {r["file"] for r in saved} == set(BAD)


def test_good_images_are_stored_under_content_hash_names(arrival, ws, params):
    report = ingest_arrival(arrival, ws, params.ingest)
    assert report.stored == 20
    catalog = Catalog.load(ws.catalog)
    assert len(catalog.images) == 20
    for image_id, meta in catalog.images.items():
        stored = ws.classes_dir / image_id
        assert stored.is_file()
        assert image_id.startswith(meta["class"] + "/") and len(stored.stem) == 32
    assert catalog.arrivals["arrival-1"]["manifest"] == {"source": "test"}


def test_splits_hold_out_classes_and_queries(arrival, ws, params):
    report = ingest_arrival(arrival, ws, params.ingest)
    catalog = Catalog.load(ws.catalog)
    assert len(report.unseen_classes) == 1  # 25% of 4 classes
    unseen = report.unseen_classes[0]
    assert {r.role for r in catalog.records() if r.cls == unseen} == {"unseen"}
    for cls in set(report.new_classes) - {unseen}:
        roles = [r.role for r in catalog.records() if r.cls == cls]
        assert roles.count("query") == 1 and roles.count("train") == 4  # 20% of 5 images


def test_splits_are_deterministic(arrival, tmp_path, params, ws):
    from components.workspace import resolve_workspace

    first = ingest_arrival(arrival, ws, params.ingest)
    other = resolve_workspace(params, tmp_path / "other")
    second = ingest_arrival(arrival, other, params.ingest)
    assert first.unseen_classes == second.unseen_classes
    assert Catalog.load(ws.catalog).images == Catalog.load(other.catalog).images


def test_reingesting_the_same_arrival_changes_nothing(arrival, ws, params):
    ingest_arrival(arrival, ws, params.ingest)
    before = ws.catalog.read_bytes()
    files = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*"))
    report = ingest_arrival(arrival, ws, params.ingest)
    assert report.status == "already_ingested" and report.stored == 0
    assert ws.catalog.read_bytes() == before
    assert sorted(p.relative_to(ws.root) for p in ws.root.rglob("*")) == files


def test_inbox_arrivals_are_moved_and_no_longer_pending(arrival, ws, params):
    inbox_copy = ws.inbox / arrival.name
    inbox_copy.parent.mkdir(parents=True)
    arrival.rename(inbox_copy)
    assert pending_arrivals(ws) == [inbox_copy]
    ingest_arrival(inbox_copy, ws, params.ingest, remove_source=True)
    assert not inbox_copy.exists()
    assert pending_arrivals(ws) == []
    # nothing good was lost: 20 stored images plus 7 quarantined files
    assert len(list(ws.classes_dir.rglob("*.png"))) == 20
    assert len([p for p in (ws.quarantine / arrival.name).rglob("*") if p.is_file() and p.name != "reasons.json"]) == 7


def test_validate_rejects_oversized_files_and_disallowed_modes(params):
    rgb = png_bytes(size=(64, 64), mode="RGB")
    small_limit = params.ingest.model_copy(update={"max_file_bytes": 10})
    assert "over the 10-byte limit" in validate_image(rgb, small_limit)[1]
    grey_only = params.ingest.model_copy(update={"modes": ["L"]})
    assert "pixel mode RGB" in validate_image(rgb, grey_only)[1]
    assert validate_image(rgb, params.ingest) == ("PNG", None)


def test_oversized_file_is_quarantined_unread(arrival, ws, params):
    big = noise_png()
    assert len(big) > 1000
    (arrival / "eel" / "big.png").write_bytes(big)
    report = ingest_arrival(arrival, ws, params.ingest.model_copy(update={"max_file_bytes": 1000}))
    reasons = {r.file: r.reason for r in report.rejected}
    assert reasons["eel/big.png"] == f"file is {len(big)} bytes, over the 1000-byte limit"
    # "quarantined unread" (params.yaml): the reason is recorded, the bytes are not copied
    assert not (ws.quarantine / arrival.name / "eel" / "big.png").exists()
    assert [r.quarantined_as for r in report.rejected if r.file == "eel/big.png"] == [None]
    assert (arrival / "eel" / "big.png").read_bytes() == big


def test_class_folder_that_is_not_utf8_is_quarantined(tmp_path, ws, params):
    root = tmp_path / "arrival-latin1"
    for cls in (b"caf\xe9", b"tea", b"ink"):
        folder = os.path.join(os.fsencode(root), cls)
        os.makedirs(folder)
        for i in range(3):
            with open(os.path.join(folder, b"%d.png" % i), "wb") as fh:
                fh.write(png_bytes(color=i * 40 + cls[0]))
    report = ingest_arrival(root, ws, params.ingest)
    bad = [r for r in report.rejected if "not valid UTF-8" in r.reason]
    assert len(bad) == 3 and all(r.file.startswith("caf\\xe9/") for r in bad)
    assert sorted(report.new_classes) == ["ink", "tea"]
    assert Catalog.load(ws.catalog).arrivals["arrival-latin1"]["quarantined"] == 3


def test_a_different_seed_gives_a_different_split(arrival, tmp_path, params, ws):
    from components.workspace import resolve_workspace

    first = ingest_arrival(arrival, ws, params.ingest)
    reseeded = params.ingest.model_copy(update={"seed": 7})
    others = [
        ingest_arrival(arrival, resolve_workspace(params, tmp_path / f"s{i}"), reseeded.model_copy(update={"seed": i}))
        for i in range(1, 6)
    ]
    assert any(o.unseen_classes != first.unseen_classes for o in others)


def test_files_landing_during_ingest_are_left_in_place(arrival, ws, params, monkeypatch):
    import components.data.ingest as ingest_module

    inbox_copy = ws.inbox / arrival.name
    inbox_copy.parent.mkdir(parents=True)
    arrival.rename(inbox_copy)
    late = inbox_copy / "cat" / "late.png"
    real = ingest_module.validate_image

    def validate_then_drop_a_file(data, limits):
        if not late.exists():
            late.write_bytes(png_bytes(color=250))
        return real(data, limits)

    monkeypatch.setattr(ingest_module, "validate_image", validate_then_drop_a_file)
    report = ingest_arrival(inbox_copy, ws, params.ingest, remove_source=True)
    assert late.read_bytes() == png_bytes(color=250), "a file that arrived mid-ingest was deleted"
    assert any("arrived during ingest" in w for w in report.warnings)
    assert [p.name for p in inbox_copy.rglob("*") if p.is_file()] == ["late.png"]


def test_status_reads_an_unchanged_inbox_folder_once(arrival, ws, params, monkeypatch):
    """pending_arrivals(cached=True), what status pages call, fingerprints a folder under a recorded
    name once, and again only when something in it changed."""
    import components.data.identity as identity_module

    inbox_copy = ws.inbox / arrival.name
    inbox_copy.parent.mkdir(parents=True)
    arrival.rename(inbox_copy)
    ingest_arrival(inbox_copy, ws, params.ingest)  # recorded, left in the inbox
    scans = []
    real_scan = identity_module.scan
    monkeypatch.setattr(identity_module, "scan", lambda *a: scans.append(a) or real_scan(*a))

    assert pending_arrivals(ws, params.ingest, cached=True) == []
    assert pending_arrivals(ws, params.ingest, cached=True) == []
    assert len(scans) == 1
    (inbox_copy / "cat" / "late.png").write_bytes(png_bytes(color=250))
    assert pending_arrivals(ws, params.ingest, cached=True) == [inbox_copy]  # other content: pending
    assert pending_arrivals(ws, params.ingest, cached=True) == [inbox_copy] and len(scans) == 2
    assert pending_arrivals(ws, params.ingest) == [inbox_copy] and len(scans) == 3  # ingest always reads
