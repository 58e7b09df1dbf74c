"""What a newcomer sees in the terminal: no telemetry errors offline, no MLflow download bar in a
log file, and one line saying whether the demo's model beat raw pixels at each step."""

from __future__ import annotations

import os
import sys

from components.training.planning import RetrainSummary
from flows.cli import _setup
from flows.demo import DemoStep, pixel_verdict
from tests.conftest import REPO


def step(n: int, r1: float, pixel_r1: float, mapr: float = 0.5, pixel_mapr: float = 0.2) -> DemoStep:
    metrics = {
        "unseen_recall_at_1": r1,
        "baseline_unseen_recall_at_1": pixel_r1,
        "unseen_map_at_r": mapr,
        "baseline_unseen_map_at_r": pixel_mapr,
    }
    return DemoStep(n, RetrainSummary(status="promoted", message="", metrics=metrics), 1.0)


def test_the_demo_says_in_one_line_whether_the_model_beat_pixels_at_each_step():
    ahead = [step(0, 0.62, 0.48), step(1, 0.76, 0.39)]
    assert pixel_verdict(ahead) == "model vs raw pixels: ahead at every step (2 of 2, unseen Recall@1 and MAP@R)"
    skipped = DemoStep(2, RetrainSummary(status="nothing_new", message=""), 1.0)  # no model trained: not scored
    assert "2 of 2" in pixel_verdict([*ahead, skipped])
    behind = pixel_verdict([step(0, 0.467, 0.481, 0.2, 0.15), step(1, 0.7, 0.4)])
    assert behind == "model vs raw pixels: behind at step 0 (R@1 0.467 vs 0.481, MAP@R 0.200 vs 0.150)"


def test_mnemo_turns_prefect_telemetry_off_and_mlflows_download_bar_off_when_stderr_is_no_terminal(
    tmp_path, monkeypatch
):
    for name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    _setup(REPO / "params.yaml", tmp_path / "ws")
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_a_terminal_keeps_mlflows_progress_bar_and_a_users_own_setting_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _setup(REPO / "params.yaml", tmp_path / "ws")
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
