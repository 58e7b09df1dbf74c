"""The service's dynamic batching: concurrent requests share forwards, each gets its own rows back,
versions are never mixed, and a failed forward fails every request in it."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from PIL import Image

from components.batching import ForwardBatcher


class Model:
    """Embeds an image as [version, its pixel value]; records the batch sizes it was called with."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, images) -> np.ndarray:
        self.gate.wait(5)
        self.calls.append(len(images))
        return np.array([[self.version, img.getpixel((0, 0))] for img in images], dtype=np.float32)


def image(value: int) -> Image.Image:
    return Image.new("L", (2, 2), value)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_forward_and_get_their_own_rows_in_order():
    model = Model(1)
    batcher = ForwardBatcher(Model.embed, wait_ms=50, max_batch=32)

    async def main():
        requests = [[image(10 * r + i) for i in range(r + 1)] for r in range(4)]  # 1, 2, 3, 4 images
        answers = await asyncio.gather(*(batcher.embed(model, images) for images in requests))
        await batcher.close()
        return requests, answers

    requests, answers = run(main())
    for images, vectors in zip(requests, answers):
        assert vectors[:, 1].tolist() == [img.getpixel((0, 0)) for img in images]
    assert model.calls == [10]  # ten images from four requests, one forward


def test_requests_arriving_during_a_forward_form_the_next_batch_and_max_batch_caps_it():
    model = Model(1)
    batcher = ForwardBatcher(Model.embed, wait_ms=0, max_batch=3)

    async def main():
        model.gate.clear()  # the first forward is held until the others have queued
        first = asyncio.ensure_future(batcher.embed(model, [image(0)]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.embed(model, [image(v)])) for v in range(1, 6)]
        await asyncio.sleep(0.05)
        model.gate.set()
        answers = await asyncio.gather(first, *rest)
        await batcher.close()
        return answers

    answers = run(main())
    assert [int(a[0, 1]) for a in answers] == [0, 1, 2, 3, 4, 5]
    assert model.calls == [1, 3, 2]  # no wait: the first alone; then at most max_batch at a time


def test_images_for_different_versions_are_never_embedded_together():
    old, new = Model(1), Model(2)
    batcher = ForwardBatcher(Model.embed, wait_ms=50, max_batch=32)

    async def main():
        answers = await asyncio.gather(
            batcher.embed(old, [image(1)]), batcher.embed(new, [image(2)]), batcher.embed(old, [image(3)])
        )
        await batcher.close()
        return answers

    a, b, c = run(main())
    assert (a[0, 0], b[0, 0], c[0, 0]) == (1, 2, 1)  # each request answered by the version it took
    assert old.calls == [2] and new.calls == [1]


def test_a_failed_forward_fails_every_request_in_it_and_the_next_batch_still_runs():
    calls = []

    def embed(owner, images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return np.zeros((len(images), 2), dtype=np.float32)

    batcher = ForwardBatcher(embed, wait_ms=50, max_batch=32)

    async def main():
        failed = await asyncio.gather(
            batcher.embed("v1", [image(1)]), batcher.embed("v1", [image(2)]), return_exceptions=True
        )
        after = await batcher.embed("v1", [image(3)])
        await batcher.close()
        return failed, after

    failed, after = run(main())
    assert all(isinstance(f, RuntimeError) and "out of memory" in str(f) for f in failed)
    assert after.shape == (1, 2) and calls == [2, 1]


@pytest.mark.parametrize("wait_ms", [0, 2])
def test_a_lone_request_is_answered_without_other_traffic(wait_ms):
    model = Model(3)
    batcher = ForwardBatcher(Model.embed, wait_ms=wait_ms, max_batch=32)

    async def main():
        answer = await batcher.embed(model, [image(7)])
        await batcher.close()
        return answer

    assert run(main()).tolist() == [[3.0, 7.0]]
