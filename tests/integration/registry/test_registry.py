"""Gate, registry, promote and rollback against a real MLflow (SQLite in tmp_path) and real LanceDB.

The models are untrained embedders on images whose classes differ only in hue: a random
resnet head tells hues apart well (unseen Recall@1 ~0.9+), which makes the bad candidates
below bad by construction rather than by luck of training:
- collapsed: the head's weights zeroed, every image maps to one point;
- NaN weights: the head's weights NaN, every embedding NaN;
- colour-blind: conv1 averaged over the RGB channels, so hue (the class) is invisible
  while brightness still spreads the embeddings (no collapse): worse unseen recall.
The steps mirror flows/retrain.py: assess -> register -> build index -> smoke test -> report -> promote.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import lancedb
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from components.config import Params
from components.data.catalog import Catalog
from components.data.ingest import ingest_arrival
from components.evaluation.assessment import assess
from components.evaluation.forgetting import forgetting_heatmap
from components.evaluation.gate import GateDecision, gate_markdown, gate_report
from components.modeling.embedder import Embedder, build_embedder
from components.registry.mlflow_registry import SMOKE_TAG, VERDICT_TAG, ModelRegistry, ModelVersionInfo
from components.registry.promotion import Promoter
from components.registry.version_history import served_history
from components.vectors.build import build_table
from components.vectors.search import index_smoke_test
from flows.cli import app

runner = CliRunner()
HUES = sorted(set(itertools.permutations((200, 100, 0)))) + [(150, 150, 0), (150, 0, 150), (0, 150, 150)]


@pytest.fixture()
def hue_params(params: Params) -> Params:
    """Half the classes unseen; half of each trained class's images held out as queries (a scorable seen slice)."""
    ingest = params.ingest.model_copy(update={"unseen_class_fraction": 0.5, "query_image_fraction": 0.5})
    return params.model_copy(update={"ingest": ingest})


