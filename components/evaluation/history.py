"""The model's history: its headline metrics over registered versions, with what happened to each
(promoted, rolled back to, rejected by the gate), and forgetting per arrival slice over versions.

A pure function of the versions' logged metrics and tags and the promotion log; the page draws it
(GET /history) and every retrain logs it to MLflow as a figure (history_figure)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from components.evaluation import keys
from components.evaluation.metrics import json_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from components.registry.promotion_log import PromotionEntry

# The lines of the headline chart, in the order drawn: metric key -> what the legend says.
HEADLINE = {
    keys.unseen("recall_at_1"): "unseen R@1",
    keys.unseen("map_at_r"): "unseen MAP@R",
    keys.baseline(keys.unseen("recall_at_1")): "raw pixels R@1",
    keys.baseline(keys.unseen("map_at_r")): "raw pixels MAP@R",
}
FEW_SHOT = re.compile(r"^unseen_(\d+)way_(\d+)shot$")  # episodes over every arrival (not _within_)


class VersionPoint(BaseModel):
    """One registered version on the history's x axis."""

    version: str
    verdict: str | None = Field(description="the gate's verdict: promote | reject (None: never gated)")
    promoted: bool = Field(description="the champion alias was moved to it by a promotion at least once")
    rolled_back_to: bool = Field(description="a rollback moved the champion alias back to it at least once")
    champion: bool = Field(description="it serves now")
    metrics: dict[str, float | None] = Field(description="headline metric key -> value (None: not logged)")
    forgetting: dict[str, float | None] = Field(description="arrival slice -> forgetting after this version")
    seen_recall_at_1: dict[str, float | None] = Field(description="arrival slice -> seen-class Recall@1")


class HistoryEvent(BaseModel):
    """One move of the champion alias, as the promotion log has it."""

    time: str
    kind: str  # promote | rollback
    from_version: str | None
    to_version: str
    reason: str
    forced: bool


class ModelHistory(BaseModel):
    """Every registered version, oldest first, the headline metrics' names, the arrival slices and the
    alias moves: what GET /history answers and history_figure draws."""

    model_name: str
    metrics: dict[str, str] = Field(description="metric key -> label, in the order the lines are drawn")
    slices: list[str] = Field(description="every arrival slice any version was scored on")
    versions: list[VersionPoint]
    events: list[HistoryEvent]


def few_shot_keys(metrics: Mapping[str, float]) -> list[str]:
    """The unseen N-way K-shot keys (over every arrival), the hardest task first (most ways, fewest shots)."""
    found = [(int(m[1]), int(m[2]), k) for k in metrics if (m := FEW_SHOT.match(k))]
    return [k for _, _, k in sorted(found, key=lambda t: (-t[0], t[1]))]


def model_history(
    model_name: str,
    versions: Sequence[tuple[str, Mapping[str, float], Mapping[str, str]]],
    entries: Sequence[PromotionEntry],
    champion: str | None,
    verdict_tag: str = "gate_verdict",
) -> ModelHistory:
    """The history of `versions` ((version, run metrics, version tags), any order) under the promotion
    log `entries` (oldest first); `champion` is the version serving now."""
    ordered = sorted(versions, key=lambda v: int(v[0]) if v[0].isdigit() else 0)
    shots: list[str] = []
    for _, metrics, _ in ordered:
        shots += [k for k in few_shot_keys(metrics) if k not in shots]
    labels = dict(HEADLINE)
    for k in shots[:2]:  # the two hardest tasks: a chart of every episode kind would be unreadable
        m = FEW_SHOT.match(k)
        assert m is not None
        labels[k] = f"unseen {m[1]}-way {m[2]}-shot"
    promoted = {e.to_version for e in entries if e.kind == "promote"}
    rolled_back = {e.to_version for e in entries if e.kind == "rollback"}
    slices = sorted({s for _, m, _ in ordered for s in keys.slice_values(m)})
    points = [
        VersionPoint(
            version=version,
            verdict=tags.get(verdict_tag),
            promoted=version in promoted,
            rolled_back_to=version in rolled_back,
            champion=version == champion,
            metrics={k: json_number(metrics[k]) if k in metrics else None for k in labels},
            forgetting={
                s: json_number(metrics[keys.forgetting(s)]) if keys.forgetting(s) in metrics else None for s in slices
            },
            seen_recall_at_1={s: json_number(v) for s, v in keys.slice_values(metrics).items()},
        )
        for version, metrics, tags in ordered
    ]
    events = [
        HistoryEvent(
            time=e.time,
            kind=e.kind,
            from_version=e.from_version,
            to_version=e.to_version,
            reason=e.reason,
            forced=e.forced,
        )
        for e in entries
    ]
    return ModelHistory(model_name=model_name, metrics=labels, slices=slices, versions=points, events=events)


def history_figure(history: ModelHistory) -> Figure:
    """Two panels over versions: the headline metrics (promotions, rollbacks and rejections marked) and
    forgetting per arrival slice; drawn on a bare Figure (no pyplot, no GUI)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 7.0))
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(history.versions)))
    names = [f"v{p.version}" for p in history.versions]
    for key, label in history.metrics.items():
        ys = [p.metrics.get(key) for p in history.versions]
        style = "--" if key.startswith(keys.BASELINE) else "-"
        top.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o", label=label)
    for i, p in enumerate(history.versions):
        if p.verdict == "reject":
            top.axvspan(i - 0.4, i + 0.4, color="#d33", alpha=0.12, lw=0)
            top.text(i, 1.02, "rejected", ha="center", fontsize=7, color="#a00")
        elif p.promoted:
            top.text(i, 1.02, "promoted", ha="center", fontsize=7, color="#070")
        if p.rolled_back_to:
            top.text(i, 1.08, "rolled back to", ha="center", fontsize=7, color="#a60")
        if p.champion:
            top.axvline(i, color="#070", lw=1, ls=":")
    top.set_ylim(0, 1.12)
    top.set_ylabel("score")
    top.set_title(f"{history.model_name}: over versions")
    top.legend(fontsize=7, loc="lower left")
    for s in history.slices:
        ys = [p.forgetting.get(s) for p in history.versions]
        bottom.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=s)
    bottom.axhline(0, color="#999", lw=0.8)
    bottom.set_ylabel("forgetting (best past R@1 - now)")
    bottom.set_xlabel("model version")
    bottom.set_xticks(xs, names)
    if history.slices:
        bottom.legend(fontsize=7, title="arrival slice", title_fontsize=7)
    fig.tight_layout()
    return fig
