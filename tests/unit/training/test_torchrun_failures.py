"""What a failed torchrun run is reported as: the rank that died, its exit code, and why."""

from __future__ import annotations

from pathlib import Path

from components.training.distributed import failure_message, torchrun_command

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