@pytest.fixture()
def catalog(hue_params: Params, ws) -> Catalog:
    rng = np.random.default_rng(0)
    arrival = ws.inbox / "hues-0"
    for hue in HUES:
        folder = arrival / "hue-{}-{}-{}".format(*hue)
        folder.mkdir(parents=True)
        for i in range(6):
            pixels = np.array(hue)[None, None, :] * rng.uniform(0.6, 1.25) + rng.normal(0, 8, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    ingest_arrival(arrival, ws, hue_params.ingest, remove_source=True)
    return Catalog.load(ws.catalog)


def embedder(params: Params, seed: int) -> Embedder:
    torch.manual_seed(seed)
    return build_embedder(params.model).eval()


def collapsed(model: Embedder) -> Embedder:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.net.fc.weight.zero_()
        bad.net.fc.bias.normal_()
    return bad


def nan_weights(model: Embedder) -> Embedder:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.net.fc.weight.fill_(float("nan"))
    return bad


def colour_blind(model: Embedder) -> Embedder:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        w = bad.net.conv1.weight
        w.copy_(w.mean(dim=1, keepdim=True).expand_as(w))
    return bad


def retrain_step(
    ws, params: Params, catalog: Catalog, model: Embedder, *, table_model: Embedder | None = None
) -> tuple[ModelVersionInfo, GateDecision]:
    """What the retrain flow does after training, with the same component calls."""
    registry = ModelRegistry(ws, params.registry)
    champion = registry.champion()
    champion_model = registry.load_embedder(champion.version) if champion else None
    assessment = assess(
        ws,
        catalog,
        params.evaluate,
        params.gate,
        model,
        champion=champion_model,
        champion_version=champion.version if champion else None,
        champion_arrivals=champion.arrivals if champion else (),
        served=served_history(registry),
    )
    decision = assessment.decision
    info = registry.log_candidate(
        model,
        params={"test": "registry"},
        metrics=assessment.metrics,
        epoch_metrics={},
        arrivals=sorted(catalog.arrivals),
        tags={VERDICT_TAG: decision.verdict},
    )
    if decision.promote:
        built = build_table(ws, params.index, info.version, table_model or model, catalog.records())
        registry.record_index(info.version, built.table)
        smoke = index_smoke_test(ws, built.table, registry.load_pyfunc(info.version), catalog.records(), params.index)
        registry.record_smoke_test(info.version, smoke.passed, smoke.detail)
        decision = decision.with_check(smoke.passed, f"index smoke test: {smoke.detail}")
    report = gate_report(
        info.version,
        champion.version if champion else None,
        assessment.metrics,
        decision,
        params.gate,
        assessment.matrix,
    )
    registry.log_gate(
        info.version, report, gate_markdown(report), forgetting_heatmap(assessment.matrix.labelled(info.version))
    )
    if decision.promote:
        Promoter(ws, params.registry, params.index).promote(info.version, reason="passed the gate", actor="test-flow")
    return registry.get(info.version), decision


def cli(*args: str, code: int = 0) -> dict | str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 and "--json" in args else result.output


@pytest.fixture()
def common(ws, hue_params, tmp_path: Path) -> list[str]:
    path = tmp_path / "hue-params.yaml"
    path.write_text(yaml.safe_dump(hue_params.model_dump(mode="json")))
    return ["--workspace", str(ws.root), "--params", str(path)]


def test_bad_candidates_are_rejected_and_the_champion_stays(ws, hue_params, catalog, common):
    good = embedder(hue_params, 0)
    first, decision = retrain_step(ws, hue_params, catalog, good)
    assert decision.promote, decision.failed
    assert "no champion: change thresholds skipped" in decision.reasons  # promoted on value thresholds alone
    assert first.tags[SMOKE_TAG] == "passed" and first.table == "embeddings_v1"
    assert first.metrics["unseen_recall_at_1"] > 0.8  # hue classes are easy for the good model

    rejected = {}
    for name, bad, expected in [
        ("collapsed", collapsed(good), "embeddings collapsed"),
        ("nan", nan_weights(good), "embeddings contain NaN or infinite values"),
        ("colour-blind", colour_blind(good), "unseen Recall@1 dropped"),
    ]:
        info, decision = retrain_step(ws, hue_params, catalog, bad)
        assert not decision.promote, name
        assert any(expected in r for r in decision.failed), (name, decision.failed)
        assert info.tags[VERDICT_TAG] == "reject" and info.table is None  # never indexed
        assert ModelRegistry(ws, hue_params.registry).champion().version == "1"
        rejected[name] = info.version

    status = cli("status", "--json", *common)
    assert status["champion"]["version"] == "1" and status["champion"]["table"] == "embeddings_v1"
    assert status["challenger"]["version"] == rejected["colour-blind"] and status["challenger"]["verdict"] == "reject"
    assert status["gate"]["verdict"] == "reject" and status["gate"]["candidate"] == rejected["colour-blind"]
    assert any("unseen Recall@1 dropped" in r for r in status["gate"]["reasons"])
    row = status["gate"]["metrics"]["unseen_recall_at_1"]
    assert row["delta"] == pytest.approx(row["candidate"] - row["champion"]) and row["delta"] < -0.05
    assert [(p["from"], p["to"], p["actor"]) for p in status["promotions"]] == [(None, "1", "test-flow")]

    # A rejected version never became indexed: promote refuses, and --force does not skip the index.
    refused = cli("promote", rejected["colour-blind"], *common, code=1)
    assert "failed the gate" in refused and "no validated index table" in refused
    refused = cli("promote", rejected["nan"], "--force", *common, code=1)
    assert "failed the gate" not in refused and "no validated index table" in refused
    assert cli("promote", "99", *common, code=2).count("has no version '99'") == 1


def test_promote_then_rollback_restores_the_previous_version_and_its_table(ws, hue_params, catalog, common):
    lenient = hue_params.model_copy(
        update={
            "gate": hue_params.gate.model_copy(update={"max_unseen_recall_at_1_drop": 1.0, "max_slice_forgetting": 1.0})
        }
    )
    one, _ = retrain_step(ws, lenient, catalog, embedder(lenient, 0))
    two, decision = retrain_step(ws, lenient, catalog, embedder(lenient, 1))
    assert decision.promote and any("largest forgetting" in r for r in decision.reasons)  # a seen slice was compared
    assert cli("status", "--json", *common)["champion"]["table"] == "embeddings_v2"

    back = cli("rollback", "--reason", "v2 looks off", "--actor", "alice", "--json", *common)
    assert back["champion"] == "1" and back["table"] == "embeddings_v1"
    status = cli("status", "--json", *common)
    assert status["champion"]["version"] == "1" and status["champion"]["table"] == "embeddings_v1"
    assert status["champion"]["table_rows"] == len(catalog.images)  # the old table is live again, whole
    log = status["promotions"]
    assert [(p["kind"], p["from"], p["to"]) for p in log] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        ("rollback", "2", "1"),
    ]
    assert (log[-1]["reason"], log[-1]["actor"]) == ("v2 looks off", "alice") and log[0]["time"] < log[-1]["time"]
    assert "rollback v2 -> v1" in cli("status", *common)  # the human view shows the last move

    # Queries are answered by v1's model and table again: a stored image finds itself.
    image = catalog.records("query")[0]
    answer = cli("query", str(ws.classes_dir / image.id), "--k", "1", "--json", *common)
    assert answer["model_version"] == "1" and answer["results"][0][0]["id"] == image.id

    # v1 has no earlier champion: a second rollback says so and changes nothing.
    assert "v1 has no earlier champion" in cli("rollback", *common, code=1)
    again = cli("promote", "2", "--reason", "fixed upstream", "--json", *common)
    assert again["promotion"]["from"] == "1" and again["promotion"]["actor"]
    assert "already the champion" in cli("promote", "2", *common)

    # A table that went missing (pruned) bars the version, --force or not.
    lancedb.connect(ws.lancedb_uri).drop_table("embeddings_v1")
    refused = cli("rollback", *common, code=1)
    assert "embeddings_v1 is missing" in refused
    assert cli("status", "--json", *common)["champion"]["version"] == "2"


