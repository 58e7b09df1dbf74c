"""Demo data with no download: a stream of character classes rendered from fonts.

A class is one character; a sample is that character in one font design (and one style of
it, such as a weight), with light augmentation. Debian's CJK fonts give thousands of
ideographs in many designs; without them, the fonts matplotlib ships give Latin, Greek and
Cyrillic letters in a handful of designs. Families that render near-identically (a
proportional twin, an alias) count as one design. Output is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTCollection, TTFont, TTLibError
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from components.config import DemoParams

CJK_PROBE = "日本人山川木水火金土月"
LATIN_PROBE = "AaBbGgRr"
CJK_RANGE = range(0x4E00, 0xA000)
LETTER_RANGES = [range(0x41, 0x5B), range(0x61, 0x7B), range(0x391, 0x3AA), range(0x3B1, 0x3CA), range(0x410, 0x450)]
_REGULAR = ("regular", "book", "medium", "normal", "roman")
_NOT_TEXT = ("Last Resort", "cmex10", "cmsy10")  # placeholder-box and math-symbol fonts
_SAME_DESIGN = 0.03  # mean absolute pixel difference on probe glyphs below which two families are one design


@dataclass(frozen=True)
class Face:
    path: Path
    index: int  # face number inside a .ttc collection
    family: str
    style: str


@dataclass(frozen=True)
class Design:
    name: str
    faces: tuple[Face, ...]  # its styles
    codepoints: frozenset[int]


@dataclass(frozen=True)
class FontSet:
    source: str  # "system CJK fonts" or "matplotlib's bundled fonts"
    designs: tuple[Design, ...]
    charset: tuple[str, ...]  # characters enough designs cover, in codepoint order

    def designs_for(self, ch: str) -> list[Design]:
        return [d for d in self.designs if ord(ch) in d.codepoints]


def _font_files(dirs: list[Path]) -> list[Path]:
    files = []
    for d in dirs:
        if d.is_dir():
            files += [p for p in d.rglob("*") if p.suffix.lower() in {".ttf", ".otf", ".ttc"} and p.is_file()]
    return sorted(set(files))


def _faces(files: list[Path]) -> list[tuple[Face, frozenset[int]]]:
    out = []
    for path in files:
        try:
            count = len(TTCollection(path).fonts) if path.suffix.lower() == ".ttc" else 1
            for index in range(count):
                font = TTFont(path, fontNumber=index, lazy=True)
                names = font["name"]
                family = str(names.getDebugName(16) or names.getDebugName(1) or path.stem)
                style = str(names.getDebugName(17) or names.getDebugName(2) or "")
                out.append((Face(path, index, family, style), frozenset(font.getBestCmap() or {})))
        except (TTLibError, OSError, KeyError, AssertionError):
            continue  # unreadable font files are not ours to fix
    return out


def _render_plain(face: Face, text: str, size: int = 32) -> np.ndarray:
    font = ImageFont.truetype(str(face.path), int(size * 0.8), index=face.index)
    glyphs = []
    for ch in text:
        img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(img).text((size / 2, size / 2), ch, fill=255, font=font, anchor="mm")
        glyphs.append(np.asarray(img, dtype=np.float32) / 255)
    return np.stack(glyphs)


def _designs(faces: list[tuple[Face, frozenset[int]]], probe: str) -> list[Design]:
    """Group faces into families, then merge families that render the probe near-identically."""
    families: dict[str, list[tuple[Face, frozenset[int]]]] = defaultdict(list)
    for face, cmap in faces:
        if all(ord(ch) in cmap for ch in probe) and not face.family.startswith(_NOT_TEXT):
            families[face.family].append((face, cmap))
    designs: list[tuple[np.ndarray, Design]] = []
    for family in sorted(families):
        members = sorted(
            families[family], key=lambda fc: (fc[0].style.lower() not in _REGULAR, str(fc[0].path), fc[0].index)
        )
        regular, cmap = members[0]
        try:
            look = _render_plain(regular, probe)
        except OSError:
            continue
        if any(np.abs(look - other).mean() < _SAME_DESIGN for other, _ in designs):
            continue
        designs.append((look, Design(family, tuple(f for f, _ in members), cmap)))
    return [d for _, d in designs]


def discover_fonts(font_dirs: list[Path] | None = None) -> FontSet:
    """CJK system fonts when at least 4 designs are installed, else matplotlib's bundled fonts."""
    if font_dirs is None:
        font_dirs = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".local/share/fonts"]
    system = _designs(_faces(_font_files(font_dirs)), CJK_PROBE)
    if len(system) >= 4:
        return _fontset("system CJK fonts", system, [CJK_RANGE], need=math.ceil(0.8 * len(system)))
    import matplotlib

    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return _fontset(
        "matplotlib's bundled fonts", _designs(_faces(_font_files([bundled])), LATIN_PROBE), LETTER_RANGES, need=2
    )


