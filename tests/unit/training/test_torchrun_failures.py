"""What a failed torchrun run is reported as: the rank that died, its exit code, and why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from components.config import TrainParams, load_params
from components.training.distributed import Rendezvous, failure_message, torchrun_command
from tests.conftest import PARAMS_FILE

# torchrun 2.x's summary when rank 1 was SIGKILLed and torchrun then stopped rank 0 (SIGTERM)
KILLED = """
[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:31616.
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
components.training.distributed FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-03_17:18:15
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 31804)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 31804
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_17:18:15
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 31805)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 31805
=======================================================
"""


def test_the_killed_rank_is_named_not_the_one_torchrun_stopped():
    assert failure_message(KILLED, 1, 2) == (
        "training rank 1 of 2 died (exit -9): Signal 9 (SIGKILL) received by PID 31805"
    )


def test_the_killed_rank_is_named_also_when_the_stopped_one_left_a_traceback():
    # rank 0 was in a collective when its peer vanished: it raised, then torchrun's SIGTERM ended it
    output = KILLED.replace(
        "error_file: <N/A>\n  traceback : Signal 15 (SIGTERM) received by PID 31804",
        "error_file: /tmp/error.json\n  traceback : Traceback (most recent call last):",
    )
    assert "Signal 15" not in output
    assert failure_message(output, 1, 2).startswith("training rank 1 of 2 died (exit -9): Signal 9 (SIGKILL)")


def test_a_rank_that_raised_is_named_with_its_error():
    output = KILLED.replace("exitcode  : -9 (pid: 31805)  (SIGKILL)", "exitcode  : 1 (pid: 31805)").replace(
        "traceback : Signal 9 (SIGKILL) received by PID 31805", "traceback : Traceback (most recent call last):"
    )
    output = "[rank1]: ValueError: the replay memory read differs between ranks\n" + output
    assert failure_message(output, 1, 2) == (
        "training rank 1 of 2 failed (exit 1): ValueError: the replay memory read differs between ranks"
    )


def test_torchrun_output_without_a_summary_still_says_what_it_printed_last():
    assert failure_message("usage: torchrun ...\nerror: bad flag\n", 2, 2) == (
        "training under torchrun failed (exit 2): error: bad flag"
    )


def test_one_node_runs_one_process_per_device():
    command = torchrun_command(Path("/job"), 4)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "components.training.distributed",
        "/job",
    ]


def _train(**update: int) -> TrainParams:
    return load_params(PARAMS_FILE).train.model_copy(update=update)


def test_the_flows_node_is_node_0_of_the_pytorchjobs_rendezvous(monkeypatch):
    operator = {"MASTER_ADDR": "mnemo-retrain-master-0", "MASTER_PORT": "23456", "PET_NNODES": "3"}
    for name, value in (operator | {"PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "0"}).items():
        monkeypatch.setenv(name, value)
    rendezvous = Rendezvous.from_env(_train(devices=4, nodes=3))
    assert torchrun_command(Path("/workspace/train-job"), 4, rendezvous)[1:] == [
        "-m",
        "torch.distributed.run",
        "--nnodes=3",
        "--node-rank=0",
        "--master-addr=mnemo-retrain-master-0",
        "--master-port=23456",
        "--nproc-per-node=4",
        "-m",
        "components.training.distributed",
        "/workspace/train-job",
    ]


@pytest.mark.parametrize(
    ("env", "update", "expected"),
    [
        ({}, {"nodes": 2}, "train.nodes is 2: a step on several nodes runs on the master of a PyTorchJob"),
        ({"PET_NNODES": "3"}, {"nodes": 2}, "train.nodes is 2, but the PyTorchJob says PET_NNODES=3"),
        ({"PET_NPROC_PER_NODE": "8"}, {"nodes": 2, "devices": 4}, "train.devices is 4, but the PyTorchJob says"),
        ({"PET_NNODES": "2"}, {"nodes": 1, "devices": 2}, "train.nodes is 1, but the PyTorchJob says PET_NNODES=2"),
        ({"PET_NODE_RANK": "1"}, {"nodes": 2}, "the flow's node rank is 0, but the PyTorchJob says PET_NODE_RANK=1"),
    ],
)
def test_a_step_whose_params_disagree_with_the_pytorchjob_is_refused(monkeypatch, env, update, expected):
    for name in ("MASTER_ADDR", "MASTER_PORT", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    if env:
        monkeypatch.setenv("MASTER_ADDR", "mnemo-retrain-master-0")
        monkeypatch.setenv("MASTER_PORT", "23456")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(expected)):
        Rendezvous.from_env(_train(**update))


def test_one_node_outside_a_pytorchjob_has_no_rendezvous(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert Rendezvous.from_env(_train(devices=2, nodes=1)) is None
