"""The retrain flow end to end on tiny rendered data: real Prefect, MLflow, LanceDB in tmp_path."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from components.data.catalog import Catalog
from components.data.demo import discover_fonts, stream_classes, write_arrival
from flows.cli import app
from flows.retrain import retrain

runner = CliRunner()


def cli(*args: str) -> dict:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_retrain_flow_promotes_a_queryable_champion(params, ws, params_file):
    fonts = discover_fonts()
    arrivals = stream_classes(fonts, params.demo)
    write_arrival(ws.inbox, 0, arrivals[0], fonts, params.demo)

    first = retrain(params, str(ws.root))
    assert first.status == "promoted", first.reasons
    assert (first.version, first.table) == ("1", "embeddings_v1")
    assert first.ingested == ["demo-000"] and not (ws.inbox / "demo-000").exists()
    for key in ("unseen_recall_at_1", "unseen_recall_at_5", "unseen_map_at_r", "baseline_unseen_recall_at_1"):
        assert 0.0 <= first.metrics[key] <= 1.0

    # The logged model stands on its own: encoded bytes in, L2-normalised float32 embeddings out.
    mlflow.set_tracking_uri(ws.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/mnemo-embedder@champion")
    catalog = Catalog.load(ws.catalog)
    held_out = catalog.records("query")[0]
    jpeg = io.BytesIO()
    Image.open(ws.classes_dir / held_out.id).convert("RGB").save(jpeg, format="JPEG")
    vectors = model.predict(pd.DataFrame({"image": [(ws.classes_dir / held_out.id).read_bytes(), jpeg.getvalue()]}))
    assert vectors.shape == (2, params.model.embedding_dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    common = ["--workspace", str(ws.root), "--params", str(params_file)]
    status = cli("status", "--json", *common)
    assert status["model_name"] == "mnemo-embedder" and status["tracking_uri"] == ws.tracking_uri
    assert status["champion"]["version"] == "1" and status["champion"]["table"] == "embeddings_v1"
    assert "unseen_recall_at_1" in status["champion"]["metrics"]

    answer = cli("query", str(ws.classes_dir / held_out.id), "--k", "3", "--json", *common)
    assert answer["model_version"] == "1"
    [hits] = answer["results"]
    # The query image is indexed too: finding it at distance ~0 shows the table was built by
    # the very model that embedded the query (a model/index mismatch could not do that).
    assert len(hits) == 3 and hits[0]["class"] == held_out.cls and hits[0]["id"] == held_out.id
    assert hits[0]["distance"] < 1e-4
    assert hits[0]["distance"] <= hits[1]["distance"] <= hits[2]["distance"]

    assert status["champion"]["table_rows"] == len(catalog.images)

    # A bad query image is refused by name, before any model is loaded.
    junk = ws.root / "junk.png"
    junk.write_bytes(b"definitely not a png")
    refused = runner.invoke(app, ["query", str(junk), *common])
    assert refused.exit_code == 2 and "junk.png: not an image" in refused.output

    # Nothing new arrived: nothing is trained, the champion stays.
    again = retrain(params, str(ws.root))
    assert again.status == "nothing_new" and again.version == "1"

    # A further arrival is learned by a new version; the live pair moves to its table.
    write_arrival(ws.inbox, 1, arrivals[1], fonts, params.demo)
    # Change thresholds off: one epoch on six images per class need not keep up with the champion, and
    # forgetting is measured against the whole gallery, where the new classes can confuse old ones.
    changes_off = {"max_unseen_recall_at_1_drop": 1.0, "max_slice_forgetting": 1.0}
    lenient = params.model_copy(update={"gate": params.gate.model_copy(update=changes_off)})
    second = retrain(lenient, str(ws.root))
    assert second.status == "promoted" and second.version == "2", second.reasons
    status = cli("status", "--json", *common)
    assert status["champion"]["table"] == "embeddings_v2"
    assert status["data"]["arrivals"] == ["demo-000", "demo-001"]
    # What users got from demo-001 before v2 learned it: v1 on every class demo-001 brought.
    [(arrival, transfer)] = status["challenger"]["forward_transfer"].items()
    assert arrival == "demo-001" and 0.0 <= transfer["recall_at_1"] <= 1.0 and "map_at_r" in transfer
    assert any(r.startswith("forward transfer to arrival demo-001") for r in status["gate"]["reasons"])


def test_query_without_a_champion_says_so(ws, params_file, tmp_path):
    image = tmp_path / "q.png"
    Image.new("RGB", (32, 32)).save(image)
    result = runner.invoke(app, ["query", str(image), "--workspace", str(ws.root), "--params", str(params_file)])
    assert result.exit_code == 1
    assert "no champion model" in result.output
