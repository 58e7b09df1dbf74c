"""The service's access log without query strings: a client may put a secret there
(`?api_key=...`, refused by the service, which reads the key only from the Authorization
header), and an access log line is kept, shipped and read by many. Paths stay; whatever
follows `?` is dropped."""

from __future__ import annotations

import copy
import logging
from typing import Any


class DropQueryStrings(logging.Filter):
    """Rewrites uvicorn's access records (client, method, path, http version, status) to the path alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?<query dropped>", *args[3:])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration, its access handler filtered (given to every worker process)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["drop_query_strings"] = {"()": f"{__name__}.DropQueryStrings"}
    config["handlers"]["access"]["filters"] = ["drop_query_strings"]
    return config
