"""Compatibility benchmark: what backward-compatible training costs, what it buys, and how fast a
compatible version goes live (README "Compatible upgrades").

Part `quality` (both streams of bench/continual.py, side by side in one run): the stream's arrivals
are learned by mnemo's real continual step (train_continual, replay + distillation as params.yaml
says) three times, under compat.mode none, bct and transform, the first arrival shared. At every
promotion (each later arrival) the old model (before the step) and the new one (after) are scored
on every unseen class so far:
  new/new   the new model's queries among its own vectors
  old/old   the old model's among its own
  cross     the new model's queries among the old model's vectors (transform: mapped into its space)
plus the backfill curve: the new model's queries while the gallery is re-embedded newest arrivals
first (0, 25, 50, 75, 100% of the rows), which must never fall below old/old. BCT's prototypes are
the old model's class means over every stored image of the class, as the retrain flow reads them
from the champion's table.

Part `promotion`: a workspace whose catalog and live table hold N images (synthetic rows as in
bench/scale.py: random unit vectors of a registered random resnet18, v1; only the files a step reads
are written), one gated candidate v2 (v1's network: compatible), and the time from the passed gate
to the alias moving, for the compatible path (Promoter.table_for: a shallow clone, probes re-embedded,
validated; the smoke test with the model as users load it; Promoter.promote) beside today's path (a
full re-index, the same smoke test and promotion), at each N. The full re-index embeds every image:
measured up to --full-max rows, its rate projected beyond. Then the backfill of the compatible table
against the re-index on the same images (rows per second), with a reader querying the live pair the
whole time (errors counted).

    python -m bench.compat --parts quality --epochs 10      # both streams, three modes
    python -m bench.compat --parts promotion --sizes 10000,100000,1000000

Writes bench/results/<date>-compat[-tag].json and .md (after each stream and size: a run stopped
part-way keeps what it finished).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.common import REPO, RESULTS, command_line, machine, markdown_table, write_run
from bench.continual import COMMON, FULL, QUICK, QUICK_DRAWERS, Stream, demo_stream, omniglot_stream
from components.config import Params, load_params, with_overrides
from components.data.catalog import Catalog, ImageRecord
from components.evaluation.metrics import metrics_device, retrieval_metrics
from components.modeling.embedder import Embedder, embed_files
from components.training.compat import Transform, class_prototypes
from components.training.continual import ContinualResult, Recipe, train_continual
from components.workspace import resolve_workspace

MODES = ("none", "bct", "transform")
BACKFILL_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


# --- quality ---------------------------------------------------------------------------------


def scores(queries: np.ndarray, gallery: np.ndarray, labels: list[str]) -> dict[str, float]:
    found = retrieval_metrics(queries, labels, [1], gallery=gallery, device=metrics_device())
    return {"recall_at_1": found.recall_at[1], "map_at_r": found.map_at_r}


def promotion_scores(
    old: Embedder,
    new: Embedder,
    transform: Transform | None,
    records: list[ImageRecord],
    classes_dir: Path,
    order: list[str],
) -> dict:
    """new/new, old/old, cross and the backfill curve on `records` (the unseen images so far)."""
    paths, labels = [classes_dir / r.id for r in records], [r.cls for r in records]
    x_old, x_new = embed_files(old, paths), embed_files(new, paths)
    carried = x_old if transform is None else transform.to_new(x_old)
    rank = {a: i for i, a in enumerate(order)}  # newest arrival first, as the backfill goes
    by_arrival = np.argsort([rank[r.arrival] for r in records], kind="stable")
    curve = []
    for share in BACKFILL_SHARES:
        gallery = carried.copy()
        done = by_arrival[: round(share * len(records))]
        gallery[done] = x_new[done]
        curve.append(scores(x_new, gallery, labels)["recall_at_1"])
    return {
        "new/new": scores(x_new, x_new, labels),
        "old/old": scores(x_old, x_old, labels),
        "cross": scores(x_new, carried, labels),
        "backfill_recall_at_1": curve,
    }


def run_mode(mode: str, stream: Stream, params: Params, first: ContinualResult, state_root: Path) -> dict:
    p = with_overrides(params, {"compat.mode": mode})
    ws = resolve_workspace(p, stream.ws_root)
    catalog = Catalog.load(ws.catalog)
    train, records = catalog.records("train"), catalog.records()
    model, state = first.train.model, first.save_state(state_root / mode / "0")
    steps = []
    for k, arrival in enumerate(stream.arrivals[1:], start=1):
        so_far = stream.arrivals[: k + 1]
        new = [r for r in train if r.arrival == arrival]
        gallery = [r for r in records if r.arrival in so_far]
        prototypes = None
        if mode == "bct":  # the champion's table: every stored image so far, embedded by the old model
            prototypes = class_prototypes(
                embed_files(model, [ws.classes_dir / r.id for r in gallery]), [r.cls for r in gallery]
            )
        cpu = time.process_time()
        step = train_continual(new, ws.classes_dir, Recipe.of(p), init=model, state=state, prototypes=prototypes)
        cpu = time.process_time() - cpu
        unseen = [r for r in gallery if r.role == "unseen"]
        scored = promotion_scores(model, step.train.model, step.transform, unseen, ws.classes_dir, so_far[::-1])
        steps.append({"arrival": arrival, "cpu_seconds": cpu, **scored} | step.metrics())
        print(
            f"  {mode} {arrival}: new/new {scored['new/new']['recall_at_1']:.3f}, old/old "
            f"{scored['old/old']['recall_at_1']:.3f}, cross {scored['cross']['recall_at_1']:.3f}, {cpu:.0f} CPU s",
            flush=True,
        )
        model, state = step.train.model, step.save_state(state_root / mode / str(k))
    return {"steps": steps}


def quality(params: Params, streams: list[str], quick: bool, tmp: Path, report: dict, stem: Path) -> None:
    base = with_overrides(params, (QUICK if quick else FULL) | COMMON)
    for name in streams:
        root = tmp / name
        stream = (
            demo_stream(base, root, 5)
            if name == "demo"
            else omniglot_stream(base, root, drawers=QUICK_DRAWERS if quick else 20)
        )
        ws = resolve_workspace(base, root)
        first_records = [r for r in Catalog.load(ws.catalog).records("train") if r.arrival == stream.arrivals[0]]
        print(f"{stream.name}: {len(stream.arrivals)} arrivals; first arrival shared by the modes", flush=True)
        first = train_continual(first_records, ws.classes_dir, Recipe.of(base))
        report["quality"][name] = {
            "arrivals": stream.arrivals,
            "modes": {m: run_mode(m, stream, base, first, tmp / "state" / name) for m in MODES},
        }
        report["quality_targets"] = quality_targets(report["quality"])
        write_run(stem, report, markdown(report))


def quality_targets(found: dict) -> dict:
    """Per stream: the new/new cost of each compatible mode against none (<= 0.015 unseen R@1 at every
    promotion), cross minus old/old (> 0 at every promotion), the backfill curve's lowest point minus old/old."""
    out = {}
    for stream, r in found.items():
        none = r["modes"]["none"]["steps"]
        per = {}
        for mode in ("bct", "transform"):
            steps = r["modes"][mode]["steps"]
            cost = [n["new/new"]["recall_at_1"] - s["new/new"]["recall_at_1"] for n, s in zip(none, steps)]
            gain = [s["cross"]["recall_at_1"] - s["old/old"]["recall_at_1"] for s in steps]
            gain_map = [s["cross"]["map_at_r"] - s["old/old"]["map_at_r"] for s in steps]
            dip = [min(s["backfill_recall_at_1"]) - s["old/old"]["recall_at_1"] for s in steps]
            per[mode] = {
                "new_new_cost": cost,
                "cost_met": max(cost) <= 0.015,
                "cross_gain": gain,
                "cross_gain_map": gain_map,
                "gain_met": min(gain) > 0 and min(gain_map) > 0,
                "backfill_low_minus_old_old": dip,
            }
        out[stream] = per
    return out


