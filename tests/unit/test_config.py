"""params.yaml parsing: every key known, every error names its key."""

from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, load_params, parse_params, with_overrides
from components.workspace import resolve_workspace
from tests.conftest import PARAMS_FILE, REPO


def raw_params() -> dict:
    return yaml.safe_load(PARAMS_FILE.read_text())


def test_repository_params_load(repo_params):
    assert repo_params.train.epochs > 0
    assert repo_params.registry.model_name


def test_unknown_key_is_an_error_naming_it():
    raw = raw_params()
    raw["train"]["epoch"] = 3  # a typo of epochs
    with pytest.raises(ConfigError, match=r"train\.epoch: Extra inputs are not permitted"):
        parse_params(raw, "params.yaml")


def test_bad_value_is_an_error_naming_the_file_and_key(tmp_path: Path):
    raw = raw_params()
    raw["ingest"]["unseen_class_fraction"] = 1.5
    raw["train"]["batch_size"] = 33
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        load_params(bad)
    message = str(exc.value)
    assert f"{bad}: ingest.unseen_class_fraction" in message
    assert f"{bad}: train.batch_size: Value error, must be even" in message


def test_missing_section_and_missing_file_are_named(tmp_path: Path):
    raw = raw_params()
    del raw["gate"]
    with pytest.raises(ConfigError, match=r"params: gate: Field required"):
        parse_params(raw)
    with pytest.raises(ConfigError, match="nope.yaml: cannot read params file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_override_rejects_unknown_key(repo_params):
    with pytest.raises(ConfigError, match="train.epochz: no such key"):
        with_overrides(repo_params, {"train.epochz": 1})


def test_every_param_dvc_yaml_names_exists_in_params_yaml():
    raw = raw_params()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = [key for stage in stages.values() for key in stage.get("params", [])]
    assert declared, "dvc.yaml declares no params"
    for dotted in declared:
        node = raw
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml names {dotted}, absent from params.yaml"
            node = node[part]


def test_workspace_resolution_order(repo_params, tmp_path, monkeypatch):
    monkeypatch.setenv("MNEMO_WORKSPACE", str(tmp_path / "env"))
    assert resolve_workspace(repo_params).root == tmp_path / "env"
    assert resolve_workspace(repo_params, tmp_path / "flag").root == tmp_path / "flag"
    monkeypatch.delenv("MNEMO_WORKSPACE")
    ws = resolve_workspace(repo_params, tmp_path / "flag")
    assert ws.tracking_uri == f"sqlite:///{tmp_path / 'flag' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_workspace(repo_params, tmp_path).tracking_uri == "http://127.0.0.1:5000"


def test_a_gated_few_shot_task_must_be_measured():
    from components.config import ConfigError, with_overrides

    params = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match=r"gate.min_unseen_few_shot names \['10way_1shot'\]"):
        with_overrides(params, {"gate.min_unseen_few_shot": {"10way_1shot": 0.5}})
    assert with_overrides(params, {"gate.min_unseen_few_shot": {"20way_1shot": 0.5}}).gate.min_unseen_few_shot


def test_the_environment_is_read_in_one_place_and_its_key_never_shown(repo_params, tmp_path, monkeypatch):
    from components.workspace import resolve_workspace, settings

    monkeypatch.setenv("MNEMO_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("MNEMO_API_KEY", "s3cr3t-key")
    monkeypatch.setenv("MNEMO_DASK_ADDRESS", "")  # empty counts as unset
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u:pw@db/mlflow")
    env = settings()
    assert env.dask_address is None and env.api_key is not None
    assert "s3cr3t-key" not in repr(env) and "s3cr3t-key" not in str(env.model_dump())
    ws = resolve_workspace(repo_params)
    assert ws.root == (tmp_path / "ws").resolve() and ws.tracking_uri == "postgresql://u:pw@db/mlflow"
    assert resolve_workspace(repo_params, tmp_path / "other").root == (tmp_path / "other").resolve()  # --workspace wins


def test_the_logged_model_pins_what_constraints_txt_installs():
    from components.registry.mlflow_registry import MODEL_PACKAGES, model_requirements
    from tests.conftest import REPO

    pins = {
        line.split("==")[0].lower(): line.strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    required = model_requirements()
    assert len(required) == len(MODEL_PACKAGES)
    assert [pins[r.split("==")[0].lower()] for r in required] == required  # no drift from the pinned set