def _fontset(source: str, designs: list[Design], ranges: list[range], need: int) -> FontSet:
    """Characters that at least `need` designs cover."""
    chars = [chr(cp) for r in ranges for cp in r if sum(cp in d.codepoints for d in designs) >= need]
    return FontSet(source=source, designs=tuple(designs), charset=tuple(chars))


@cache
def has_glyph(face: Face, ch: str) -> bool:
    """Some fonts map a codepoint to an empty glyph; those cannot draw the class."""
    return float(_render_plain(face, ch).sum()) > 5.0


def class_name(ch: str) -> str:
    return f"U{ord(ch):04X}"


def class_char(name: str) -> str:
    """The character a demo class name stands for (inverse of class_name)."""
    return chr(int(name[1:], 16))


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render_sample(face: Face, ch: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One dark-on-light glyph with random scale, shift, rotation, stroke weight, blur and noise."""
    ink, paper = int(rng.integers(0, 70)), int(rng.integers(190, 256))
    big = size * 2
    font = ImageFont.truetype(str(face.path), int(big * rng.uniform(0.55, 0.8)), index=face.index)
    canvas = Image.new("L", (big, big), paper)
    shift = rng.uniform(-0.06, 0.06, size=2) * big
    ImageDraw.Draw(canvas).text((big / 2 + shift[0], big / 2 + shift[1]), ch, fill=ink, font=font, anchor="mm")
    canvas = canvas.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    stroke = rng.random()
    if stroke < 0.2:
        canvas = canvas.filter(ImageFilter.MinFilter(3))  # bolder
    elif stroke > 0.85:
        canvas = canvas.filter(ImageFilter.MaxFilter(3))  # thinner
    img = canvas.resize((size, size), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.7)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(0, 6), size=(size, size))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L")


def sample_image(fonts: FontSet, ch: str, i: int, params: DemoParams) -> Image.Image:
    """Sample i of character ch: designs taken in a seeded rotation, a random style of each.

    Indices past demo.images_per_class give fresh samples that no arrival holds.
    """
    designs = [d for d in fonts.designs_for(ch) if has_glyph(d.faces[0], ch)]
    design = designs[_rng(params.seed, ch, "designs").permutation(len(designs))[i % len(designs)]]
    rng = _rng(params.seed, ch, i)
    face = design.faces[int(rng.integers(len(design.faces)))]
    return render_sample(face, ch, params.image_size, rng)


def stream_classes(fonts: FontSet, params: DemoParams) -> list[list[str]]:
    """Characters of the base arrival and each further one: a seeded draw without repeats."""
    wanted = params.base_classes + params.arrivals * params.classes_per_arrival
    usable = [ch for ch in fonts.charset if len(fonts.designs_for(ch)) >= 2]
    if len(usable) < wanted:
        raise ValueError(f"{fonts.source} cover only {len(usable)} characters in 2+ designs; the demo needs {wanted}")
    drawn = [usable[i] for i in _rng(params.seed, "classes").permutation(len(usable))[:wanted]]
    sizes = [params.base_classes] + [params.classes_per_arrival] * params.arrivals
    bounds = np.cumsum([0, *sizes])
    return [drawn[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def arrival_id(step: int) -> str:
    return f"demo-{step:03d}"


def write_arrival(inbox: Path, step: int, chars: list[str], fonts: FontSet, params: DemoParams) -> Path:
    """Render one arrival folder (class sub-folders + manifest.json) into the inbox."""
    root = inbox / arrival_id(step)
    for ch in chars:
        out = root / class_name(ch)
        out.mkdir(parents=True, exist_ok=True)
        for i in range(params.images_per_class):
            sample_image(fonts, ch, i, params).save(out / f"{i:03d}.png")
    manifest = {
        "source": f"mnemo demo, rendered from {fonts.source}",
        "seed": params.seed,
        "classes": {class_name(ch): ch for ch in chars},
        "designs": [d.name for d in fonts.designs],
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return root
