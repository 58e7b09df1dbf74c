"""Metric keys: the names measurements are logged under in MLflow, read by the gate, shown in
reports and on the page. Built and parsed here, and only here.

  unseen_<metric>          the candidate on the unseen classes (never trained on)
  seen_<slice>_<metric>    the candidate on the held-out queries of the classes one arrival brought
  champion_<key>           the champion on the same images as the candidate's <key>
  baseline_<key>           raw pixels on the same images
  forgetting_<slice>       the best seen Recall@1 an earlier served version had on the slice, minus the candidate's
  transfer_<slice>_<metric>  the champion, before any training on it, on every class a new arrival brought
  compat_<key>             the candidate's queries among the champion's vectors (mapped by the candidate's
                           transform, if it has one) on the same images as <key>: backward compatibility

<metric> is recall_at_<K>, map_at_r, r_precision or <N>way_<K>shot[_within_arrival]; <slice> is
an arrival id as metric names allow it (slice_key).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

UNSEEN: Final = "unseen"
SEEN: Final = "seen"
CHAMPION: Final = "champion"
BASELINE: Final = "baseline"
FORGETTING: Final = "forgetting"
TRANSFER: Final = "transfer"
COMPAT: Final = "compat"
FORGETTING_METRIC: Final = "recall_at_1"  # the seen-class metric forgetting is measured on


def slice_key(arrival: str) -> str:
    """An arrival id as it appears in metric names (MLflow allows word characters, '.' and '-')."""
    return re.sub(r"[^\w.-]", "_", arrival)


def key(*parts: str) -> str:
    """The parts joined into one metric key: key("champion", "unseen", "map_at_r")."""
    return "_".join(parts)


def unseen(metric: str) -> str:
    return key(UNSEEN, metric)


def seen(slice_: str, metric: str) -> str:
    return key(SEEN, slice_, metric)


def champion(k: str) -> str:
    return key(CHAMPION, k)


def baseline(k: str) -> str:
    return key(BASELINE, k)


def compat(k: str) -> str:
    return key(COMPAT, k)


def forgetting(slice_: str) -> str:
    return key(FORGETTING, slice_)


def few_shot(way: int, shot: int, within: str = "all") -> str:
    """The few-shot task's metric name: 20way_1shot, or 5way_1shot_within_arrival for episodes
    whose classes all come from one arrival."""
    return f"{way}way_{shot}shot" + ("" if within == "all" else f"_within_{within}")


def under(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The metrics whose keys start with `<prefix>_`, that prefix removed."""
    head = prefix + "_"
    return {k[len(head) :]: v for k, v in metrics.items() if k.startswith(head)}


def slice_values(metrics: Mapping[str, float], metric: str = FORGETTING_METRIC) -> dict[str, float]:
    """{slice: value} of every `seen_<slice>_<metric>` key."""
    tail = "_" + metric
    return {k[: -len(tail)]: v for k, v in under(metrics, SEEN).items() if k.endswith(tail) and len(k) > len(tail)}


def is_scored(k: str) -> bool:
    """Whether the key is one of the candidate's own retrieval scores (unseen or a seen slice)."""
    return k.startswith((UNSEEN + "_", SEEN + "_"))


def transfer(slice_: str, metric: str) -> str:
    return key(TRANSFER, slice_, metric)


def transfer_values(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """{slice: {metric: value}} of the `transfer_<slice>_<metric>` keys (slices found by their Recall@1)."""
    found = under(metrics, TRANSFER)
    tail = "_recall_at_1"
    slices = sorted(k[: -len(tail)] for k in found if k.endswith(tail))
    return {s: {k[len(s) + 1 :]: v for k, v in found.items() if k.startswith(s + "_")} for s in slices}