def test_failing_smoke_test_means_no_promotion(ws, hue_params, catalog, common):
    # The table is built by another network than the one registered: the model users load cannot find its probes.
    info, decision = retrain_step(ws, hue_params, catalog, embedder(hue_params, 0), table_model=embedder(hue_params, 1))
    assert not decision.promote
    assert info.tags[SMOKE_TAG] == "failed" and info.tags[VERDICT_TAG] == "reject"
    assert any("probes did not find themselves" in r for r in decision.failed)
    assert ModelRegistry(ws, hue_params.registry).champion() is None
    refused = cli("promote", info.version, "--force", *common, code=1)
    assert "failed the index smoke test" in refused


def test_rollback_with_an_empty_log_says_so(common):
    out = cli("rollback", *common, code=1)
    assert "nothing to roll back to: the promotion log of mnemo-embedder is empty" in out


def test_train_device_reaches_the_build_the_catch_up_and_the_logged_model(live_ws, params):
    """One device setting: on a machine without CUDA, asking for it fails in every place that runs
    the network, which shows the setting reaches each of them (where it is auto, they run on the CPU)."""
    from components.data.inbox import ingest_inbox
    from tests.integration.live_workspace import register_random, write_arrival

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU suite (tests/gpu) checks that path")
    no_cuda = "no CUDA device is available"
    with pytest.raises(RuntimeError, match=no_cuda):
        Promoter(live_ws, params.registry, params.index, device="cuda").reindex("2")
    write_arrival(live_ws.inbox, "a9", ["n9"], 3, seed=9)
    ingest_inbox(live_ws, params.ingest)
    with pytest.raises(RuntimeError, match=no_cuda):
        Promoter(live_ws, params.registry, params.index, device="cuda").catch_up()
    assert Promoter(live_ws, params.registry, params.index, device="cpu").catch_up().added == 3

    registry = ModelRegistry(live_ws, params.registry)
    version = register_random(live_ws, params, seed=5)  # logged with the default, as train.device auto logs it
    assert registry.load_pyfunc(version).model_config == {"device": "auto"}
    with pytest.raises(RuntimeError, match=no_cuda):  # whoever loads it may ask for another device
        registry.load_pyfunc(version, model_config={"device": "cuda"})
