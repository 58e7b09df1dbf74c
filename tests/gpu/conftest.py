"""The GPU suite reuses the integration tests' live workspace (tests/integration/conftest.py).

Every test here needs CUDA: `pytest -m gpu` runs them, and they skip, saying why, where
torch sees no CUDA device (this suite is not part of `make test`, which deselects `gpu`)."""

import pytest
import torch

from tests.integration.conftest import live_template, live_ws, prefect_server  # noqa: F401


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False): the GPU suite needs one")
    for item in items:
        item.add_marker(skip)