# --- promotion -------------------------------------------------------------------------------


def promotion(params: Params, sizes: list[int], full_max: int, tmp: Path, report: dict, stem: Path) -> None:
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"compat-{n}-", dir=tmp) as root:
            report["promotion"][str(n)] = promotion_at(params, n, n <= full_max, Path(root))
            write_run(stem, report, markdown(report))


def promotion_at(params: Params, n: int, full: bool, root: Path) -> dict:
    from bench.scale import noise_png, setup
    from components.registry.mlflow_registry import SMOKE_TAG, VERDICT_TAG, ModelRegistry
    from components.registry.promotion import Promoter
    from components.vectors.compat import own_records
    from components.vectors.search import index_smoke_test, probe_records
    from components.vectors.tables import connect, open_table

    p = with_overrides(params, {"paths.workspace": str(root), "train.device": "cpu"})
    ws = resolve_workspace(p, root)
    start = time.perf_counter()
    built = setup(root, p, n, ann=n >= p.index.ann_min_rows)
    setup_seconds = time.perf_counter() - start
    records = Catalog.load(ws.catalog).records()
    rng = np.random.default_rng(n)
    needed = records if full else probe_records(records, p.index.probes)  # the files a step reads
    for r in needed:
        (ws.classes_dir / r.id).parent.mkdir(parents=True, exist_ok=True)
        (ws.classes_dir / r.id).write_bytes(noise_png(rng))
    registry = ModelRegistry(ws, p.registry)
    model = registry.load_embedder("1")
    gated = {VERDICT_TAG: "promote", SMOKE_TAG: "passed"}
    promoter = Promoter(ws, p.registry, p.index, "cpu")

    def gate_to_alias(version: str, compatible: bool) -> dict:
        """Passed gate -> table -> smoke test -> alias, as the retrain flow runs them."""
        t0 = time.perf_counter()
        table = promoter.table_for(version, model, compatible=compatible)
        t1 = time.perf_counter()
        registry.record_index(version, table.table, ann_recall=table.ann_recall)
        own = own_records(open_table(connect(ws), ws, table.table), version, records)
        smoke = index_smoke_test(ws, table.table, registry.load_pyfunc(version), own, p.index)
        registry.record_smoke_test(version, smoke.passed, smoke.detail)
        t2 = time.perf_counter()
        promoter.promote(version, table=table.table, reason="bench", actor="bench.compat")
        t3 = time.perf_counter()
        assert smoke.passed, smoke.detail
        return {
            "table_seconds": t1 - t0,
            "smoke_seconds": t2 - t1,
            "promote_seconds": t3 - t2,
            "total_seconds": t3 - t0,
        }

    out: dict = {"rows": n, "setup_seconds": round(setup_seconds, 1), "setup": built["setup"]}
    compatible = registry.log_candidate(
        copy.deepcopy(model), params={}, metrics={}, epoch_metrics={}, arrivals=["history"], tags=gated
    ).version
    out["compatible"] = gate_to_alias(compatible, True)
    print(f"{n:,}: compatible path {out['compatible']['total_seconds']:.1f} s", flush=True)
    if full:
        whole = registry.log_candidate(
            copy.deepcopy(model), params={}, metrics={}, epoch_metrics={}, arrivals=["history"], tags=gated
        ).version
        out["full"] = gate_to_alias(whole, False)
        out["full"]["rows_per_second"] = n / out["full"]["table_seconds"]
        print(f"{n:,}: full re-index path {out['full']['total_seconds']:.1f} s", flush=True)
        # the backfill of a compatible table over the same images, with a reader querying all along
        again = registry.log_candidate(
            copy.deepcopy(model), params={}, metrics={}, epoch_metrics={}, arrivals=["history"], tags=gated
        ).version
        gate_to_alias(again, True)
        out["backfill"] = backfill_with_reader(ws, p, records[0])
        out["backfill"]["vs_reindex"] = out["backfill"]["rows_per_second"] / out["full"]["rows_per_second"]
        print(
            f"{n:,}: backfill {out['backfill']['rows_per_second']:.0f} rows/s, {out['backfill']['errors']} errors",
            flush=True,
        )
    return out


