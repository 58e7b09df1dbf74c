"""Compatible upgrades end to end: a candidate the gate declares compatible goes live on the champion's
vectors and is backfilled; a deliberately incompatible one takes the full re-index. Real Prefect,
MLflow and LanceDB in tmp_path."""

from __future__ import annotations

import copy
import json

import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from components.config import with_overrides
from components.data.catalog import Catalog
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.evaluation import keys
from components.evaluation.assessment import assess
from components.registry.mlflow_registry import GATE_COMPAT_HEATMAP, ModelRegistry
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex
from components.vectors.tables import EMBEDDED_BY, connect, is_validated, older_rows, references_base
from components.vectors.validate import verify_table
from flows.cli import app
from flows.retrain import retrain

runner = CliRunner()


def test_a_compatible_candidate_goes_live_on_the_champions_vectors_and_is_backfilled(params, ws, params_file):
    params = with_overrides(
        params,
        {
            "compat.mode": "bct",
            "compat.backfill_rows": 16,  # several batches
            "gate.min_compat_gain": -1.0,  # any candidate the gate passes is declared compatible: the path is under test
            "gate.max_unseen_recall_at_1_drop": 1.0,
            "gate.max_slice_forgetting": 1.0,
        },
    )
    fonts = discover_fonts()
    arrivals = stream_classes(fonts, params.demo)
    write_arrival(ws.inbox, 0, arrivals[0], fonts, params.demo)
    assert retrain(params, str(ws.root)).status == "promoted"
    first = connect(ws).open_table("embeddings_v1").to_arrow()
    write_arrival(ws.inbox, 1, arrivals[1], fonts, params.demo)

    second = retrain(params, str(ws.root))

    assert second.status == "promoted", second.reasons
    assert second.compatible_from == "1" and "started from v1's vectors" in second.message
    rows = len(Catalog.load(ws.catalog).records())
    assert second.backfill is not None and second.backfill["finished"]
    assert second.backfill["done"] == rows - params.index.probes  # the probes were re-embedded before it went live
    tbl = connect(ws).open_table("embeddings_v2")
    assert tbl.count_rows() == rows and older_rows(tbl, "2") == 0
    assert set(tbl.to_arrow()[EMBEDDED_BY].to_pylist()) == {"2"}
    assert not references_base(tbl)  # backfilled and re-indexed: it reads none of v1's files now
    # the champion's old table was never written: a rollback finds it as it was (caught up since)
    old = connect(ws).open_table("embeddings_v1")
    assert is_validated(old) and old.to_arrow().slice(0, len(first)).equals(first)
    verify_table(ws, old, params.index)

    registry = ModelRegistry(ws, params.registry)
    report = registry.gate_report("2")
    assert report is not None and report["compatibility"]["compatible"] is True
    assert set(report["compatibility"]["unseen"]) == {"new/new", "old/old", "cross"}
    assert report["compatibility"]["matrix"]["versions"] == ["1", "v2 (candidate)"]
    assert any(f.path == GATE_COMPAT_HEATMAP for f in registry.client.list_artifacts(registry.get("2").run_id, "gate"))
    assert keys.compat(keys.unseen("recall_at_1")) in registry.get("2").metrics
    history = MlflowClient(ws.tracking_uri).get_metric_history(registry.get("2").run_id, "backfill_rows_remaining")
    assert [m.value for m in sorted(history, key=lambda m: m.step)][-1] == 0 and len(history) >= 3

    status = runner.invoke(app, ["status", "--json", "--workspace", str(ws.root), "--params", str(params_file)])
    champion = json.loads(status.stdout)["champion"]
    assert (champion["version"], champion["compatible_from"], champion["older_rows"]) == ("2", "1", 0)

    # every stored image is found by its own query, through the live pair
    pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=60).current()
    records = Catalog.load(ws.catalog).records()
    from components.data.transforms import open_rgb

    hits = pair.query([open_rgb(ws.classes_dir / r.id) for r in records], 1)
    assert [h[0]["id"] for h in hits] == [r.id for r in records]


def test_a_version_the_gate_did_not_declare_compatible_gets_a_table_of_its_own(live_ws, params):
    ws = live_ws
    registry = ModelRegistry(ws, params.registry)
    champion = registry.load_embedder("1")
    rotated = copy.deepcopy(champion)  # the champion's geometry in another basis: its queries miss v1's vectors
    head = [m for m in rotated.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    rotation, _ = torch.linalg.qr(
        torch.randn(head.out_features, head.out_features, generator=torch.Generator().manual_seed(0))
    )
    with torch.no_grad():
        head.weight.copy_(rotation @ head.weight)
        head.bias.copy_(rotation @ head.bias)
    promoter = Promoter(ws, params.registry, params.index)
    found = assess(
        ws,
        Catalog.load(ws.catalog),
        params.evaluate,
        params.gate,
        rotated,
        champion=champion,
        champion_version="1",
        kept=promoter.kept_versions({"1": champion}),
    )
    assert found.compat is not None and found.compat.versions == ["1", "2", "candidate"]  # the kept tables
    version = registry.log_candidate(rotated, params={}, metrics={}, epoch_metrics={}, arrivals=["a0"]).version

    built = promoter.table_for(version, rotated, compatible=False)

    assert built.compatible_from is None and built.older_rows == 0  # every row embedded by its own model
    assert built.probes_found == built.probes and not references_base(connect(ws).open_table(built.table))
