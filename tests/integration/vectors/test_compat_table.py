"""A compatible version's table: started from the champion's vectors (a shallow clone, or a transformed
copy), its probe rows re-embedded by the new model and validated, backfilled in batches, and the
predecessor kept while the clone reads its files (components/vectors/compat.py, backfill.py), on real
LanceDB tables."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from components.data.catalog import Catalog
from components.registry.mlflow_registry import ModelRegistry
from components.training.compat import Transform
from components.vectors import backfill
from components.vectors.build import cleanup_tables
from components.vectors.compat import NotCompatible, start_compatible_table
from components.vectors.search import search
from components.vectors.tables import (
    COMPAT_FROM,
    EMBEDDED_BY,
    MODEL_VERSION,
    compat_from,
    connect,
    older_rows,
    references_base,
    vector_metadata,
)
from components.vectors.validate import verify_table


def _register(ws, params, model) -> str:
    return (
        ModelRegistry(ws, params.registry)
        .log_candidate(model, params={}, metrics={}, epoch_metrics={}, arrivals=["a0"])
        .version
    )


def _champion_model(ws, params):
    return ModelRegistry(ws, params.registry).load_embedder("1")


def _stored(ws, table: str) -> dict[str, np.ndarray]:
    rows = connect(ws).open_table(table).to_arrow()
    return dict(zip(rows["id"].to_pylist(), np.asarray(rows["vector"].to_pylist(), dtype=np.float32)))


def test_a_compatible_table_starts_as_a_clone_and_the_backfill_makes_it_the_new_models(live_ws, params):
    ws, records = live_ws, Catalog.load(live_ws.catalog).records()
    before = _stored(ws, "embeddings_v1")
    old = _champion_model(ws, params)
    new = copy.deepcopy(old)  # the same network: trivially compatible
    with torch.no_grad():  # ... but not the same vectors, so the backfill shows
        for p in new.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    version = _register(ws, params, new)

    built = start_compatible_table(ws, params.index, version, new, ("1", "embeddings_v1"), records)

    tbl = connect(ws).open_table(built.table)
    probes = params.index.probes  # re-embedded by the new model first: what validation and the smoke test probe
    assert built.compatible_from == "1" and built.rows == len(records) and built.older_rows == len(records) - probes
    assert built.probes_found == built.probes == probes
    assert vector_metadata(tbl, MODEL_VERSION) == version
    assert compat_from(tbl.schema) == {"version": "1", "table": "embeddings_v1", "mode": "shared"}
    assert references_base(tbl)  # a shallow clone: the champion's files, not a copy
    assert _stored(ws, built.table).keys() == before.keys()
    carried = tbl.search().where(f"{EMBEDDED_BY} IS NULL").select(["id", "vector"]).limit(None).to_arrow()
    assert carried.num_rows == len(records) - probes
    assert all(
        np.array_equal(np.asarray(v, dtype=np.float32), before[i])
        for i, v in zip(carried["id"].to_pylist(), carried["vector"].to_pylist())
    )
    # the clean-up keeps the table the clone reads, whatever keep_tables says
    assert "embeddings_v1" not in cleanup_tables(
        ws, params.index.model_copy(update={"keep_tables": 2}), keep={built.table}
    )

    arrivals = backfill.newest_first(Catalog.load(ws.catalog))
    batches = backfill.pending_batches(tbl, version, arrivals, rows=25, batches=10)
    assert [len(b) for b in batches] == [25, 19]
    left = None
    for batch in batches:
        left = backfill.commit_batch(
            ws, tbl, backfill.embed_batch(ws, new, batch, params.index, version), params.index, version
        )
        verify_table(ws, tbl, params.index)  # every commit leaves a table that answers
    assert left == 0 and older_rows(tbl, version) == 0
    assert set(tbl.to_arrow()[EMBEDDED_BY].to_pylist()) == {version}
    backfill.finish(tbl, params.index)
    assert not references_base(connect(ws).open_table(built.table))
    # the champion's table was never written
    assert all(np.array_equal(v, before[i]) for i, v in _stored(ws, "embeddings_v1").items())
    assert verify_table(ws, connect(ws).open_table("embeddings_v1"), params.index) == len(records)


def _rotated(model, rotation: torch.Tensor):
    """The model followed by an orthogonal rotation of its embedding space (folded into its head)."""
    rotated = copy.deepcopy(model)
    head = [m for m in rotated.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.copy_(rotation @ head.weight)
        head.bias.copy_(rotation @ head.bias)
    return rotated


def _exact_transform(rotation: torch.Tensor) -> Transform:
    """A Transform that is exactly x -> rotation @ x: the residual plus (rotation - I) x, through the
    ReLU as relu(x) - relu(-x)."""
    dim = len(rotation)
    transform = Transform(dim, dim, 2 * dim)
    eye = torch.eye(dim)
    with torch.no_grad():
        transform.net[0].weight.copy_(torch.cat([eye, -eye]))
        transform.net[0].bias.zero_()
        transform.net[2].weight.copy_(torch.cat([rotation - eye, eye - rotation], dim=1))
        transform.net[2].bias.zero_()
    return transform


def test_a_transform_moves_the_champions_vectors_into_the_new_space(live_ws, params):
    ws, records = live_ws, Catalog.load(live_ws.catalog).records()
    old = _champion_model(ws, params)
    rotation, _ = torch.linalg.qr(
        torch.randn(old.embedding_dim, old.embedding_dim, generator=torch.Generator().manual_seed(3))
    )
    new = _rotated(old, rotation)  # another space entirely: v1's vectors are no answer to its queries
    version = _register(ws, params, new)
    transform = _exact_transform(rotation)

    built = start_compatible_table(ws, params.index, version, new, ("1", "embeddings_v1"), records, transform=transform)

    tbl = connect(ws).open_table(built.table)
    assert not references_base(tbl)  # a table of its own: the vectors were rewritten
    assert compat_from(tbl.schema)["mode"] == "transform"
    mapped, before = _stored(ws, built.table), _stored(ws, "embeddings_v1")
    for image_id, vector in mapped.items():
        np.testing.assert_allclose(vector, rotation.numpy() @ before[image_id], atol=1e-5)
    assert built.probes_found == built.probes and older_rows(tbl, version) == len(records) - params.index.probes


def test_a_champion_table_still_under_backfill_cannot_seed_another_compatible_table(live_ws, params):
    ws, records = live_ws, Catalog.load(live_ws.catalog).records()
    model = _champion_model(ws, params)
    first = _register(ws, params, model)
    built = start_compatible_table(ws, params.index, first, model, ("1", "embeddings_v1"), records)
    second = _register(ws, params, model)
    with pytest.raises(NotCompatible, match="still holds 44 rows of an older model"):
        start_compatible_table(ws, params.index, second, model, (first, built.table), records)


def test_queries_answer_from_a_compatible_table_during_its_backfill(live_ws, params):
    ws, records = live_ws, Catalog.load(live_ws.catalog).records()
    model = _champion_model(ws, params)
    version = _register(ws, params, model)
    built = start_compatible_table(ws, params.index, version, model, ("1", "embeddings_v1"), records)
    tbl = connect(ws).open_table(built.table)
    vectors = _stored(ws, "embeddings_v1")
    probe_ids = sorted(vectors)[:5]
    queries = np.stack([vectors[i] for i in probe_ids])
    [batch] = backfill.pending_batches(tbl, version, [], rows=30, batches=1)
    backfill.commit_batch(ws, tbl, backfill.embed_batch(ws, model, batch, params.index, version), params.index, version)
    assert older_rows(tbl, version) == len(records) - params.index.probes - 30
    answers = search(ws, built.table, queries, 3, params.index)
    assert [a[0]["id"] for a in answers] == probe_ids  # the same model: every row still finds itself
    assert COMPAT_FROM.encode() in tbl.schema.field("vector").metadata
