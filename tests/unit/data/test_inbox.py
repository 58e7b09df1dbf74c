"""Ingest runs racing on one workspace (the inbox scan, a retrain, the CLI) lose no arrival."""

from __future__ import annotations

import threading

from components.data.catalog import Catalog
from components.data.inbox import ingest_inbox


def test_concurrent_inbox_scans_record_every_arrival_once(params, ws):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for a in range(6):
        for c in range(2):
            folder = ws.inbox / f"arrival-{a}" / f"class-{a}-{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
                (folder / f"{i}.png").write_bytes(buf.getvalue())

    reports, errors = [], []

    def scan() -> None:
        try:
            reports.extend(ingest_inbox(ws, params.ingest))
        except Exception as exc:  # a race would surface here, e.g. a folder the other scan removed
            errors.append(exc)

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sorted(r.arrival for r in reports if r.status == "ingested") == [f"arrival-{a}" for a in range(6)]
    catalog = Catalog.load(ws.catalog)
    assert sorted(catalog.arrivals) == [f"arrival-{a}" for a in range(6)]
    assert len(catalog.images) == 6 * 2 * 3
    assert not any(ws.inbox.iterdir())
