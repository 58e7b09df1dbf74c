"""Champion against challenger on the same query: both models' top-k side by side, each from its own
table, with the images that moved, entered or left the top-k marked; and over a fixed probe set of
stored images, the share of neighbours a promotion would change, beside the gate's verdict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from components.serving.live import LivePair
from components.vectors.projection import sample_offsets
from components.vectors.search import Hit

Mark = Literal["same", "moved", "entered", "left"]
PROBES = 100  # stored images whose neighbours are compared: the same ones for every pair of tables


class MarkedHit(BaseModel):
    id: str
    cls: str = Field(alias="class")
    distance: float
    rank: int = Field(description="1-based rank in this model's top-k")
    mark: Mark = Field(
        description="same: same rank in both; moved: in both at another rank; entered: only in the "
        "challenger's top-k; left: only in the champion's"
    )
    other_rank: int | None = Field(description="its rank in the other model's top-k (None: not in it)")

    model_config = {"populate_by_name": True}


class Side(BaseModel):
    version: str
    table: str
    hits: list[MarkedHit]


class Churn(BaseModel):
    """Over the probe set: the share of top-k neighbours the challenger's table gives that the champion's does not."""

    probes: int
    k: int
    changed_share: float = Field(description="mean over probes of (neighbours not in the champion's top-k) / k")
    unchanged_probes: int = Field(description="probes whose top-k is the same set under both")


class Comparison(BaseModel):
    query: dict[str, str] = Field(description="the query: a stored image's id and class, or the upload's name")
    k: int
    champion: Side
    challenger: Side
    churn: Churn
    verdict: str | None = Field(description="the gate's verdict on the challenger (None: never gated)")
    reasons: list[str] = Field(description="the gate report's reasons, when it has one")


def mark_changes(champion: Sequence[Hit], challenger: Sequence[Hit]) -> tuple[list[MarkedHit], list[MarkedHit]]:
    """Both top-k lists, each hit marked against the other list."""
    rank_a = {h["id"]: r for r, h in enumerate(champion, 1)}
    rank_b = {h["id"]: r for r, h in enumerate(challenger, 1)}

    def marked(hits: Sequence[Hit], own: dict[str, int], other: dict[str, int], absent: Mark) -> list[MarkedHit]:
        out = []
        for h in hits:
            theirs = other.get(h["id"])
            mark: Mark = absent if theirs is None else ("same" if theirs == own[h["id"]] else "moved")
            out.append(
                MarkedHit.model_validate(
                    {
                        "id": h["id"],
                        "class": h["class"],
                        "distance": h["distance"],
                        "rank": own[h["id"]],
                        "mark": mark,
                        "other_rank": theirs,
                    }
                )
            )
        return out

    return marked(champion, rank_a, rank_b, "left"), marked(challenger, rank_b, rank_a, "entered")


def without(hits: Sequence[Hit], image_id: str | None, k: int) -> list[Hit]:
    """The top-k other than the query itself (a stored image finds itself first)."""
    return [h for h in hits if h["id"] != image_id][:k]


def churn(champion: LivePair, challenger: LivePair, k: int, probes: int = PROBES) -> Churn:
    """The share of changed neighbours over `probes` stored images (fixed row positions of the champion's
    table), each searched by its own stored vector in each model's own table."""
    rows = champion.rows()
    ids = [champion.row_at(int(o))["id"] for o in sample_offsets(rows, probes)]
    mine = [champion.row(i) for i in ids]
    theirs = [challenger.row(i) for i in ids]
    both = [(a, b) for a, b in zip(mine, theirs) if a is not None and b is not None]
    if not both:
        return Churn(probes=0, k=k, changed_share=0.0, unchanged_probes=0)
    a_hits = champion.nearest(np.asarray([a["vector"] for a, _ in both], dtype=np.float32), k + 1)
    b_hits = challenger.nearest(np.asarray([b["vector"] for _, b in both], dtype=np.float32), k + 1)
    changed = []
    for (a, _), ha, hb in zip(both, a_hits, b_hits):
        sa = {h["id"] for h in without(ha, a["id"], k)}
        sb = {h["id"] for h in without(hb, a["id"], k)}
        changed.append(len(sb - sa) / max(1, len(sb)))
    return Churn(
        probes=len(both),
        k=k,
        changed_share=float(np.mean(changed)),
        unchanged_probes=sum(1 for c in changed if c == 0),
    )


def compare(
    champion: LivePair,
    challenger: LivePair,
    champion_hits: Sequence[Hit],
    challenger_hits: Sequence[Hit],
    query: dict[str, str],
    k: int,
    churned: Churn,
    gate: dict | None,
    verdict: str | None,
) -> Comparison:
    a, b = mark_changes(champion_hits, challenger_hits)
    return Comparison(
        query=query,
        k=k,
        champion=Side(version=champion.version, table=champion.table_name, hits=a),
        challenger=Side(version=challenger.version, table=challenger.table_name, hits=b),
        churn=churned,
        verdict=verdict,
        reasons=list(gate.get("reasons", [])) if gate else [],
    )
