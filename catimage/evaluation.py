"""Evaluate a router on held-out prompts: deferral curves, fixed points, oracle, hull, T trials.

Two layers:

* `evaluate_predictions` is pure numpy: given predicted and true quality of test prompts (metric
  units) and the candidates' costs, it computes the curves of catimage.routing and the summary
  figures of the paper (quality gain at each fixed candidate's cost, Table 2; cost ratio to match a
  candidate, Table 3; area over the prompt-agnostic hull; share of the oracle's gain).
* `evaluate_table` is the orchestration: re-draw the split, fit the scaler / embedder / estimator on
  the training prompts only, predict the test prompts, evaluate; repeat for T trials (Table 1).

Every figure that reads a curve at a cost uses linear interpolation between consecutive curve points
(randomising between two deterministic routers), as the paper does; see catimage.routing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from catimage.errors import CatimageError
from catimage.routing import (
    CurvePoint,
    HullPoint,
    cost_to_reach,
    curve_arrays,
    deferral_curve,
    interpolate_curve,
    mixture_hull,
)
from catimage.table import MetricScaler, QualityMatrix, split_prompts

if TYPE_CHECKING:
    from catimage.embed import Embedder

log = logging.getLogger(__name__)

INTERPOLATION = "linear"

# Per-trial figures that the `trials` summary averages.
TRIAL_FIGURES = (
    "quality_at_best_fixed_cost",
    "gain_at_best_fixed_cost",
    "area_over_hull",
    "cost_ratio_to_match_best_fixed",
    "oracle_gain_fraction",
)


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


def area_between(upper: Sequence[Any], lower: Sequence[Any], lo: float, hi: float) -> float:
    """Mean of (upper(c) - lower(c)) over c in [lo, hi], both curves read by linear interpolation.

    Exact: both are piecewise linear, so the trapezoid rule on the union of their breakpoints is the
    integral. When lo == hi it is the difference at that cost.
    """
    if hi < lo:
        raise CatimageError(f"cost range [{lo}, {hi}] is empty")
    if hi == lo:
        return float(interpolate_curve(upper, lo) - interpolate_curve(lower, lo))
    xs = np.concatenate([curve_arrays(upper)[0], curve_arrays(lower)[0], [lo, hi]])
    xs = np.unique(xs[(xs >= lo) & (xs <= hi)])
    diff = np.asarray(interpolate_curve(upper, xs)) - np.asarray(interpolate_curve(lower, xs))
    if np.isnan(diff).any():
        raise CatimageError("a curve does not reach down to the cheapest candidate's cost; cannot integrate")
    return float(np.trapezoid(diff, xs) / (hi - lo))


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
    oracle = deferral_curve(true, costs, true)
    fixed_q = true.mean(axis=0)
    fixed = [FixedPoint(c, float(k), float(q)) for c, k, q in zip(candidates, costs, fixed_q)]
    hull = mixture_hull(costs, fixed_q)
    best = min(range(len(candidates)), key=lambda j: (-fixed_q[j], costs[j], j))
    c_best, q_best = float(costs[best]), float(fixed_q[best])

    q_router = float(interpolate_curve(router, c_best))
    q_oracle = float(interpolate_curve(oracle, c_best))
    gain = {c: _snap(float(interpolate_curve(router, float(k))) - float(q)) for c, k, q in zip(candidates, costs, fixed_q)}
    ratio = {c: _ratio(cost_to_reach(router, float(q)), float(k)) for c, k, q in zip(candidates, costs, fixed_q)}
    lo, hi = float(costs.min()), float(costs.max())
    denom = q_oracle - q_best
    summary = {
        "best_fixed": candidates[best],
        "best_fixed_cost": c_best,
        "best_fixed_quality": q_best,
        "quality_at_best_fixed_cost": q_router,
        "gain_at_best_fixed_cost": _snap(q_router - q_best),
        "oracle_quality_at_best_fixed_cost": q_oracle,
        "gain_at_fixed_cost": gain,
        "cost_ratio_to_match_best_fixed": ratio[candidates[best]],
        "cost_ratio_to_match": ratio,
        "area_over_hull": area_between(router, hull, lo, hi),
        "oracle_area_over_hull": area_between(oracle, hull, lo, hi),
        "oracle_gain_fraction": (q_router - q_best) / denom if denom > 1e-12 else None,
        "router_max_quality": max(p.quality for p in router),
        "oracle_max_quality": max(p.quality for p in oracle),
        "n_test": int(pred.shape[0]),
    }
    return EvalResult(candidates, costs, int(pred.shape[0]), fixed, router, oracle, hull, summary)


# --- trials -------------------------------------------------------------------------------------


def summarize_trials(per_trial: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Table 1: win rate and mean / std (sample std; None below two values) of each figure.

    A trial is won when the router's quality at the best fixed candidate's cost beats that
    candidate. Figures that are None in some trials (a cost ratio never reached) are averaged over
    the trials that have them; `n_<figure>` says how many.
    """
    out: dict[str, Any] = {"n": len(per_trial)}
    if not per_trial:
        return out
    wins = [t["gain_at_best_fixed_cost"] > 0 for t in per_trial]
    out["win_rate"] = float(np.mean(wins))
    for key in TRIAL_FIGURES:
        vals = np.array([t[key] for t in per_trial if t.get(key) is not None], dtype=np.float64)
        out[f"mean_{key}"] = float(vals.mean()) if vals.size else None
        out[f"std_{key}"] = float(vals.std(ddof=1)) if vals.size >= 2 else None
        if vals.size != len(per_trial):
            out[f"n_{key}"] = int(vals.size)
    return out


