"""The figures of one evaluation: deferral curves of a router, the fixed candidates, the oracle
and the prompt-agnostic mixture hull, and the summary figures of the paper (quality gain at each
fixed candidate's cost, Table 2; cost ratio to match a candidate, Table 3; area over the hull;
share of the oracle's gain). Pure numpy on predicted and true quality of test prompts (metric
units) and the candidates' costs; catimage.policy.routing draws the curves.

A router that never reaches a candidate's quality MISSES it. There is one cost-ratio figure,
`cost_ratio_or_miss` (one function computes it for every caller): the average cost at which the
router first reaches the candidate's mean quality, over that candidate's cost; a miss counts as the
largest ratio a router can have, the dearest candidate's cost over the matched one's (`miss_ratio`;
1.0 when the matched candidate is the dearest, as the best fixed one is in the scene world). The
summary says separately whether the best fixed candidate was missed (`missed_best_fixed`), so no
reader needs a second, miss-dropping ratio.

Every figure that reads a curve at a cost uses linear interpolation between consecutive curve points
(randomising between two deterministic routers), as the paper does; see catimage.policy.routing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.evaluation.jsonable import to_jsonable
from catimage.policy.routing import (
    CurvePoint,
    HullPoint,
    area_between,
    cost_to_reach,
    deferral_curve,
    deferral_curve_arrays,
    interpolate_curve,
    mixture_hull,
)

INTERPOLATION = "linear"

# The summary figures of one trial: each gets a bootstrap interval over test prompts, and the
# `trials` summary averages them over re-drawn splits (the same five, under both names).
BOOTSTRAP_FIGURES = (
    "quality_at_best_fixed_cost",
    "gain_at_best_fixed_cost",
    "area_over_hull",
    "cost_ratio_or_miss",
    "oracle_gain_fraction",
)
TRIAL_FIGURES = BOOTSTRAP_FIGURES
# What a per-trial record keeps beside the figures: whether the trial missed, and what a miss counts as.
TRIAL_RECORD_KEYS = (*TRIAL_FIGURES, "missed_best_fixed", "miss_ratio")


@dataclass(frozen=True)
class FixedPoint:
    """Always sending every prompt to one candidate."""

    candidate: str
    cost: float
    quality: float

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "cost": self.cost, "quality": self.quality}


@dataclass
class EvalResult:
    """Curves and summary figures of one evaluation, all in the metric's units and the cost unit."""

    candidates: list[str]
    costs: np.ndarray
    n_test: int
    fixed: list[FixedPoint]
    router: list[CurvePoint]
    oracle: list[CurvePoint]
    hull: list[HullPoint]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report layout: `fixed`, `router`, `oracle`, `hull`, `summary` (JSON-able)."""
        return {
            "fixed": [p.to_dict() for p in self.fixed],
            "router": [p.to_dict() for p in self.router],
            "oracle": [p.to_dict() for p in self.oracle],
            "hull": [
                {"cost": p.cost, "quality": p.quality, "candidate": self.candidates[p.index]} for p in self.hull
            ],
            "summary": to_jsonable(self.summary),
        }


# --- pure evaluation ----------------------------------------------------------------------------


def _snap(diff: float, tol: float = 1e-12) -> float:
    """A quality difference of pure summation-order noise (the same prompts averaged in another
    order) is reported as 0, so that a tie does not read as a loss or a win."""
    return 0.0 if abs(diff) < tol else diff


def _ratio(cost: float | None, reference: float) -> float | None:
    if cost is None:
        return None
    if reference <= 0:
        return 1.0 if cost <= 0 else None
    return cost / reference


def miss_ratio(costs: np.ndarray, matched_cost: float) -> float:
    """The cost ratio a miss counts as: the dearest candidate's cost over the matched candidate's (the
    largest ratio a router that reaches the quality at all could have; 1.0 when the matched candidate
    is the dearest)."""
    return float(np.max(costs) / matched_cost) if matched_cost > 0 else 1.0


def cost_ratio_or_miss(reach_cost: float | None, matched_cost: float, costs: np.ndarray) -> tuple[float, bool]:
    """THE cost-ratio figure and whether it is a miss: `reach_cost` (the router's cheapest average cost
    reaching the candidate's quality, None when it never does) over `matched_cost`, or `miss_ratio`."""
    ratio = _ratio(reach_cost, matched_cost)
    if ratio is None:
        return miss_ratio(costs, matched_cost), True
    return ratio, False


def describe_miss_rule(miss_value: float | None = None) -> str:
    """The words every printed cost ratio carries, so that a reader knows what a miss counts as."""
    rule = "a miss (the quality never reached) counts as the dearest candidate's cost over the matched one's"
    if miss_value is None or not np.isfinite(miss_value):
        return f"{rule}, which is 1 when the matched candidate is the dearest"
    if miss_value == 1.0:
        return f"{rule} (1 here: the matched candidate is the dearest)"
    return f"{rule} ({miss_value:.3g} here)"


def evaluate_predictions(
    pred_test: Any, true_test: Any, costs: Any, candidates: Sequence[str]
) -> EvalResult:
    """Curves and summary figures of routing on `pred_test`, scored with the labels `true_test`.

    Inputs are in the metric's own units; prompts with a missing label must already be dropped.
    `best_fixed` is the candidate with the highest mean true quality on these prompts (ties: cheaper).
    """
    pred = np.asarray(pred_test, dtype=np.float64)
    true = np.asarray(true_test, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    candidates = list(candidates)
    if pred.shape != true.shape:
        raise CatimageError(f"predictions {pred.shape} and labels {true.shape} differ in shape")
    if pred.ndim != 2 or pred.shape[1] != len(candidates):
        raise CatimageError(f"predictions must be (n, {len(candidates)}) for candidates {candidates}, got {pred.shape}")
    if pred.shape[0] == 0:
        raise CatimageError("no test prompts to evaluate (all dropped for missing labels?)")
    router = deferral_curve(pred, costs, true)  # validates shapes, finiteness, costs
    return evaluate_curve(router, true, costs, candidates)


def evaluate_curve(router: Sequence[CurvePoint], true_test: Any, costs: Any, candidates: Sequence[str]) -> EvalResult:
    """The summary figures of ANY policy's deferral curve `router` (routing's, or a cascade's from
    catimage.evaluation.cascade) against the fixed candidates, mixture hull and routing oracle of the
    labels `true_test` (n, M). Hook used by the cascade evaluation so both policies share every figure."""
    true = np.asarray(true_test, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    candidates = list(candidates)
    router = list(router)
    oracle = deferral_curve(true, costs, true)
    fixed_q = true.mean(axis=0)
    fixed = [FixedPoint(c, float(k), float(q)) for c, k, q in zip(candidates, costs, fixed_q)]
    hull = mixture_hull(costs, fixed_q)
    best = min(range(len(candidates)), key=lambda j: (-fixed_q[j], costs[j], j))
    c_best, q_best = float(costs[best]), float(fixed_q[best])

    q_router = float(interpolate_curve(router, c_best))
    q_oracle = float(interpolate_curve(oracle, c_best))
    gain = {c: _snap(float(interpolate_curve(router, float(k))) - float(q)) for c, k, q in zip(candidates, costs, fixed_q)}
    ratio = {c: cost_ratio_or_miss(cost_to_reach(router, float(q)), float(k), costs)
             for c, k, q in zip(candidates, costs, fixed_q)}
    lo, hi = float(costs.min()), float(costs.max())
    denom = q_oracle - q_best
    ratio_best, missed_best = ratio[candidates[best]]
    summary = {
        "best_fixed": candidates[best],
        "best_fixed_cost": c_best,
        "best_fixed_quality": q_best,
        "quality_at_best_fixed_cost": q_router,
        "gain_at_best_fixed_cost": _snap(q_router - q_best),
        "oracle_quality_at_best_fixed_cost": q_oracle,
        "gain_at_fixed_cost": gain,
        "cost_ratio_or_miss": ratio_best,
        "missed_best_fixed": missed_best,
        "miss_ratio": miss_ratio(costs, c_best),
        "cost_ratio_or_miss_by_candidate": {c: r for c, (r, _) in ratio.items()},
        "missed_candidates": [c for c, (_, missed) in ratio.items() if missed],
        "area_over_hull": area_between(router, hull, lo, hi),
        "oracle_area_over_hull": area_between(oracle, hull, lo, hi),
        "oracle_gain_fraction": (q_router - q_best) / denom if denom > 1e-12 else None,
        "router_max_quality": max(p.quality for p in router),
        "oracle_max_quality": max(p.quality for p in oracle),
        "n_test": int(true.shape[0]),
    }
    return EvalResult(candidates, costs, int(true.shape[0]), fixed, router, oracle, hull, summary)


def fast_figures(pred: np.ndarray, true: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """The `BOOTSTRAP_FIGURES` of `evaluate_predictions` (same definitions), without the bookkeeping:
    one router and one oracle sweep, for resampling test prompts many times."""
    _, rc, rq = deferral_curve_arrays(pred, costs, true)
    return fast_curve_figures(rc, rq, true, costs)


def fast_curve_figures(rc: np.ndarray, rq: np.ndarray, true: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """`fast_figures` of ANY policy's curve given as arrays (average costs `rc`, qualities `rq`);
    hook used by the cascade evaluation's bootstrap."""
    _, oc, oq = deferral_curve_arrays(true, costs, true)
    fixed_q = true.mean(axis=0)
    best = min(range(costs.size), key=lambda j: (-fixed_q[j], costs[j], j))
    c_best, q_best = float(costs[best]), float(fixed_q[best])
    order = np.argsort(rc, kind="stable")
    router = [CurvePoint(0.0, float(c), float(q)) for c, q in zip(rc[order], rq[order])]
    q_router = float(interpolate_curve(router, c_best))
    q_oracle = float(np.interp(c_best, *_sorted(oc, oq)))
    ratio, _ = cost_ratio_or_miss(cost_to_reach(router, q_best), c_best, costs)
    hull = mixture_hull(costs, fixed_q)
    area = area_between(router, hull, float(costs.min()), float(costs.max()))
    denom = q_oracle - q_best
    return np.array([
        q_router,
        _snap(q_router - q_best),
        area,
        ratio,
        (q_router - q_best) / denom if denom > 1e-12 else np.nan,
    ])


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


# --- a report's policies, as every report file reads them --------------------------------------


@dataclass(frozen=True)
class PolicyView:
    """One policy's figures as the report files show them (report.md, report.html, deferral.png).

    `curve` is the policy's deferral curve (quality vs average cost), `summary` its summary figures
    (the keys of `evaluate_curve`, plus APGR / CPT and `trials` when evaluated over splits);
    `fixed`, `hull` and `oracle` the fixed candidates, mixture hull and routing oracle on the same
    test prompts; `decision_metric` what the policy reads online and `judge_metric` what the figures
    report; `upper_bound` when they are the same metric, so the figures select images by the very
    score they report. `traces` (cascade): a few prompts' attempts, each with both scores.
    """

    name: str
    curve: list[Mapping[str, Any]]
    summary: Mapping[str, Any]
    per_trial: list[Mapping[str, Any]]
    decision_metric: str
    judge_metric: str
    upper_bound: bool = False
    traces: list[Mapping[str, Any]] = field(default_factory=list)
    fixed: list[Mapping[str, Any]] = field(default_factory=list)
    hull: list[Mapping[str, Any]] = field(default_factory=list)
    oracle: list[Mapping[str, Any]] = field(default_factory=list)
    plans: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How a figure names the policy: its name, what decides and what judges."""
        bound = "; UPPER BOUND: the judge decides" if self.upper_bound else ""
        return f"{self.name}: decides on {self.decision_metric}, judged by {self.judge_metric}{bound}"


def _route_decision(judge: str) -> str:
    return f"the router's predicted {judge}"


def policy_views(report: Mapping[str, Any]) -> list[PolicyView]:
    """The policies a report holds: each of `report["policies"]` when present, else the router of
    the report's top level. Routing decides on the router's predicted quality, read from the prompt
    text alone (`decision_metric` null in report.json), so it is never an upper bound."""
    meta = report.get("meta") or {}
    judge = str(meta.get("metric", "quality"))
    shared = {k: list(report.get(k) or []) for k in ("fixed", "hull", "oracle")}
    policies = report.get("policies") or {}
    if not policies:
        return [PolicyView("route", list(report.get("router") or []), report.get("summary") or {},
                           list(report.get("per_trial") or []), _route_decision(judge), judge, **shared)]
    views = []
    for name, p in policies.items():
        decision = p.get("decision_metric")
        views.append(PolicyView(
            name=str(name),
            curve=list(p.get("curve") or p.get("router") or []),
            summary=p.get("summary") or {},
            per_trial=list(p.get("per_trial") or []),
            decision_metric=str(decision) if decision else _route_decision(judge),
            judge_metric=str(p.get("judge_metric") or judge),
            upper_bound=bool(p.get("upper_bound", decision is not None and decision == p.get("judge_metric"))),
            traces=list(p.get("traces") or []),
            plans=p.get("plans") or {},
            **{k: list(p.get(k) or shared[k]) for k in shared},
        ))
    return views