def backfill_with_reader(ws, params: Params, probe: ImageRecord) -> dict:
    """`mnemo backfill` (the flow) on the champion's table while a thread queries the live pair."""
    from components.data.transforms import open_rgb
    from components.serving.live import LiveIndex
    from flows.backfill import backfill

    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=0.25)
    image, errors, answers, stop = open_rgb(ws.classes_dir / probe.id), [], [0], threading.Event()

    def read() -> None:
        while not stop.wait(0.05):
            try:
                [hits] = live.current().query([image], 10)
                answers[0] += len(hits) == 10
            except Exception as exc:  # any failure is a broken promise
                errors.append(f"{type(exc).__name__}: {exc}")

    reader = threading.Thread(target=read, daemon=True)
    live.start()
    reader.start()
    try:
        done = backfill(params, str(ws.root))
    finally:
        stop.set()
        reader.join(timeout=30)
        live.stop()
    return {
        "rows": done.done,
        "seconds": done.seconds,
        "rows_per_second": done.done / done.seconds if done.seconds else 0.0,
        "answers": answers[0],
        "errors": len(errors),
        "first_errors": errors[:3],
    }


# --- report ----------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"# Compatibility benchmark {report['date']}", "", f"{report['machine']}; `{report['command']}`", ""]
    for stream, r in report["quality"].items():
        lines += [f"## {stream}: unseen R@1 / MAP@R at each promotion", ""]
        rows = []
        for mode, m in r["modes"].items():
            for s in m["steps"]:
                rows.append(
                    [
                        mode,
                        s["arrival"],
                        *(
                            f"{_f(s[k]['recall_at_1'])} / {_f(s[k]['map_at_r'])}"
                            for k in ("new/new", "old/old", "cross")
                        ),
                        " ".join(_f(v, 2) for v in s["backfill_recall_at_1"]),
                        f"{s['cpu_seconds']:.0f}",
                    ]
                )
        lines += [
            markdown_table(["mode", "arrival", "new/new", "old/old", "cross", "R@1 during backfill", "CPU s"], rows),
            "",
        ]
        targets = report.get("quality_targets", {}).get(stream, {})
        for mode, t in targets.items():
            lines.append(
                f"- {mode}: new/new cost against none {', '.join(_f(c) for c in t['new_new_cost'])} "
                f"(target <= 0.015: {'met' if t['cost_met'] else 'missed'}); cross - old/old R@1 "
                f"{', '.join(_f(g) for g in t['cross_gain'])}, MAP@R {', '.join(_f(g) for g in t['cross_gain_map'])} "
                f"(target > 0 at every promotion: {'met' if t['gain_met'] else 'missed'}); lowest R@1 during the "
                f"backfill minus old/old {', '.join(_f(d) for d in t['backfill_low_minus_old_old'])}"
            )
        lines.append("")
    if report["promotion"]:
        lines += ["## From a passed gate to the alias moving", ""]
        rows = []
        for n, r in report["promotion"].items():
            c, f = r["compatible"], r.get("full")
            rows.append(
                [
                    f"{int(n):,}",
                    f"{c['total_seconds']:.1f} ({c['table_seconds']:.1f} + {c['smoke_seconds']:.1f} + {c['promote_seconds']:.1f})",
                    "–"
                    if f is None
                    else f"{f['total_seconds']:.1f} ({f['table_seconds']:.1f} + {f['smoke_seconds']:.1f} + {f['promote_seconds']:.1f})",
                    "–"
                    if "backfill" not in r
                    else f"{r['backfill']['rows_per_second']:.0f} ({r['backfill']['vs_reindex']:.2f}x)",
                    "–" if "backfill" not in r else f"{r['backfill']['errors']} of {r['backfill']['answers']}",
                ]
            )
        lines += [
            markdown_table(
                [
                    "rows",
                    "compatible: total s (table + smoke + promote)",
                    "full re-index: total s",
                    "backfill rows/s (vs re-index)",
                    "query errors during backfill",
                ],
                rows,
            ),
            "",
        ]
        sizes = list(report["promotion"])
        first, last = report["promotion"][sizes[0]]["compatible"], report["promotion"][sizes[-1]]["compatible"]
        lines.append(
            f"Compatible path, largest over smallest: {last['total_seconds'] / first['total_seconds']:.2f}x "
            f"(target: flat within 1.5x; under 60 s at 1M)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="quality,promotion")
    ap.add_argument("--streams", default="demo,omniglot")
    ap.add_argument("--quick", action="store_true", help="bench.continual's quick settings (smaller, fewer epochs)")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--full-max", type=int, default=100_000, help="largest size whose full re-index is measured")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    # as `mnemo` runs its flows: time for Prefect's local server to start on a busy machine, no telemetry
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    params = load_params(args.params)
    if args.epochs is not None:
        params = with_overrides(params, {"train.epochs": args.epochs})
    report: dict = {
        "date": date.today().isoformat(),
        "command": command_line("compat"),
        "machine": machine(),
        "params": params.flat("model", "train", "replay", "distill", "compat"),
        "quality": {},
        "promotion": {},
    }
    stem = args.out / f"{report['date']}-compat{'-' + args.tag if args.tag else ''}"
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="mnemo-compat-") as tmp:
        if "quality" in parts:
            quality(params, args.streams.split(","), args.quick, Path(tmp), report, stem)
        if "promotion" in parts:
            promotion(params, [int(s) for s in args.sizes.split(",")], args.full_max, Path(tmp), report, stem)
    write_run(stem, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
