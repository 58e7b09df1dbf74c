"""A corpus of bad (and awkward but good) arrivals: every kind has one asserted outcome.

The corpus is generated in a temporary folder and ingested once with remove_source (as the
inbox scan does): each kind is then stored, quarantined with a reason that names the file,
or reported. A sentinel outside the arrival, linked to from inside, must appear nowhere in
the workspace, and no link, FIFO or oversized file is ever opened. Cases that need their own
workspace (identity, conflicts across arrivals, write failures) follow the corpus.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import components.data.ingest as ingest_module
import components.data.store as store_module
import components.data.walk as walk_module
from components.config import Params, with_overrides
from components.data.catalog import SCORED_ROLES, Catalog
from components.data.ingest import IngestReport, ingest_arrival
from components.data.store import IngestError
from components.data.transforms import open_rgb
from components.workspace import Workspace, resolve_workspace
from tests.unit.data.test_ingest import huge_png_header

LIMIT = 200_000  # ingest.max_file_bytes for the corpus: the oversized file stays small on disk
LONG = "B" * 246 + ".png"  # with the old ".<name>.partial" temporary name: 257 bytes, ENAMETOOLONG

# -- image makers ------------------------------------------------------------------------------


def noise(seed: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(seed: int) -> bytes:
    return encode(noise(seed), "PNG")


def jpeg(seed: int) -> bytes:
    return encode(noise(seed), "JPEG", quality=90)


def frames(seed: int, n: int = 3) -> list[Image.Image]:
    return [noise(seed + i).convert("P") for i in range(n)]


def sideways_jpeg() -> bytes:
    """A 40x20 image, blue on its left, tagged 'rotate 90 clockwise to view' (EXIF orientation 6)."""
    img = Image.new("RGB", (40, 20), "red")
    img.paste((0, 0, 255), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def palette_with_transparency(seed: int) -> bytes:
    img = noise(seed).convert("P")
    return encode(img, "PNG", transparency=0)


def grey16() -> bytes:
    return encode(Image.fromarray(np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100), "PNG")


# -- the corpus -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of input. outcome: 'stored' (class), 'quarantined' (a copy kept, with reason),
    'rejected' (reason, bytes not copied), or 'reported' (checked by `check`)."""

    rel: str
    outcome: str
    expect: str = ""  # stored: the class; quarantined/rejected: a part of the reason
    good: bytes | None = None  # a good image's bytes: must not be lost
    check: Callable[[Corpus], None] | None = None


@dataclass
class Corpus:
    arrival: Path
    ws: Workspace
    report: IngestReport
    kinds: dict[str, Kind]
    sentinel: bytes
    outside_image: bytes
    opened: list[str]

    def reason(self, rel: str) -> str:
        found = [r.reason for r in self.report.rejected if r.file == rel]
        assert len(found) == 1, f"{rel}: {len(found)} rejections in {[r.file for r in self.report.rejected]}"
        return found[0]

    def stored_ids(self) -> dict[str, dict]:
        return Catalog.load(self.ws.catalog).images


