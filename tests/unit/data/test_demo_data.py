"""Demo data: rendered from fonts, deterministic by seed, in the inbox layout."""

import json

from components.data.demo import class_name, discover_fonts, stream_classes, write_arrival


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_renders_the_same_bytes(params, tmp_path):
    fonts = discover_fonts()
    [base, _] = stream_classes(fonts, params.demo)
    a = write_arrival(tmp_path / "a", 0, base, fonts, params.demo)
    b = write_arrival(tmp_path / "b", 0, base, fonts, params.demo)
    assert tree(a) == tree(b)
    other = stream_classes(fonts, params.demo.model_copy(update={"seed": 1}))[0]
    assert other != base


def test_arrival_layout_and_manifest(params, tmp_path):
    fonts = discover_fonts()
    base, extra = stream_classes(fonts, params.demo)
    assert len(base) == params.demo.base_classes and len(extra) == params.demo.classes_per_arrival
    assert not set(base) & set(extra), "an arrival brings new classes only"
    root = write_arrival(tmp_path, 0, base, fonts, params.demo)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(class_name(c) for c in base)
    for ch in base:
        assert len(list((root / class_name(ch)).glob("*.png"))) == params.demo.images_per_class
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["classes"][class_name(base[0])] == base[0]


def test_fallback_to_matplotlib_fonts_when_no_system_fonts(params, tmp_path):
    fonts = discover_fonts(font_dirs=[tmp_path / "no-fonts-here"])
    assert fonts.source == "matplotlib's bundled fonts"
    assert len(fonts.designs) >= 4
    assert len(fonts.charset) >= params.demo.base_classes + params.demo.classes_per_arrival
    [base, _] = stream_classes(fonts, params.demo)
    write_arrival(tmp_path, 0, base, fonts, params.demo)
