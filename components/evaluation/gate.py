"""The gate (TFX-style blessing): a pure decision with every reason, and its report.

Value thresholds (floors, sanity) apply to every candidate; change thresholds compare it
with the champion and are skipped when there is none. MLflow calls live in registry.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from components.config import GateParams
from components.evaluation import keys
from components.evaluation.compat import CompatMatrix, compatibility
from components.evaluation.forgetting import ForgettingMatrix
from components.evaluation.metrics import json_number


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)  # every check, passed or not, in order
    failed: list[str] = field(default_factory=list)  # the reasons that reject
    # Declared compatible with the champion (BCT's criterion, compat.py): it may go live on the
    # champion's vectors. Says how, not whether: a rejected candidate goes nowhere either way.
    compatible: bool = False

    @property
    def verdict(self) -> str:
        return "promote" if self.promote else "reject"

    def with_check(self, passed: bool, reason: str) -> GateDecision:
        """The decision with one more check (e.g. the index smoke test, run after registration)."""
        return replace(
            self,
            promote=self.promote and passed,
            reasons=[*self.reasons, reason],
            failed=self.failed if passed else [*self.failed, reason],
        )


def _number(metrics: Mapping[str, float], key: str) -> float:
    value = metrics.get(key, math.nan)
    return float(value) if value is not None else math.nan


def decide(candidate: dict[str, float], champion: dict[str, float] | None, gate: GateParams) -> GateDecision:
    """Promote or reject, with every reason (passed checks included).

    Value thresholds (floors and sanity) always apply; change thresholds against the
    champion (unseen Recall@1 drop, forgetting per slice) are skipped without one. A
    metric that is missing or not a number fails its check: a model is never promoted
    on something that was not measured.
    """
    reasons: list[str] = []
    failed: list[str] = []

    def check(passed: bool, yes: str, no: str) -> None:
        reasons.append(yes if passed else no)
        if not passed:
            failed.append(no)

    bad_rows = _number(candidate, "non_finite_embeddings")
    check(
        bad_rows == 0,
        "embeddings are finite",
        "embeddings were not checked for NaN/inf"
        if math.isnan(bad_rows)
        else f"{bad_rows:.0f} embeddings contain NaN or infinite values",
    )
    spread = _number(candidate, "embedding_spread")
    check(
        spread >= gate.min_embedding_spread,
        f"embedding spread {spread:.4f} meets the floor {gate.min_embedding_spread:.4f}",
        f"embeddings collapsed: spread {spread:.4f} is below the floor {gate.min_embedding_spread:.4f}",
    )
    for key, name, floor in (
        (keys.unseen("recall_at_1"), "unseen Recall@1", gate.min_unseen_recall_at_1),
        (keys.unseen("map_at_r"), "unseen MAP@R", gate.min_unseen_map_at_r),
    ):
        value = _number(candidate, key)
        check(
            value >= floor,
            f"{name} {value:.4f} meets the floor {floor:.4f}",
            f"{name} {value:.4f} is below the floor {floor:.4f}",
        )
        if gate.min_margin_over_pixels > -1:  # -1: off
            pixels, margin = _number(candidate, keys.baseline(key)), gate.min_margin_over_pixels
            check(
                value - pixels > margin,
                f"{name} {value:.4f} beats raw pixels ({pixels:.4f}) by more than {margin:.4f}",
                f"{name} {value:.4f} does not beat raw pixels ({pixels:.4f}) by more than {margin:.4f}",
            )
    for task, floor in sorted(gate.min_unseen_few_shot.items()):
        value = _number(candidate, keys.unseen(task))
        check(
            value >= floor,
            f"unseen {task} accuracy {value:.4f} meets the floor {floor:.4f}",
            f"unseen {task} accuracy {value:.4f} is below the floor {floor:.4f}"
            if not math.isnan(value)
            else f"unseen {task} accuracy was not measured (too few unseen classes with enough images)",
        )
    _forward_transfer(candidate, gate.min_forward_transfer_recall_at_1, check, reasons)
    if champion is None:
        reasons.append("no champion: change thresholds skipped")
        return GateDecision(promote=not failed, reasons=reasons, failed=failed)
    compat = compatibility(candidate, gate.min_compat_gain)
    if compat is not None:
        reasons.append(compat.reason)
    r1_key = keys.unseen("recall_at_1")
    r1, before = _number(candidate, r1_key), _number(champion, r1_key)
    if math.isnan(before):
        reasons.append("the champion's unseen Recall@1 is unknown: drop not checked")
    else:
        drop, allowed = before - r1, gate.max_unseen_recall_at_1_drop
        check(
            drop <= allowed,
            f"unseen Recall@1 changed {-drop:+.4f} against the champion (allowed drop {allowed:.4f})",
            f"unseen Recall@1 dropped {drop:.4f} against the champion, more than {allowed:.4f}"
            if not math.isnan(drop)
            else "unseen Recall@1 is not a number: drop against the champion unknown",
        )
    forgetting = {s: float(v) for s, v in sorted(keys.under(candidate, keys.FORGETTING).items())}
    allowed = gate.max_slice_forgetting
    over = {s: f for s, f in forgetting.items() if not f <= allowed}  # NaN counts as over: unknown is not fine
    for s, f in over.items():
        check(False, "", f"forgot {f:.4f} of seen Recall@1 on slice {s}, more than {allowed:.4f}")
    if not forgetting:
        reasons.append("no seen-class slice scored by an earlier champion: forgetting not checked")
    elif not over:
        s, f = max(forgetting.items(), key=lambda kv: kv[1])
        reasons.append(f"largest forgetting {f:+.4f} (slice {s}) is within {allowed:.4f}")
    return GateDecision(
        promote=not failed, reasons=reasons, failed=failed, compatible=compat is not None and compat.compatible
    )


def _forward_transfer(
    candidate: Mapping[str, float],
    floor: float | None,
    check: Callable[[bool, str, str], None],
    reasons: list[str],
) -> None:
    """The champion on each new arrival before training on it: said always, checked against `floor` when set."""
    for s, m in keys.transfer_values(candidate).items():
        shots = ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items()) if k.endswith("shot"))
        said = f"forward transfer to arrival {s} (the champion before training on it): R@1 {m['recall_at_1']:.4f}"
        said += f", MAP@R {m.get('map_at_r', math.nan):.4f}" + (f", {shots}" if shots else "")
        if floor is None:
            reasons.append(said)
        else:
            check(
                m["recall_at_1"] >= floor,
                f"{said}, meets the floor {floor:.4f}",
                f"{said}, below the floor {floor:.4f}",
            )


# --- the gate report ------------------------------------------------------------------------


def gate_report(
    candidate_version: str,
    champion_version: str | None,
    metrics: Mapping[str, float],
    decision: GateDecision,
    gate: GateParams,
    matrix: ForgettingMatrix,
    compat: CompatMatrix | None = None,
) -> dict:
    """The gate's verdict as plain JSON: metrics side by side, deltas, thresholds, forgetting, reasons,
    compatibility with the champion (and across the kept versions: `compat`)."""
    side_by_side = {}
    for key in sorted(k for k in metrics if keys.is_scored(k)):
        mine, theirs = metrics[key], metrics.get(keys.champion(key))
        side_by_side[key] = {
            "candidate": json_number(mine),
            "champion": json_number(theirs),
            "delta": json_number(mine - theirs) if theirs is not None else None,
        }
    for key in ("embedding_spread", "non_finite_embeddings", "average_forgetting"):
        if key in metrics:
            side_by_side[key] = {"candidate": json_number(metrics[key]), "champion": None, "delta": None}
    return {
        "candidate": str(candidate_version),
        "champion": champion_version,
        "verdict": decision.verdict,
        "reasons": list(decision.reasons),
        "thresholds": gate.model_dump(mode="json"),
        "metrics": side_by_side,
        "baseline": {keys.baseline(k): json_number(v) for k, v in sorted(keys.under(metrics, keys.BASELINE).items())},
        "forgetting": {s: json_number(v) for s, v in sorted(keys.under(metrics, keys.FORGETTING).items())},
        "forgetting_matrix": matrix.labelled(str(candidate_version)).as_dict(),
        # the champion on each new arrival before training on it: what the hot add gave users
        "forward_transfer": {
            s: {k: json_number(v) for k, v in sorted(m.items())} for s, m in keys.transfer_values(metrics).items()
        },
        "compatibility": _compatibility_section(metrics, decision, candidate_version, compat),
    }


def _compatibility_section(
    metrics: Mapping[str, float], decision: GateDecision, candidate: str, compat: CompatMatrix | None
) -> dict | None:
    """new/new, old/old and cross unseen scores, the verdict, the cross-version matrix; None without a champion."""
    cross = keys.under(metrics, keys.key(keys.COMPAT, keys.UNSEEN))
    if not cross:
        return None
    scored = {
        "new/new": keys.under(metrics, keys.UNSEEN),
        "old/old": keys.under(metrics, keys.key(keys.CHAMPION, keys.UNSEEN)),
        "cross": cross,
    }
    return {
        "compatible": decision.compatible,
        "unseen": {
            pair: {m: json_number(values.get(m)) for m in ("recall_at_1", "map_at_r")}
            for pair, values in scored.items()
        },
        "matrix": compat.labelled(candidate).as_dict() if compat is not None else None,
    }


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def gate_markdown(report: Mapping) -> str:
    """The report for people: verdict, reasons, the side-by-side table, forgetting per slice."""
    champion = f"v{report['champion']}" if report["champion"] else "none"
    lines = [
        f"# Gate: v{report['candidate']} — **{report['verdict'].upper()}**",
        "",
        f"Candidate v{report['candidate']} against champion {champion}.",
        "",
        "## Reasons",
        "",
    ]
    lines += [f"- {r}" for r in report["reasons"]]
    lines += ["", "## Metrics", "", "| metric | candidate | champion | delta |", "|---|---:|---:|---:|"]
    for key, row in report["metrics"].items():
        delta = "–" if row["delta"] is None else f"{row['delta']:+.4f}"
        lines.append(f"| {key} | {_cell(row['candidate'])} | {_cell(row['champion'])} | {delta} |")
    if report["baseline"]:
        lines += ["", "Pixel baseline: " + ", ".join(f"{k} {_cell(v)}" for k, v in report["baseline"].items())]
    if report["forgetting"]:
        lines += [
            "",
            "## Forgetting (best served seen Recall@1 minus the candidate's)",
            "",
            "| slice | forgetting |",
            "|---|---:|",
        ]
        lines += [f"| {s} | {_cell(v)} |" for s, v in report["forgetting"].items()]
    transfer = report.get("forward_transfer") or {}
    if transfer:
        tasks = sorted({k for m in transfer.values() for k in m})
        lines += ["", "## Forward transfer (the champion on each new arrival, before training on it)", ""]
        lines += ["| arrival | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += [f"| {s} | " + " | ".join(_cell(m.get(t)) for t in tasks) + " |" for s, m in transfer.items()]
    compat = report.get("compatibility")
    if compat:
        said = (
            "compatible: promoted on the champion's vectors, then backfilled"
            if compat["compatible"]
            else ("not compatible: its table is built whole before it goes live")
        )
        lines += ["", f"## Compatibility with the champion ({said})", "", "| queries / gallery | R@1 | MAP@R |"]
        lines += ["|---|---:|---:|"]
        names = {"new/new": "candidate / candidate", "old/old": "champion / champion", "cross": "candidate / champion"}
        lines += [
            f"| {names[pair]} | {_cell(v['recall_at_1'])} | {_cell(v['map_at_r'])} |"
            for pair, v in compat["unseen"].items()
        ]
    lines += ["", "## Thresholds", "", "```json", json.dumps(report["thresholds"], indent=1), "```", ""]
    return "\n".join(lines)