def _trial_record(result: EvalResult, seed: int) -> dict[str, Any]:
    s = result.summary
    rec = {"seed": seed, "n_test": result.n_test, "best_fixed": s["best_fixed"]}
    rec.update({k: s[k] for k in TRIAL_FIGURES})
    return rec


def evaluate_table(
    matrix: QualityMatrix,
    costs: Any,
    estimator_name: str,
    estimator_params: Mapping[str, Any] | None = None,
    embedder: Embedder | str = "tfidf",
    test_frac: float = 0.1,
    val_frac: float = 0.1,
    seed: int = 0,
    trials: int = 1,
    cost_unit: str = "cost",
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Fit and evaluate a router on `trials` re-drawn splits; trial 0's curves are the report's.

    Trial t splits with seed + t, fits the metric scaler on its training labels only, fits the
    embedder on its training prompts (only tfidf learns; the passed embedder is left fitted to the
    last trial), embeds every prompt once (reused across trials while the embedder's identity is
    unchanged), fits the estimator with the validation split for early stopping, predicts the test
    prompts, maps them back to metric units and drops test prompts with any missing label.
    """
    from catimage.embed import make_embedder
    from catimage.estimators import make_estimator
    from catimage.router_model import embed_for

    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (len(matrix.candidates),):
        raise CatimageError(
            f"{len(matrix.candidates)} candidates {matrix.candidates} but {costs.size} costs; give one per candidate"
        )
    if trials < 1:
        raise CatimageError(f"trials must be >= 1, got {trials}")
    if isinstance(embedder, str):
        embedder = make_embedder(embedder)
    params = dict(estimator_params or {})
    cache: dict[tuple[str, str], np.ndarray] = {}
    first: EvalResult | None = None
    per_trial: list[dict[str, Any]] = []
    dropped0 = 0
    for t in range(trials):
        split = split_prompts(matrix.n_prompts, test_frac=test_frac, val_frac=val_frac, seed=seed + t)
        scaler = MetricScaler.fit(matrix.mean[split.train])
        embedder.fit([matrix.prompts[i] for i in split.train])
        estimator = make_estimator(estimator_name, **params)
        key = (embedder.cache_key(), estimator.input_kind)
        if key not in cache:
            cache.clear()  # a refitted tfidf makes old embeddings useless
            cache[key] = embed_for(embedder, matrix.prompts, estimator.input_kind)
        X = cache[key]
        Y = scaler.transform(matrix.mean)  # NaN (missing) stays NaN
        counts = matrix.count.astype(np.float64)
        tr, va, te = split.train, split.val, split.test
        has_val = va.size > 0
        estimator.fit(
            X[tr], Y[tr], counts=counts[tr],
            X_val=X[va] if has_val else None, Y_val=Y[va] if has_val else None,
            counts_val=counts[va] if has_val else None,
        )
        pred = scaler.inverse_transform(estimator.predict(X[te]))
        true = matrix.mean[te]
        keep = np.isfinite(true).all(axis=1)
        if not keep.any():
            raise CatimageError(f"trial {t}: every test prompt lacks a label for some candidate; nothing to evaluate")
        result = evaluate_predictions(pred[keep], true[keep], costs, matrix.candidates)
        per_trial.append(_trial_record(result, seed + t))
        log.info(
            "trial %d/%d: %d test prompts, gain at best fixed cost %+.4g, area over hull %+.4g",
            t + 1, trials, result.n_test, result.summary["gain_at_best_fixed_cost"], result.summary["area_over_hull"],
        )
        if t == 0:
            first, dropped0 = result, int((~keep).sum())
    assert first is not None
    report = first.to_dict()
    report["summary"]["trials"] = summarize_trials(per_trial)
    report["per_trial"] = to_jsonable(per_trial)
    all_notes = list(notes)
    if dropped0:
        all_notes.append(f"{dropped0} test prompt(s) with a missing label were dropped from trial 0.")
    all_notes += [
        "Quality at a given cost is read by linear interpolation between consecutive deferral-curve points "
        "(randomising between two routers).",
        "The oracle routes on the test labels themselves (means of few samples), so its curve includes label "
        "noise: an upper bound, not a reachable target.",
        f"Curves come from trial 0 (split seed {seed}); `trials` summarises {trials} re-drawn split(s).",
    ]
    report["meta"] = {
        "metric": matrix.metric,
        "cost_unit": cost_unit,
        "candidates": list(matrix.candidates),
        "costs": costs.tolist(),
        "n_prompts": matrix.n_prompts,
        "n_test": first.n_test,
        "n_test_dropped": dropped0,
        "estimator": estimator_name,
        "estimator_params": to_jsonable(params),
        "embedder": to_jsonable(embedder.spec),
        "test_frac": test_frac,
        "val_frac": val_frac,
        "seed": seed,
        "interpolation": INTERPOLATION,
        "notes": all_notes,
    }
    return report


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; NaN / inf become None so that report.json stays valid JSON."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
