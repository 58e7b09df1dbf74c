"""Dynamic batching for the service: images from concurrent requests share one forward pass
and one multi-vector search.

A forward of 8 images costs about twice one image's on a CPU, and a LanceDB query of 8
vectors less than half of 8 single queries (bench/query.py), so under concurrent load the
service answers requests together. A batch waits at most `wait_ms` for requests that have
arrived but are still being read or decoded (`coming()`), never when there are none, so a
lone client pays no wait; forwards run one at a time on a worker thread, off the event loop,
and requests that arrive during a forward form the next batch (up to `max_batch` images). Each request
keeps the live pair it took: images are batched only with others for the same model
version, so a promotion landing mid-batch never mixes versions in one answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

Owner = TypeVar("Owner")  # what embeds and searches: the live pair; batched only with itself
Answer = list[Any]  # one image's neighbours, nearest first (search.Hit dicts in the service)


@dataclass
class _Job(Generic[Owner]):
    owner: Owner
    images: Sequence[Image.Image]
    k: int
    done: asyncio.Future[list[Answer]] = field(repr=False)


class QueryBatcher(Generic[Owner]):
    """Collects (owner, images, k) from concurrent coroutines; embeds each owner's images in one
    call and searches them in one call, and hands every request its own answers.

    `embed(owner, images)` is the blocking forward (LivePair.embed), run on a worker thread;
    `search(owner, vectors, k)` the awaitable search (LivePair.search). One batcher per event loop.
    """

    def __init__(
        self,
        embed: Callable[[Owner, Sequence[Image.Image]], np.ndarray],
        search: Callable[[Owner, np.ndarray, int], Awaitable[list[Answer]]],
        *,
        wait_ms: float,
        max_batch: int,
    ) -> None:
        self._embed = embed
        self._search = search
        self.wait = wait_ms / 1000
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job[Owner]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._coming = 0  # requests read or decoded right now: a batch may wait for them

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Around a request's reading and decoding, up to its query(): batches may wait for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    async def query(self, owner: Owner, images: Sequence[Image.Image], k: int) -> list[Answer]:
        """Each image's k nearest neighbours, in order, from a forward and a search that may carry
        other requests' images too."""
        loop = asyncio.get_running_loop()
        # One worker per event loop: a test client may run each request on a loop of its own.
        if self._queue is None or self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue))
        job = _Job(owner, images, k, loop.create_future())
        self._queue.put_nowait(job)
        return await job.done

    async def close(self) -> None:
        if self._worker is not None and self._worker.get_loop() is asyncio.get_running_loop():
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def _run(self, queue: asyncio.Queue[_Job[Owner]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            size = len(jobs[0].images)
            deadline = loop.time() + self.wait
            while size < self.max_batch:
                if queue.empty():
                    left = deadline - loop.time()
                    if left <= 0 or not self._coming:  # nobody else on the way: no reason to wait
                        break
                    try:
                        jobs.append(await asyncio.wait_for(queue.get(), left))
                    except TimeoutError:
                        break
                else:
                    jobs.append(queue.get_nowait())
                size += len(jobs[-1].images)
            for owner in {id(j.owner): j.owner for j in jobs}.values():
                await self._forward(owner, [j for j in jobs if j.owner is owner])

    async def _forward(self, owner: Owner, jobs: list[_Job[Owner]]) -> None:
        images = [image for job in jobs for image in job.images]
        try:
            vectors = await asyncio.to_thread(self._embed, owner, images)
            answers = await self._search(owner, vectors, max(job.k for job in jobs))
        except Exception as exc:  # every request in the batch learns why
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(exc)
            return
        start = 0
        for job in jobs:
            if not job.done.done():  # a client that went away cancelled its future
                job.done.set_result([hits[: job.k] for hits in answers[start : start + len(job.images)]])
            start += len(job.images)
