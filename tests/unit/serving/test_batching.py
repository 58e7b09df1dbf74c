"""The service's dynamic batching: concurrent requests share forwards and searches, each gets its
own answers back (its own k), versions are never mixed, and a failure fails every request in it."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from PIL import Image

from components.serving.batching import QueryBatcher


class Model:
    """Embeds an image as [version, its pixel value]; "searching" a vector answers k hits naming both.
    Records the batch sizes it embedded and searched."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.calls: list[int] = []
        self.searches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, images) -> np.ndarray:
        self.gate.wait(5)
        self.calls.append(len(images))
        return np.array([[self.version, img.getpixel((0, 0))] for img in images], dtype=np.float32)

    async def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, int, int]]]:
        self.searches.append(len(vectors))
        return [[(int(v[0]), int(v[1]), rank) for rank in range(k)] for v in vectors]


def batcher(wait_ms: float, max_batch: int = 32) -> QueryBatcher:
    return QueryBatcher(Model.embed, Model.search, wait_ms=wait_ms, max_batch=max_batch)


def image(value: int) -> Image.Image:
    return Image.new("L", (2, 2), value)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_forward_and_a_search_and_get_their_own_answers_in_order():
    model = Model(1)
    b = batcher(wait_ms=50)

    async def main():
        requests = [[image(10 * r + i) for i in range(r + 1)] for r in range(4)]  # 1, 2, 3, 4 images
        answers = await asyncio.gather(*(b.query(model, images, k=r + 1) for r, images in enumerate(requests)))
        await b.close()
        return requests, answers

    requests, answers = run(main())
    for r, (images, answer) in enumerate(zip(requests, answers)):
        assert [hits[0][1] for hits in answer] == [img.getpixel((0, 0)) for img in images]
        assert all(len(hits) == r + 1 for hits in answer)  # each request its own k
    assert model.calls == [10] and model.searches == [10]  # ten images from four requests: one of each


def test_requests_arriving_during_a_forward_form_the_next_batch_and_max_batch_caps_it():
    model = Model(1)
    b = batcher(wait_ms=0, max_batch=3)

    async def main():
        model.gate.clear()  # the first forward is held until the others have queued
        first = asyncio.ensure_future(b.query(model, [image(0)], 1))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.query(model, [image(v)], 1)) for v in range(1, 6)]
        await asyncio.sleep(0.05)
        model.gate.set()
        answers = await asyncio.gather(first, *rest)
        await b.close()
        return answers

    answers = run(main())
    assert [a[0][0][1] for a in answers] == [0, 1, 2, 3, 4, 5]
    assert model.calls == [1, 3, 2]  # no wait: the first alone; then at most max_batch at a time


def test_images_for_different_versions_are_never_embedded_together():
    old, new = Model(1), Model(2)
    b = batcher(wait_ms=50)

    async def main():
        answers = await asyncio.gather(
            b.query(old, [image(1)], 1), b.query(new, [image(2)], 1), b.query(old, [image(3)], 1)
        )
        await b.close()
        return answers

    first, second, third = run(main())
    # each request answered by the version it took
    assert (first[0][0][0], second[0][0][0], third[0][0][0]) == (1, 2, 1)
    assert old.calls == [2] and new.calls == [1]


def test_a_failed_forward_fails_every_request_in_it_and_the_next_batch_still_runs():
    calls = []

    def embed(owner, images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return np.zeros((len(images), 2), dtype=np.float32)

    async def search(owner, vectors, k):
        return [["hit"] * k for _ in vectors]

    b = QueryBatcher(embed, search, wait_ms=50, max_batch=32)

    async def main():
        failed = await asyncio.gather(
            b.query("v1", [image(1)], 1), b.query("v1", [image(2)], 1), return_exceptions=True
        )
        after = await b.query("v1", [image(3)], 2)
        await b.close()
        return failed, after

    failed, after = run(main())
    assert all(isinstance(f, RuntimeError) and "out of memory" in str(f) for f in failed)
    assert after == [["hit", "hit"]] and calls == [2, 1]


@pytest.mark.parametrize("wait_ms", [0, 2])
def test_a_lone_request_is_answered_without_other_traffic(wait_ms):
    model = Model(3)
    b = batcher(wait_ms=wait_ms)

    async def main():
        answer = await b.query(model, [image(7)], 1)
        await b.close()
        return answer

    assert run(main()) == [[(3, 7, 0)]]


def test_a_batch_waits_only_for_requests_on_their_way_never_for_nobody():
    model = Model(1)
    b = batcher(wait_ms=1000)

    async def lone():
        start = asyncio.get_running_loop().time()
        await b.query(model, [image(1)], 1)
        return asyncio.get_running_loop().time() - start

    async def with_one_coming():
        async def late():
            with b.coming():  # reading and decoding its upload
                await asyncio.sleep(0.05)
            return await b.query(model, [image(3)], 1)

        later = asyncio.ensure_future(late())
        await asyncio.sleep(0)  # `late` has announced itself
        first = await b.query(model, [image(2)], 1)
        return first, await later

    async def main():
        waited = await lone()
        first, second = await with_one_coming()
        await b.close()
        return waited, first, second

    waited, first, second = run(main())
    assert waited < 0.5  # a lone request: no one on the way, so no 1 s wait
    assert (first[0][0][1], second[0][0][1]) == (2, 3)
    assert model.calls == [1, 2]  # the second request, on its way, joined the first's forward


def test_each_event_loop_gets_its_own_worker():
    """A test client (or a server restart) may run requests on a new loop: they are still answered."""
    model = Model(1)
    b = batcher(wait_ms=0)
    assert run(b.query(model, [image(1)], 1))[0][0][1] == 1
    assert run(b.query(model, [image(2)], 1))[0][0][1] == 2  # a second asyncio.run: another loop
