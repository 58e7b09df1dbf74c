"""The library stays a library: components/ never imports Prefect (or flows/), directly or through
another import, so it runs under DVC, in a notebook or on a Dask worker without an orchestrator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

COMPONENTS = REPO / "components"


def modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in COMPONENTS.rglob("*.py")
        if p.name != "pyfunc_entry.py"  # MLflow's entry point: it loads a model at import, by design
    )


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_component_imports_prefect_or_the_flows():
    offenders = {
        str(p.relative_to(REPO)): sorted(n for n in imported(p) if n.split(".")[0] in {"prefect", "flows"})
        for p in COMPONENTS.rglob("*.py")
    }
    assert {f: n for f, n in offenders.items() if n} == {}


def test_importing_every_component_loads_no_prefect():
    code = (
        "import importlib, sys\n"
        f"for m in {modules()!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'flows'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
