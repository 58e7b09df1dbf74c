"""Which failures are worth trying again: a server or store that is briefly away, not a bug.

The flows retry a step only when this says its error is transient, so a wrong input or a
failed validation fails at once, with its own message, instead of three times slower.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

# MLflow error codes a server returns when asked again later may well succeed.
_MLFLOW_TRANSIENT_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE",
    "SERVICE_UNDER_MAINTENANCE",
    "DEADLINE_EXCEEDED",
    "ABORTED",
}
# OS errors that say something is wrong with the request, not with the moment.
_PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EROFS,
    errno.ENOSPC,
    errno.EINVAL,
}
# Messages of errors raised as generic types by MLflow's SQL stores and LanceDB's object stores.
_TRANSIENT_MESSAGES = (
    "database is locked",
    "connection refused",
    "connection reset",
    "timed out",
    "temporarily unavailable",
    "too many connections",
    "server closed the connection",
    "max retries exceeded",
)


def is_transient(exc: BaseException) -> bool:
    """True for network, I/O and 'try again later' errors of MLflow, LanceDB and the file system."""
    from mlflow.exceptions import MlflowException  # only when a failure is classified

    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        # Connection failures and timeouts reach us as MlflowException("API request to ... failed ...").
        return exc.error_code in _MLFLOW_TRANSIENT_CODES or _says_transient(str(exc))
    if isinstance(exc, OSError):  # LanceDB raises its I/O errors as OSError too
        return exc.errno not in _PERMANENT_ERRNOS and not isinstance(exc, (FileNotFoundError, PermissionError))
    return _says_transient(str(exc)) and type(exc).__name__ in {"OperationalError", "LanceError", "RuntimeError"}


def _says_transient(message: str) -> bool:
    lowered = message.lower()
    return any(m in lowered for m in _TRANSIENT_MESSAGES)


def is_store_locked(exc: BaseException) -> bool:
    """True when `exc`, or an error it was raised from, is SQLite's "database is locked": another
    process holds the store (transient too: the flows retry it; the CLI says it in one line)."""
    return any("database is locked" in str(e).lower() for e in causes(exc))


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from: its cause, else the error it was raised while handling
    (unless `raise ... from None` hid that)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
