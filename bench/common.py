"""What the benchmarks share: where results go, how a run is described and written, the data they read."""

from __future__ import annotations

import json
import os
import platform
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import psutil
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"


def command_line(name: str) -> str:
    """How this run was started, as a person types it again from the repo root."""
    return " ".join([f"python -m bench.{name}", *sys.argv[1:]])


def machine() -> str:
    """This host, torch's CPU threads and the GPU, as a report's `machine` line names them."""
    import torch  # here, not at import: bench/scale.py's measured child never loads torch for this

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {torch.get_num_threads()} CPU threads, {gpu}"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile of latencies, rounded as the reports print them."""
    return round(float(np.percentile(values, p)), 2)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown (GitHub) table; each cell printed as str() prints it (tabulate would reformat numbers)."""
    cells = [[c if isinstance(c, str) else str(c) for c in row] for row in rows]
    return tabulate(cells, headers=list(headers), tablefmt="github", disable_numparse=True)


def write_json(path: Path, report: dict) -> None:
    """One run's report as indented JSON, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def write_run(stem: Path, report: dict, markdown: str) -> None:
    """One run's report as <stem>.json and its tables as <stem>.md."""
    write_json(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(markdown)


def omniglot_alphabets(source: Path, dest: Path, drawers: int = 20) -> Iterator[tuple[str, Path]]:
    """Omniglot's alphabets one at a time, each unpacked as an arrival folder dest/<alphabet>.

    Classes are '<alphabet>-<character>' (character names repeat across alphabets). `drawers`
    keeps each character's first N drawings (files are '<character id>_<drawer>.png').
    """
    with zipfile.ZipFile(source) as z:
        files = [n for n in z.namelist() if n.endswith(".png") and int(n.rsplit("_", 1)[1][:-4]) <= drawers]
        for alphabet in sorted({n.split("/")[1] for n in files}):
            for name in (n for n in files if n.split("/")[1] == alphabet):
                _, _, character, file = name.split("/")
                target = dest / alphabet / f"{alphabet}-{character}" / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
            yield alphabet, dest / alphabet


def parse_variant(text: str, named: dict[str, dict] | None = None) -> tuple[str, dict]:
    """'name' (from `named`) or 'name:key=value,key=value' (params overrides; values parsed as YAML),
    or 'name:base+key=value,...' (over the named variant `base`)."""
    import yaml

    named = named or {}
    if ":" not in text:
        return text, named[text]
    name, _, spec = text.partition(":")
    base, _, spec = spec.partition("+") if "+" in spec else ("", "", spec)
    overrides = dict(named[base]) if base else {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides
