"""The GPU suite reuses the integration tests' live workspace (tests/integration/conftest.py).

Every test here needs CUDA: `pytest -m gpu` runs them, and each module skips, saying why, where
torch sees no CUDA device (this suite is not part of `make test`, which deselects `gpu`)."""

from tests.integration.conftest import live_template, live_ws, prefect_server  # noqa: F401
