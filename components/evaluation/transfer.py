"""Forward transfer: how the champion does on a new arrival before any model trained on it.

An arrival is hot-added at once, embedded by the champion, so until the next retrain promotes
a model that learned it, this is what users get from it. Every class the arrival brought is
scored (train, query and unseen images alike: no model has trained on any of them yet), among
themselves: Recall@1, MAP@R, and N-way 1-shot episodes with all N candidates from the
arrival (N = min(20, its classes)), Lake et al.'s within-alphabet protocol for a new alphabet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from components.config import EvaluateParams
from components.data.catalog import Catalog, ImageRecord
from components.evaluation import keys
from components.evaluation.metrics import few_shot_accuracy, score_vectors
from components.modeling.embedder import Embedder, embed_files
from components.workspace import Workspace

MAX_WAY = 20  # Lake et al.'s 20-way trials; an arrival with fewer classes uses all of them


def forward_transfer(
    ws: Workspace,
    catalog: Catalog,
    model: Embedder,
    arrivals: Sequence[str],
    params: EvaluateParams,
    vectors: Callable[[list[ImageRecord]], np.ndarray] | None = None,
) -> dict[str, float]:
    """`transfer_<slice>_recall_at_1`, `_map_at_r`, `_r_precision` and `_<N>way_1shot` of `model`
    on each arrival's own classes; arrivals with fewer than 2 classes of 2+ images are left out.
    `vectors` gives `model`'s embeddings of records a caller already embedded (else they are embedded here)."""

    def embedded(records: list[ImageRecord]) -> np.ndarray:
        return embed_files(model, [ws.classes_dir / r.id for r in records], batch_size=params.batch_size)

    by_arrival: dict[str, list[str]] = {}
    for c, meta in sorted(catalog.classes.items()):
        by_arrival.setdefault(meta["arrival"], []).append(c)
    out: dict[str, float] = {}
    for arrival in arrivals:
        classes = by_arrival.get(arrival, [])
        records = [r for c in classes for r in catalog.class_records(c)]
        labels = [r.cls for r in records]
        counts = Counter(labels)
        eligible = [c for c in classes if counts[c] >= 2]
        if len(eligible) < 2:
            continue
        x = (vectors or embedded)(records)
        s = keys.slice_key(arrival)
        out |= score_vectors(x, labels, [1], keys.key(keys.TRANSFER, s))
        way = min(MAX_WAY, len(eligible))
        accuracy = few_shot_accuracy(x, labels, way=way, shot=1, episodes=params.few_shot_episodes, seed=params.seed)
        if accuracy is not None:
            out[keys.transfer(s, keys.few_shot(way, 1))] = accuracy
    return out
