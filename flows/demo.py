"""`mnemo demo`: render a base arrival plus N further ones and retrain after each."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from components.config import Params
from components.data.catalog import Catalog
from components.data.demo import arrival_id, discover_fonts, stream_classes, write_arrival
from components.evaluation import keys
from components.training.planning import RetrainSummary
from components.workspace import resolve_workspace
from flows.retrain import retrain

HEADLINE = (keys.unseen("recall_at_1"), keys.unseen("map_at_r"))  # what each step shows, beside raw pixels


@dataclass
class DemoStep:
    step: int
    summary: RetrainSummary
    seconds: float


def steps_table(steps: list[DemoStep]) -> Table:
    table = Table(title="retrieval among unseen classes (never trained on): model vs raw pixels")
    for col in (
        "step",
        "arrival",
        "classes known",
        "version",
        "status",
        "R@1",
        "MAP@R",
        "pixel R@1",
        "pixel MAP@R",
        "seconds",
    ):
        table.add_column(col, justify="left" if col in ("arrival", "status") else "right")
    for s in steps:
        m = s.summary.metrics
        table.add_row(
            str(s.step),
            ", ".join(s.summary.ingested) or "-",
            str(s.summary.classes_known),
            s.summary.version or "-",
            s.summary.status,
            *(f"{m.get(k, float('nan')):.3f}" for k in (*HEADLINE, *map(keys.baseline, HEADLINE))),
            f"{s.seconds:.0f}",
        )
    return table


def beats_pixels(metrics: dict[str, float]) -> bool:
    """Unseen Recall@1 and MAP@R both above the raw-pixel baseline on the same images."""
    return all(metrics[k] > metrics[keys.baseline(k)] for k in HEADLINE)


def pixel_verdict(steps: list[DemoStep]) -> str:
    """One line: did the model beat raw pixels at every step that trained one?"""
    scored = [s for s in steps if HEADLINE[0] in s.summary.metrics]
    behind = [s for s in scored if not beats_pixels(s.summary.metrics)]
    if not behind:
        return f"model vs raw pixels: ahead at every step ({len(scored)} of {len(scored)}, unseen Recall@1 and MAP@R)"
    r1, map_r = HEADLINE
    return "model vs raw pixels: behind at step " + ", ".join(
        f"{s.step} (R@1 {m[r1]:.3f} vs {m[keys.baseline(r1)]:.3f}, MAP@R {m[map_r]:.3f} vs {m[keys.baseline(map_r)]:.3f})"
        for s, m in ((s, s.summary.metrics) for s in behind)
    )


def run_demo(
    params: Params, workspace: str | None = None, arrivals: int | None = None, console: Console | None = None
) -> list[DemoStep]:
    console = console or Console(width=None if Console().is_terminal else 120)
    if arrivals is not None:
        params = params.model_copy(update={"demo": params.demo.model_copy(update={"arrivals": arrivals})})
    ws = resolve_workspace(params, workspace)
    fonts = discover_fonts()
    console.print(f"[bold]fonts:[/] {len(fonts.designs)} designs from {fonts.source}, {len(fonts.charset)} characters")
    if fonts.source != "system CJK fonts":
        console.print(
            "[yellow]No CJK fonts found: using matplotlib's bundled fonts (fewer designs, an easier stream). "
            "`make setup` installs Debian's CJK fonts where apt is usable.[/]"
        )
    steps: list[DemoStep] = []
    for step, chars in enumerate(stream_classes(fonts, params.demo)):
        start = time.perf_counter()
        if arrival_id(step) in Catalog.load(ws.catalog).arrivals:
            console.print(f"[bold]step {step}:[/] arrival {arrival_id(step)} already ingested in {ws.root}")
        else:
            write_arrival(ws.inbox, step, chars, fonts, params.demo)
            console.print(f"[bold]step {step}:[/] arrival {arrival_id(step)} with {len(chars)} classes -> retrain")
        summary = retrain(params, str(ws.root))
        steps.append(DemoStep(step, summary, time.perf_counter() - start))
        console.print(steps_table(steps))
    console.print(pixel_verdict(steps))
    uri = ws.masked_tracking_uri
    ui = uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
    console.print(f"workspace: {ws.root}\nMLflow: {ui}")
    return steps
