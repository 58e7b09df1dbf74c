"""Dynamic batching for the service: images from concurrent requests share one forward pass.

A forward of 8 images costs about twice one image's on a CPU (bench/query.py), so under
concurrent load the service embeds requests together. The first request to arrive waits at
most `wait_ms` for others (up to `max_batch` images); forwards run one at a time on a worker
thread, off the event loop, and requests that arrive during a forward form the next batch.
Each request keeps the live pair it took: images are batched only with others for the same
model version, so a promotion landing mid-batch never mixes versions in one answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

Embedder = TypeVar("Embedder")  # whatever embeds: the live pair; batched only with itself


@dataclass
class _Job(Generic[Embedder]):
    owner: Embedder
    images: Sequence[Image.Image]
    done: asyncio.Future[np.ndarray] = field(repr=False)


class ForwardBatcher(Generic[Embedder]):
    """Collects (owner, images) from concurrent coroutines and embeds each owner's images in one call.

    `embed(owner, images)` is the blocking forward (LivePair.embed); one batcher per event loop.
    """

    def __init__(
        self, embed: Callable[[Embedder, Sequence[Image.Image]], np.ndarray], *, wait_ms: float, max_batch: int
    ) -> None:
        self._embed = embed
        self.wait = wait_ms / 1000
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job[Embedder]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # forwards run, for tests and the bench
        self.images = 0

    async def embed(self, owner: Embedder, images: Sequence[Image.Image]) -> np.ndarray:
        """The images' embeddings, in order, from a forward that may carry other requests' images too."""
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(self._queue))
        job = _Job(owner, images, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.done

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def _run(self, queue: asyncio.Queue[_Job[Embedder]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            size = len(jobs[0].images)
            deadline = loop.time() + self.wait
            while size < self.max_batch:
                if queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
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

    async def _forward(self, owner: Embedder, jobs: list[_Job[Embedder]]) -> None:
        images = [image for job in jobs for image in job.images]
        try:
            vectors = await asyncio.to_thread(self._embed, owner, images)
        except Exception as exc:  # every request in the batch learns why
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(exc)
            return
        self.batches += 1
        self.images += len(images)
        start = 0
        for job in jobs:
            if not job.done.done():  # a client that went away cancelled its future
                job.done.set_result(vectors[start : start + len(job.images)])
            start += len(job.images)
