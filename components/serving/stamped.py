"""A value recomputed only when what it was computed from changed: the page's views (history, embedding
map, champion against challenger) are cheap to stamp and dear to compute."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class StampedCache(Generic[T]):
    """Keeps the last `size` values by stamp; one computation at a time (concurrent requests for the
    same stamp wait for the first instead of computing it again)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._values: dict[Hashable, T] = {}
        self._lock = threading.Lock()

    def get(self, stamp: Hashable, compute: Callable[[], T]) -> tuple[T, bool]:
        """(the value for `stamp`, whether it came from the cache)."""
        with self._lock:
            if stamp in self._values:
                return self._values[stamp], True
            value = compute()
            self._values[stamp] = value
            while len(self._values) > self.size:
                self._values.pop(next(iter(self._values)))
            return value, False
