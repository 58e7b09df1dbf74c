"""What training writes to disk: per-epoch checkpoints (resumed only by the same job) and the loss state.

A checkpoint lets a crashed run resume from its last finished epoch; the loss state
(class order and proxies, see MetricLoss.state) carries over to the next retrain.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from components.config import TrainParams

CHECKPOINT_FILE = "last.pt"
LOSS_STATE_FILE = "loss_state.pt"


def fingerprint(items: Sequence[tuple[str, str]], params: TrainParams, extra: dict, init: nn.Module | None) -> str:
    """Identifies one training job, so a checkpoint is only resumed by the same job."""
    h = hashlib.sha256(json.dumps([sorted(items), params.model_dump(mode="json"), extra], default=str).encode())
    if init is not None:
        for value in init.state_dict().values():
            h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(directory: Path, job: str, epoch: int, state: dict) -> None:
    """The state after `epoch` of job `job`, written atomically: a crash mid-write leaves the previous one intact."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": job, "epoch": epoch, **state}, tmp)
    tmp.replace(path)


def load_checkpoint(directory: Path, job: str, device: torch.device) -> dict | None:
    """The last checkpoint in `directory` if job `job` wrote it (with its "epoch"), else None."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    saved = torch.load(path, map_location=device, weights_only=True)
    return saved if saved["fingerprint"] == job else None


def clear_checkpoints(directory: Path) -> None:
    """Drop a run's checkpoints once its model is safely stored elsewhere."""
    shutil.rmtree(directory, ignore_errors=True)


def save_loss_state(state: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / LOSS_STATE_FILE)


def load_loss_state(directory: Path) -> dict | None:
    path = directory / LOSS_STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
