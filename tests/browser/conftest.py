"""The browser tests reuse the integration tests' live workspace (tests/integration/conftest.py)."""

from tests.integration.conftest import live_template, live_ws, params_file  # noqa: F401