def write(root: Path, rel: str | bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(root), rel if isinstance(rel, bytes) else os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def check_pending(c: Corpus) -> None:
    catalog = Catalog.load(c.ws.catalog)
    assert catalog.classes["solo"]["split"] == "pending" and "solo" in c.report.pending_classes
    assert [r.role for r in catalog.records() if r.cls == "solo"] == ["pending"]
    assert "solo" not in {r.cls for r in catalog.records(*SCORED_ROLES)}  # training and evaluation skip it
    assert any("'solo' has a single image" in w for w in c.report.warnings)


def check_exif(c: Corpus) -> None:
    digest = hashlib.sha256(c.kinds["exif orientation"].good or b"").hexdigest()[:32]
    stored = c.ws.classes_dir / "formats" / f"{digest}.jpg"
    upright = open_rgb(stored)
    assert upright.size == (20, 40)  # rotated: the tag is applied when decoding
    r, g, b = upright.getpixel((10, 2))  # the blue stripe is now on top
    assert b > 200 and r < 60


def check_duplicates(c: Corpus) -> None:
    assert c.report.duplicates == 1
    assert len([i for i in c.stored_ids() if i.startswith("dups/")]) == 2


def check_empty_folder(c: Corpus) -> None:
    assert any(w.startswith("empty folder empty_class") for w in c.report.warnings)


def check_manifest(c: Corpus) -> None:
    catalog = Catalog.load(c.ws.catalog)
    assert catalog.arrivals[c.report.arrival]["manifest"] == {"sender": "corpus"}


def check_nested(c: Corpus) -> None:
    assert len([i for i in c.stored_ids() if i.startswith("nested/")]) == 3


def check_incomplete(c: Corpus) -> None:
    catalog = Catalog.load(c.ws.catalog)
    recorded = catalog.arrivals[c.report.arrival]
    assert not c.report.complete and recorded["complete"] is False
    assert set(recorded["unreadable"]) == set(c.report.unreadable) == {"locked", "bad/secret.png", "zmid/grow.png"}


def build(root: Path, outside: Path) -> tuple[dict[str, Kind], bytes, bytes]:
    sentinel = b"SENTINEL-" + os.urandom(16).hex().encode()
    outside.mkdir()
    (outside / "passwd").write_bytes(sentinel)
    outside_image = png(999)
    (outside / "image.png").write_bytes(outside_image)
    (outside / "folder").mkdir()
    (outside / "folder" / "in.png").write_bytes(png(998))

    conflict = png(500)
    good = {
        # stored: formats and modes the params allow
        "plain PNG": ("formats/plain.png", png(1)),
        "CMYK JPEG": ("formats/cmyk.jpg", encode(noise(2).convert("CMYK"), "JPEG")),
        "animated GIF": (
            "formats/anim.gif",
            encode(frames(3)[0], "GIF", save_all=True, append_images=frames(4)[1:], duration=40, loop=0),
        ),
        "multi-page TIFF": ("formats/pages.tif", encode(noise(6), "TIFF", save_all=True, append_images=[noise(7)])),
        "palette with transparency": ("formats/palette.png", palette_with_transparency(8)),
        "WebP": ("formats/image.webp", encode(noise(9), "WEBP", lossless=True)),
        "BMP": ("formats/image.bmp", encode(noise(10), "BMP")),
        "exif orientation": ("formats/phone.jpg", sideways_jpeg()),
        "unicode name": ("names/ünï©ødé 名前.png", png(11)),
        "newline in name": ("names/new\nline.png", png(12)),
        "nested folders": ("nested/deeper/still/c.png", png(15)),
        "label conflict (within the arrival)": ("conflict_b/x.png", conflict),
        "duplicate bytes within a class": ("dups/b.png", png(20)),
        "single-image class": ("solo/only.png", png(30)),
        "hidden file": ("bad/.hidden.png", png(31)),
        "hidden folder": (".git/obj.png", png(32)),
        "file at the arrival root": ("stray.png", png(33)),
        "polyglot PNG (trailing bytes)": ("bad/polyglot.png", png(34) + b"PK\x03\x04 a zip or a script"),
        "16-bit grey": ("bad/grey16.png", grey16()),
        "1x1 image": ("bad/one.png", encode(Image.new("RGB", (1, 1)), "PNG")),
        "unreadable folder": ("locked/img.png", png(40)),
        "unreadable file": ("bad/secret.png", png(41)),
        "grows mid-ingest": ("zmid/grow.png", png(42)),
    }
    filler = {  # companions, so no class but `solo` has a single image
        "names/second.png": png(13),
        "nested/a.png": png(14),
        "nested/deeper/b.png": png(16),
        "conflict_a/x.png": conflict,
        "conflict_a/y.png": png(17),
        "conflict_b/z.png": png(18),
        "dups/a.png": png(20),
        "dups/c.png": png(21),
        "zmid/stable.png": png(43),
        "zmid/stable2.png": png(44),
        "zmid/vanish.png": png(45),
    }
    bad = {
        "long file name": (LONG, b"junk, not an image"),
        "zero bytes": ("bad/zero.png", b""),
        "truncated PNG": ("bad/truncated.png", png(50)[:300]),
        "truncated JPEG": ("bad/truncated.jpg", jpeg(51)[:400]),
        "random bytes": ("bad/random.png", os.urandom(3000)),
        "text": ("bad/notes.txt", b"not an image at all\n"),
        "SVG": ("bad/drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24"/>'),
        "decompression-bomb header": ("bad/bomb.png", huge_png_header(100_000, 100_000)),
        "oversized file": ("bad/huge.png", b"\x89PNG" + os.urandom(LIMIT)),
    }
    for rel, data in [*good.values(), *bad.values()]:
        write(root, rel if rel != LONG else f"bad/{LONG}", data)
    for rel, data in filler.items():
        write(root, rel, data)
    write(root, b"names/n\xffme.png", png(19))  # a file name that is not UTF-8
    write(root, b"caf\xe9/img.png", png(22))  # a class folder name that is not UTF-8
    write(root, b"caf\xe9/img2.png", png(23))
    write(root, "manifest.json", json.dumps({"sender": "corpus"}).encode())
    (root / "empty_class").mkdir()
    os.mkfifo(root / "bad" / "fifo.png")
    (root / "bad" / "passwd.png").symlink_to(outside / "passwd")
    (root / "bad" / "outside.png").symlink_to(outside / "image.png")
    (root / "bad" / "dangling.png").symlink_to(outside / "nothing-here.png")
    (root / "linked_class").symlink_to(outside / "folder", target_is_directory=True)

    def stored(name: str, cls: str) -> Kind:
        rel, data = good[name]
        return Kind(rel, "stored", cls, good=data)

    def quarantined(name: str, why: str, table: dict = good) -> Kind:
        rel, data = table[name]
        return Kind(rel, "quarantined", why, good=data if table is good else None)

    def link(rel: str) -> Kind:
        return Kind(rel, "rejected", "symbolic link: links are never followed")

    kinds = {
        **{name: stored(name, "formats") for name in list(good)[:8]},
        "unicode name": stored("unicode name", "names"),
        "newline in name": stored("newline in name", "names"),
        "non-UTF-8 file name": Kind("names/n\\xffme.png", "stored", "names", good=png(19)),
        "nested folders": Kind("nested/deeper/still/c.png", "reported", good=png(15), check=check_nested),
        "label conflict (within the arrival)": quarantined(
            "label conflict (within the arrival)", "label conflict: the same bytes as conflict_a/x.png"
        ),
        "duplicate bytes within a class": Kind("dups/b.png", "reported", check=check_duplicates),
        "single-image class": Kind("solo/only.png", "reported", good=png(30), check=check_pending),
        "hidden file": quarantined("hidden file", "hidden file or folder"),
        "hidden folder": quarantined("hidden folder", "inside a hidden folder"),
        "file at the arrival root": quarantined("file at the arrival root", "not inside a class folder"),
        "polyglot PNG (trailing bytes)": quarantined("polyglot PNG (trailing bytes)", "after the end of the PNG"),
        "16-bit grey": quarantined("16-bit grey", "pixel mode I;16"),
        "1x1 image": quarantined("1x1 image", "1x1 is smaller than 8 pixels"),
        "non-UTF-8 class folder": Kind("caf\\xe9/img.png", "quarantined", "not valid UTF-8", good=png(22)),
        "long file name": Kind(f"bad/{LONG}", "quarantined", "not an image"),
        **{
            name: quarantined(name, why, bad)
            for name, why in [
                ("zero bytes", "empty file (0 bytes)"),
                ("truncated PNG", "corrupt or truncated image"),
                ("truncated JPEG", "corrupt or truncated image"),
                ("random bytes", "not an image"),
                ("text", "not an image"),
                ("SVG", "not an image"),
                ("decompression-bomb header", "image dimensions are too large"),
            ]
        },
        "oversized file": Kind("bad/huge.png", "rejected", f"over the {LIMIT}-byte limit"),
        "FIFO": Kind("bad/fifo.png", "rejected", "a FIFO, not a regular file: not opened"),
        "link to a file outside (/etc/passwd)": link("bad/passwd.png"),
        "link to an image outside": link("bad/outside.png"),
        "dangling link": link("bad/dangling.png"),
        "link to a folder outside": link("linked_class"),
        "unreadable folder": Kind("locked", "rejected", "cannot read folder (Permission denied)", good=png(40)),
        "unreadable file": Kind("bad/secret.png", "rejected", "cannot read file (Permission denied)", good=png(41)),
        "vanishes mid-ingest": Kind("zmid/vanish.png", "rejected", "file vanished during ingest"),
        "grows mid-ingest": Kind("zmid/grow.png", "rejected", "changed during ingest", good=png(42)),
        "empty folder": Kind("empty_class", "reported", check=check_empty_folder),
        "manifest.json": Kind("manifest.json", "reported", check=check_manifest),
        "arrival with unreadable parts is incomplete": Kind("locked", "reported", check=check_incomplete),
    }
    kinds["exif orientation"] = Kind("formats/phone.jpg", "stored", "formats", good=good["exif orientation"][1])
    kinds["exif orientation (decoded upright)"] = Kind("formats/phone.jpg", "reported", check=check_exif)
    return kinds, sentinel, outside_image


OPENED: list[str] | None = None  # the paths os.open / open are given while the corpus is ingested


def _audit(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], str | bytes):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def corpus(repo_params: Params, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    global OPENED
    base = tmp_path_factory.mktemp("corpus")
    params = with_overrides(repo_params, {"paths.workspace": str(base / "ws"), "ingest.max_file_bytes": LIMIT})
    ws = resolve_workspace(params)
    arrival = base / "inbox" / "corpus"
    kinds, sentinel, outside_image = build(arrival, base / "outside")

    real_open_dir, real_open_file, real_validate = (
        walk_module.open_dir,
        walk_module.open_file,
        ingest_module.validate_image,
    )

    def open_dir(parent_fd: int, name: str) -> int:  # root reads anything: a chmod 000 is simulated
        if name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open_dir(parent_fd, name)

    def open_file(parent_fd: int, name: str) -> int:
        if name == "secret.png":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open_file(parent_fd, name)

    def validate(data: bytes, limits):  # the sender is still writing while ingest runs
        if (arrival / "zmid" / "vanish.png").exists():
            (arrival / "zmid" / "vanish.png").unlink()
            with open(arrival / "zmid" / "grow.png", "ab") as fh:
                fh.write(b"more bytes")
        return real_validate(data, limits)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(walk_module, "open_dir", open_dir)
        mp.setattr(walk_module, "open_file", open_file)
        mp.setattr(ingest_module, "validate_image", validate)
        OPENED = []
        try:
            report = ingest_arrival(arrival, ws, params.ingest, remove_source=True)
            opened = OPENED
        finally:
            OPENED = None
    return Corpus(arrival, ws, report, kinds, sentinel, outside_image, opened)


def test_the_corpus_has_at_least_30_kinds(corpus):
    assert len(corpus.kinds) >= 30


def _kind_names() -> list[str]:
    """The corpus's kinds, one test each (the corpus is small: built once more to name them)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(build(Path(tmp) / "a", Path(tmp) / "o")[0])


@pytest.mark.parametrize("name", _kind_names())
def test_each_kind_has_its_outcome(corpus, name):
    kind = corpus.kinds[name]
    if kind.outcome == "stored":
        digest = hashlib.sha256(kind.good or b"").hexdigest()[:32]
        hits = [i for i, meta in corpus.stored_ids().items() if i.split("/", 1)[1].startswith(digest)]
        assert len(hits) == 1 and hits[0].startswith(kind.expect + "/"), f"{kind.rel}: {hits}"
        assert kind.rel not in {r.file for r in corpus.report.rejected}
    elif kind.outcome in ("quarantined", "rejected"):
        reason = corpus.reason(kind.rel)
        assert kind.expect in reason, f"{kind.rel}: {reason}"
        saved = json.loads((corpus.ws.quarantine / corpus.report.arrival / "reasons.json").read_text())
        assert {"file": kind.rel, "reason": reason} in [{"file": s["file"], "reason": s["reason"]} for s in saved]
        copy = next(r.quarantined_as for r in corpus.report.rejected if r.file == kind.rel)
        if kind.outcome == "quarantined":
            assert copy is not None and (corpus.ws.quarantine / corpus.report.arrival / copy).is_file()
        else:
            assert copy is None  # links, special, unread and unreadable files: no bytes copied
    else:
        assert kind.check is not None
        kind.check(corpus)


def test_no_good_image_is_lost_and_nothing_outside_was_read(corpus):
    ws_bytes = [p.read_bytes() for p in corpus.ws.root.rglob("*") if p.is_file() and not p.is_symlink()]
    left = {
        os.fsencode(p.relative_to(corpus.arrival)): p.read_bytes()
        for p in corpus.arrival.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    for name, kind in corpus.kinds.items():
        if kind.good is not None:
            stayed = any(data.startswith(kind.good) for data in left.values())  # the growing one grew
            kept = any(kind.good == data for data in ws_bytes) or stayed
            assert kept, f"{name}: {kind.rel} is neither stored, quarantined nor left in place"
    # what was not copied stays where the sender put it; everything else left the inbox
    assert sorted(left) == [b"bad/huge.png", b"bad/secret.png", b"locked/img.png", b"zmid/grow.png"]
    assert (corpus.arrival / "bad" / "fifo.png").exists()
    assert not (corpus.arrival / "bad" / "passwd.png").is_symlink()  # a link is deleted, its target is not
    assert (corpus.arrival.parent.parent / "outside" / "passwd").read_bytes() == corpus.sentinel
    # the sentinel and the image outside, both linked to from inside, are nowhere in the workspace
    assert not any(corpus.sentinel in data for data in ws_bytes)
    assert not any(corpus.outside_image in data for data in ws_bytes)
    # no link, FIFO or oversized file was ever opened
    never = {"passwd.png", "outside.png", "dangling.png", "linked_class", "fifo.png", "huge.png", "passwd"}
    opened = {os.path.basename(p) for p in corpus.opened}
    assert corpus.opened and not (opened & never), sorted(opened & never)
    assert not any("outside" in p for p in corpus.opened)


def test_corpus_report_and_catalog_agree(corpus):
    catalog = Catalog.load(corpus.ws.catalog)
    on_disk = sorted(str(p.relative_to(corpus.ws.classes_dir)) for p in corpus.ws.classes_dir.rglob("*") if p.is_file())
    assert on_disk == sorted(catalog.images)  # every stored file is in the catalog, and back
    assert corpus.report.stored == len(catalog.images)
    assert corpus.report.status == "ingested" and corpus.report.arrival == "corpus"


# -- cases that need a workspace of their own ------------------------------------------------


def arrival_of(root: Path, classes: dict[str, list[bytes]]) -> Path:
    for cls, images in classes.items():
        for i, data in enumerate(images):
            write(root, f"{cls}/{i}.png", data)
    return root


def test_same_name_other_content_is_a_new_arrival_and_a_rerun_a_no_op(tmp_path, ws, params):
    first = ingest_arrival(arrival_of(tmp_path / "a" / "drop", {"x": [png(1), png(2)]}), ws, params.ingest)
    assert (first.status, first.arrival, first.identity) == ("ingested", "drop", "new")
    again = ingest_arrival(tmp_path / "a" / "drop", ws, params.ingest)
    assert (again.status, again.arrival, again.identity) == ("already_ingested", "drop", "same_content")

    other = arrival_of(tmp_path / "b" / "drop", {"y": [png(3), png(4)], "z": [png(5), png(6)]})
    second = ingest_arrival(other, ws, params.ingest)
    assert second.status == "ingested" and second.identity == "changed_content"
    assert second.arrival == f"drop~{second.fingerprint[:12]}" and sorted(second.new_classes) == ["y", "z"]
    assert ingest_arrival(other, ws, params.ingest).status == "already_ingested"
    assert sorted(Catalog.load(ws.catalog).arrivals) == ["drop", second.arrival]


def test_an_arrival_that_stored_nothing_is_not_recorded_and_can_be_sent_again(tmp_path, ws, params):
    root = tmp_path / "drop"
    write(root, "0.png", png(1))  # every file at the root: no class folder
    write(root, "1.png", png(2))
    report = ingest_arrival(root, ws, params.ingest, remove_source=True)
    assert report.status == "nothing_stored" and report.stored == 0
    assert any("no class folder with a good image" in w for w in report.warnings)
    assert "drop" not in Catalog.load(ws.catalog).arrivals
    fixed = ingest_arrival(arrival_of(root, {"x": [png(1), png(2)]}), ws, params.ingest)
    assert (fixed.status, fixed.arrival, fixed.stored) == ("ingested", "drop", 2)


def test_an_empty_arrival_is_reported_not_recorded(tmp_path, ws, params):
    (tmp_path / "empty").mkdir()
    report = ingest_arrival(tmp_path / "empty", ws, params.ingest)
    assert report.status == "nothing_stored" and report.warnings
    assert not ws.catalog.exists()


def test_label_conflict_across_arrivals(tmp_path, ws, params):
    same = png(7)
    ingest_arrival(arrival_of(tmp_path / "a1", {"cat": [same, png(8)]}), ws, params.ingest)
    report = ingest_arrival(arrival_of(tmp_path / "a2", {"dog": [same, png(9), png(10)]}), ws, params.ingest)
    reasons = {r.file: r.reason for r in report.rejected}
    assert (
        "label conflict" in reasons["dog/0.png"] and "'cat'" in reasons["dog/0.png"] and "'dog'" in reasons["dog/0.png"]
    )
    assert report.stored == 2
    labels = {
        m["class"] for i, m in Catalog.load(ws.catalog).images.items() if hashlib.sha256(same).hexdigest()[:32] in i
    }
    assert labels == {"cat"}


def test_a_pending_class_is_trained_once_a_second_image_arrives(tmp_path, ws, params):
    ingest_arrival(
        arrival_of(tmp_path / "a1", {"solo": [png(1)], "x": [png(2), png(3)], "y": [png(4), png(5)]}), ws, params.ingest
    )
    catalog = Catalog.load(ws.catalog)
    assert catalog.classes_with_split("pending") == ["solo"]
    report = ingest_arrival(arrival_of(tmp_path / "a2", {"solo": [png(6)]}), ws, params.ingest)
    assert report.pending_classes == [] and report.new_classes == []
    catalog = Catalog.load(ws.catalog)
    assert catalog.classes["solo"] == {"arrival": "a2", "split": "train"}  # the only class completed in a2
    assert sorted(r.role for r in catalog.records() if r.cls == "solo") == ["query", "train"]


def test_unreadable_files_are_picked_up_once_readable(tmp_path, ws, params):
    probe = tmp_path / "probe"
    probe.mkdir(mode=0)
    try:
        os.listdir(probe)
        pytest.skip("permissions are not enforced here (root): the corpus simulates a chmod 000 folder instead")
    except PermissionError:
        pass
    finally:
        probe.chmod(0o755)
    root = arrival_of(tmp_path / "drop", {"x": [png(1), png(2)], "locked": [png(3), png(4)]})
    (root / "locked").chmod(0)
    try:
        first = ingest_arrival(root, ws, params.ingest, remove_source=True)
    finally:
        (root / "locked").chmod(0o755)
    assert not first.complete and any(r.file == "locked" for r in first.rejected)
    second = ingest_arrival(root, ws, params.ingest, remove_source=True)
    assert second.status == "ingested" and second.new_classes == ["locked"] and not root.exists()


def test_a_folder_unreadable_at_first_is_ingested_after_the_fix(tmp_path, ws, params, monkeypatch):
    root = arrival_of(tmp_path / "drop", {"x": [png(1), png(2)], "locked": [png(3), png(4)]})
    real = walk_module.open_dir

    def open_dir(fd: int, name: str) -> int:
        if name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(fd, name)

    monkeypatch.setattr(walk_module, "open_dir", open_dir)
    first = ingest_arrival(root, ws, params.ingest, remove_source=True)
    assert not first.complete and first.stored == 2 and (root / "locked").is_dir()
    still = ingest_arrival(root, ws, params.ingest)  # still locked: reported again, nothing stored or recorded
    assert still.status == "nothing_stored" and [r.file for r in still.rejected] == ["locked"]
    monkeypatch.setattr(walk_module, "open_dir", real)  # permissions fixed
    second = ingest_arrival(root, ws, params.ingest, remove_source=True)
    assert second.status == "ingested" and second.complete and second.new_classes == ["locked"]
    assert second.arrival.startswith("drop~") and not root.exists()


@pytest.mark.parametrize("fail_at", ["classes", "quarantine", "catalog"])
def test_a_workspace_that_cannot_be_written_keeps_nothing(tmp_path, ws, params, monkeypatch, fail_at):
    root = arrival_of(tmp_path / "drop", {"x": [png(1), png(2)], "y": [png(3), png(4)]})
    write(root, "x/bad.png", b"junk")
    real_mkstemp = store_module.tempfile.mkstemp

    def mkstemp(dir=None, prefix=None, **kw):  # a full disk (images) or a read-only folder (quarantine)
        if fail_at in Path(dir).parts:
            code = errno.ENOSPC if fail_at == "classes" else errno.EROFS
            raise OSError(code, os.strerror(code))
        return real_mkstemp(dir=dir, prefix=prefix, **kw)

    def save(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail_at == "catalog":
        monkeypatch.setattr(Catalog, "save", save)
    else:
        monkeypatch.setattr(store_module.tempfile, "mkstemp", mkstemp)
    with pytest.raises(IngestError, match="cannot write") as info:
        ingest_arrival(root, ws, params.ingest, remove_source=True)
    assert str(ws.root) in str(info.value) and "\n" not in str(info.value)
    stored = [p for p in ws.root.rglob("*") if p.is_file()]
    assert stored == [], stored  # nothing half-written: no image without its catalog entry
    assert len([p for p in root.rglob("*") if p.is_file()]) == 5  # and the arrival is untouched


def test_a_read_only_workspace_is_one_clear_error(tmp_path, params, ws, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    root = arrival_of(tmp_path / "drop", {"x": [png(1), png(2)]})

    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:  # root writes anywhere: a read-only data/ is simulated
        if self == ws.root / "data":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    result = CliRunner().invoke(app, ["ingest", str(root), "--workspace", str(ws.root), "--params", str(params_file)])
    assert result.exit_code == 1
    assert f"{ws.root / 'data'}: cannot write (Read-only file system)" in result.output
    assert "Traceback" not in result.output and not (ws.root / "data").exists()


def test_query_refuses_a_fifo_by_name(tmp_path, params):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    fifo = tmp_path / "query.png"
    os.mkfifo(fifo)
    result = CliRunner().invoke(
        app, ["query", str(fifo), "--params", str(params_file), "--workspace", str(tmp_path / "ws")]
    )
    assert result.exit_code == 2 and "query.png" in result.output and "not a regular file" in result.output


def test_the_long_name_repro_no_longer_blocks_the_inbox(ws, params):
    write(ws.inbox / "a", f"c/{LONG}", b"junk")
    write(ws.inbox / "a", "d/0.png", png(1))
    write(ws.inbox / "a", "d/1.png", png(2))
    from components.data.inbox import ingest_inbox

    (report,) = ingest_inbox(ws, params.ingest)
    assert report.status == "ingested" and report.stored == 2
    assert [r.file for r in report.rejected] == [f"c/{LONG}"]
    assert (ws.quarantine / "a" / "c" / LONG).read_bytes() == b"junk"
    assert not (ws.inbox / "a").exists() and ingest_inbox(ws, params.ingest) == []


def test_a_linked_arrival_folder_is_refused(tmp_path, ws, params):
    real = arrival_of(tmp_path / "real", {"x": [png(1), png(2)]})
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(FileNotFoundError, match="symbolic link"):
        ingest_arrival(tmp_path / "link", ws, params.ingest)
