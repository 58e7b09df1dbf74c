"""Failpoints: named places where a test may kill the process, to prove that every state a
crash can leave is recovered from (tests/integration/test_fault_injection.py).

Inert unless the environment variable MNEMO_FAILPOINT names the point: then the process
SIGKILLs itself the first time it gets there, as a power cut or the OOM killer would.
"""

from __future__ import annotations

import os
import signal

from components.workspace import settings

ENV = "MNEMO_FAILPOINT"  # what tests set (Settings.failpoint)


def failpoint(name: str) -> None:
    """Die here, at once and without clean-up, when MNEMO_FAILPOINT is `name`; otherwise nothing."""
    if settings().failpoint == name:
        os.kill(os.getpid(), signal.SIGKILL)
