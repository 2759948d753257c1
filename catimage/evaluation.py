"""Evaluate a router on held-out prompts: deferral curves, fixed points, oracle, hull, T trials.

Two layers:

* `evaluate_predictions` is pure numpy: given predicted and true quality of test prompts (metric
  units) and the candidates' costs, it computes the curves of catimage.routing and the summary
  figures of the paper (quality gain at each fixed candidate's cost, Table 2; cost ratio to match a
  candidate, Table 3; area over the prompt-agnostic hull; share of the oracle's gain).
* `evaluate_table` is the orchestration: re-draw the split, fit through the one fit pipeline
  (`catimage.router_model.fit_router`: scaler / embedder / estimator on the training prompts only,
  lambda calibration on held-out calibration prompts), predict the test prompts, evaluate; repeat
  for T trials (Table 1).

Confidence: every summary figure gets a bias-corrected (BC) bootstrap interval over test prompts
(trial 0: resample its test prompts; over trials: resample each trial's test prompts and average,
which gives an interval for the trial mean; the fixed candidates' means, hull and best candidate are
re-estimated on every resample, as they are estimated from the test prompts) beside the spread over trials, and `verdict` says in words whether the router
beats the hull and the best fixed candidate with confidence. A trial whose router never reaches the
best fixed candidate's quality is a miss: its cost ratio counts as the largest possible (the
dearest candidate's cost over the best fixed one's, 1.0 when the best is the dearest) instead of
dropping out of the mean. Where the table has several samples per cell, `label_noise` estimates how
much of the oracle's lead is label noise (split-half reliability).

Every figure that reads a curve at a cost uses linear interpolation between consecutive curve points
(randomising between two deterministic routers), as the paper does; see catimage.routing.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
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
    deferral_curve_arrays,
    interpolate_curve,
    mixture_hull,
    route,
)
from catimage.table import QualityMatrix, split_prompts

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
# Figures with a bootstrap interval; the cost ratio there counts a miss (never reached) as the worst.
BOOTSTRAP_FIGURES = (
    "quality_at_best_fixed_cost",
    "gain_at_best_fixed_cost",
    "area_over_hull",
    "cost_ratio_or_miss",
    "oracle_gain_fraction",
)
CONFIDENCE = 0.95


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
    ratio_best = ratio[candidates[best]]
    summary = {
        "best_fixed": candidates[best],
        "best_fixed_cost": c_best,
        "best_fixed_quality": q_best,
        "quality_at_best_fixed_cost": q_router,
        "gain_at_best_fixed_cost": _snap(q_router - q_best),
        "oracle_quality_at_best_fixed_cost": q_oracle,
        "gain_at_fixed_cost": gain,
        "cost_ratio_to_match_best_fixed": ratio_best,
        "missed_best_fixed": ratio_best is None,
        "cost_ratio_or_miss": ratio_best if ratio_best is not None else miss_ratio(costs, c_best),
        "cost_ratio_to_match": ratio,
        "area_over_hull": area_between(router, hull, lo, hi),
        "oracle_area_over_hull": area_between(oracle, hull, lo, hi),
        "oracle_gain_fraction": (q_router - q_best) / denom if denom > 1e-12 else None,
        "router_max_quality": max(p.quality for p in router),
        "oracle_max_quality": max(p.quality for p in oracle),
        "n_test": int(pred.shape[0]),
    }
    return EvalResult(candidates, costs, int(pred.shape[0]), fixed, router, oracle, hull, summary)


def miss_ratio(costs: np.ndarray, best_cost: float) -> float:
    """The cost ratio a miss counts as: the dearest candidate's cost over the best fixed one's (the
    largest ratio a router that reaches the quality at all could have; 1.0 when the best is the dearest)."""
    return float(costs.max() / best_cost) if best_cost > 0 else 1.0


def fast_figures(pred: np.ndarray, true: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """The `BOOTSTRAP_FIGURES` of `evaluate_predictions` (same definitions), without the bookkeeping:
    one router and one oracle sweep, for resampling test prompts many times."""
    _, rc, rq = deferral_curve_arrays(pred, costs, true)
    _, oc, oq = deferral_curve_arrays(true, costs, true)
    fixed_q = true.mean(axis=0)
    best = min(range(costs.size), key=lambda j: (-fixed_q[j], costs[j], j))
    c_best, q_best = float(costs[best]), float(fixed_q[best])
    order = np.argsort(rc, kind="stable")
    router = [CurvePoint(0.0, float(c), float(q)) for c, q in zip(rc[order], rq[order])]
    q_router = float(interpolate_curve(router, c_best))
    q_oracle = float(np.interp(c_best, *_sorted(oc, oq)))
    reach = cost_to_reach(router, q_best)
    ratio = _ratio(reach, c_best)
    hull = mixture_hull(costs, fixed_q)
    area = area_between(router, hull, float(costs.min()), float(costs.max()))
    denom = q_oracle - q_best
    return np.array([
        q_router,
        _snap(q_router - q_best),
        area,
        ratio if ratio is not None else miss_ratio(costs, c_best),
        (q_router - q_best) / denom if denom > 1e-12 else np.nan,
    ])


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def bootstrap_figures(pred: np.ndarray, true: np.ndarray, costs: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, len(BOOTSTRAP_FIGURES)): the figures on test prompts resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = pred.shape[0]
    out = np.empty((n_boot, len(BOOTSTRAP_FIGURES)))
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        out[b] = fast_figures(pred[idx], true[idx], costs)
    return out


def _interval(samples: np.ndarray, point: float) -> list[float | None]:
    """Bias-corrected percentile interval (Efron's BC) of a bootstrap distribution around `point`.

    Several figures are max-type statistics of the test sample (the hull and the best fixed
    candidate are chosen on it), so their bootstrap distribution sits off-centre from the estimate;
    plain percentiles would shift the interval. BC moves the percentiles by the share of resamples
    below the estimate.
    """
    from scipy.stats import norm

    finite = samples[np.isfinite(samples)]
    if finite.size < max(10, samples.size // 2) or point is None or not np.isfinite(point):
        return [None, None]
    below = (np.mean(finite < point) + 0.5 * np.mean(finite == point))
    below = float(np.clip(below, 0.5 / finite.size, 1 - 0.5 / finite.size))
    z0 = norm.ppf(below)
    tail = (1 - CONFIDENCE) / 2
    lo_q, hi_q = norm.cdf(2 * z0 + norm.ppf(tail)), norm.cdf(2 * z0 + norm.ppf(1 - tail))
    return [float(np.quantile(finite, lo_q)), float(np.quantile(finite, hi_q))]


def intervals(samples: np.ndarray, point: Sequence[float | None] | np.ndarray) -> dict[str, list[float | None]]:
    """BC intervals (CONFIDENCE) of each bootstrap figure; `point`: the estimates, in BOOTSTRAP_FIGURES order."""
    return {name: _interval(samples[:, j], point[j]) for j, name in enumerate(BOOTSTRAP_FIGURES)}


# --- trials -------------------------------------------------------------------------------------


def summarize_trials(per_trial: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Table 1: win rate and mean / std (sample std; None below two values) of each figure.

    A trial is won when the router's quality at the best fixed candidate's cost beats that
    candidate. The plain cost ratio is averaged over the trials that reach the best fixed quality
    (`n_<figure>` says how many); `mean_cost_ratio_or_miss` counts every trial, a miss as the worst
    possible ratio, and `misses` says how many trials missed.
    """
    out: dict[str, Any] = {"n": len(per_trial)}
    if not per_trial:
        return out
    wins = [t["gain_at_best_fixed_cost"] > 0 for t in per_trial]
    out["win_rate"] = float(np.mean(wins))
    for key in (*TRIAL_FIGURES, "cost_ratio_or_miss"):
        vals = np.array([t[key] for t in per_trial if t.get(key) is not None], dtype=np.float64)
        out[f"mean_{key}"] = float(vals.mean()) if vals.size else None
        out[f"std_{key}"] = float(vals.std(ddof=1)) if vals.size >= 2 else None
        if vals.size != len(per_trial):
            out[f"n_{key}"] = int(vals.size)
    out["misses"] = int(sum(t.get("cost_ratio_to_match_best_fixed") is None for t in per_trial))
    out["trial_intervals"] = {key: _t_interval(out, key) for key in BOOTSTRAP_FIGURES}
    return out


def _t_interval(trials: Mapping[str, Any], key: str) -> list[float | None]:
    """mean +- t * std / sqrt(T) over trials: the spread from re-drawing training AND test prompts
    (trials share prompts, so it is a rough guide, not an exact interval)."""
    from scipy.stats import t as student

    mean, std, n = trials.get(f"mean_{key}"), trials.get(f"std_{key}"), trials.get(f"n_{key}", trials.get("n", 0))
    if mean is None or std is None or n < 2:
        return [None, None]
    half = float(student.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / np.sqrt(n)
    return [mean - half, mean + half]


def combined_interval(trials: Mapping[str, Any], key: str) -> list[float | None]:
    """The wider of the bootstrap interval (test prompts) and the over-trials interval (training too)."""
    boot = (trials.get("intervals") or {}).get(key, [None, None])
    over = (trials.get("trial_intervals") or {}).get(key, [None, None])
    lows = [v for v in (boot[0], over[0]) if v is not None]
    highs = [v for v in (boot[1], over[1]) if v is not None]
    return [min(lows) if lows else None, max(highs) if highs else None]


def _trial_record(result: EvalResult, seed: int) -> dict[str, Any]:
    s = result.summary
    rec = {"seed": seed, "n_test": result.n_test, "best_fixed": s["best_fixed"]}
    rec.update({k: s[k] for k in (*TRIAL_FIGURES, "cost_ratio_or_miss")})
    return rec


def _word(interval: Sequence[float | None], higher_is_better: bool = True) -> str:
    lo, hi = interval
    if lo is None or hi is None:
        return "cannot tell (too few test prompts for an interval)"
    if (lo > 0) if higher_is_better else (hi < 0):
        return "yes, with confidence"
    if (hi < 0) if higher_is_better else (lo > 0):
        return "no: worse, with confidence"
    return "not distinguishable from zero"


def verdict(trials: Mapping[str, Any], best_fixed: str, unit: str) -> list[str]:
    """Plain sentences: does the router beat the hull / the best fixed candidate, how sure are we.

    "With confidence" needs the WIDER of two 95% intervals to exclude zero: the bootstrap over test
    prompts, and mean +- t * std / sqrt(T) over the trials (which also re-draw the training prompts).
    """
    n = trials.get("n", 0)
    area, gain = trials.get("mean_area_over_hull"), trials.get("mean_gain_at_best_fixed_cost")
    ratio, misses = trials.get("mean_cost_ratio_or_miss"), trials.get("misses", 0)
    pct = int(round(CONFIDENCE * 100))
    lines = []
    if area is not None:
        ci = combined_interval(trials, "area_over_hull")
        lines.append(
            f"Beats the prompt-agnostic mixture hull? {_word(ci)}: mean area over the hull {area:+.4g} {unit} over "
            f"{n} trial(s) ({pct}% interval {_fmt_ci(*ci)})."
        )
    if gain is not None:
        ci = combined_interval(trials, "gain_at_best_fixed_cost")
        lines.append(
            f"Beats the best fixed candidate ({best_fixed}) at its cost? {_word(ci)}: mean gain {gain:+.4g} {unit} "
            f"({pct}% interval {_fmt_ci(*ci)})."
        )
    if ratio is not None:
        lo, hi = combined_interval(trials, "cost_ratio_or_miss")
        cheaper = "yes, with confidence" if hi is not None and hi < 1 else "not with confidence"
        lines.append(
            f"Matches {best_fixed}'s quality for less? {cheaper}: mean cost ratio {ratio:.3g} ({pct}% interval "
            f"{_fmt_ci(lo, hi, signed=False)}); {misses} of {n} trial(s) never reached it and count as the worst ratio."
        )
    return lines


def _fmt_ci(lo: float | None, hi: float | None, signed: bool = True) -> str:
    if lo is None or hi is None:
        return "n/a"
    return f"{lo:+.4g} to {hi:+.4g}" if signed else f"{lo:.3g} to {hi:.3g}"


# --- label noise --------------------------------------------------------------------------------


def label_noise(matrix: QualityMatrix, costs: np.ndarray) -> dict[str, Any]:
    """How much of the oracle's lead over the hull is label noise (split-half reliability).

    Needs per-sample rows (`matrix.half`: each cell's samples split into two halves). The oracle
    that routes on a cell mean and is scored on the same mean profits from that mean's noise; one
    that routes on half A and is scored on the independent half B cannot. Reports, on prompts whose
    every cell has >= 2 samples: the oracle's area over the hull on the full means (optimistic), the
    split-half oracle's (routes on one half, scored on the other, both ways averaged: conservative,
    since it routes on noisier half-means), the share of the full oracle's lead that the split-half
    one loses, and the split-half correlation of the prompt x candidate interactions with its
    Spearman-Brown value for full means (how reliable the very signal a router learns is).
    """
    from catimage.estimators.selection import routing_score, two_way

    if matrix.half is None:
        return {"available": False, "reason": "one sample per cell: label noise cannot be separated from signal"}
    a, b = matrix.half
    rows = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if rows.sum() < 10:
        return {"available": False, "reason": f"only {int(rows.sum())} prompt(s) have >= 2 samples in every cell"}
    a, b, full = a[rows], b[rows], matrix.mean[rows]
    full_oracle = routing_score(full, full, costs)
    split = 0.5 * (routing_score(a, b, costs) + routing_score(b, a, costs))
    ones = np.ones_like(a)
    ra, rb = two_way(a, ones).resid.ravel(), two_way(b, ones).resid.ravel()
    r = float(np.corrcoef(ra, rb)[0, 1])
    return {
        "available": True,
        "n_prompts": int(rows.sum()),
        "oracle_area_full_means": full_oracle,
        "oracle_area_split_half": split,
        "noise_share_of_oracle_lead": (1 - split / full_oracle) if full_oracle > 1e-12 else None,
        "interaction_split_half_corr": r,
        "interaction_reliability_full_means": 2 * r / (1 + r) if r > -1 else None,
    }


# --- orchestration ------------------------------------------------------------------------------


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
    *,
    embedder_params: Mapping[str, Any] | None = None,
    bootstrap: int = 200,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit and evaluate a router on `trials` re-drawn splits; trial 0's curves are the report's.

    Trial t splits with seed + t into train / calibration (`val_frac`) / test (`test_frac`) and fits
    with `catimage.router_model.fit_router` (the same pipeline as `catimage fit` and `train`), the
    embeddings computed once and sliced per trial. Test prompts with any missing label are dropped.
    Each trial's test prompts are resampled `bootstrap` times for intervals (0 = none); each trial
    also checks the calibrated budget on its test prompts. `progress` gets one line per step.
    """
    from catimage.embed import make_embedder
    from catimage.features import FeatureCache
    from catimage.router_model import fit_router

    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (len(matrix.candidates),):
        raise CatimageError(
            f"{len(matrix.candidates)} candidates {matrix.candidates} but {costs.size} costs; give one per candidate"
        )
    if trials < 1:
        raise CatimageError(f"trials must be >= 1, got {trials}")
    if val_frac <= 0:
        raise CatimageError("val_frac must be > 0: the calibration prompts map budgets to lambda")
    if isinstance(embedder, str):
        embedder = make_embedder(embedder, **dict(embedder_params or {}))
    say = progress or (lambda _msg: None)
    params = dict(estimator_params or {})
    features = FeatureCache()
    first: EvalResult | None = None
    per_trial: list[dict[str, Any]] = []
    boots: list[np.ndarray] = []
    selections: list[str] = []
    budget_checks: list[dict[str, Any]] = []
    dropped0 = 0
    for t in range(trials):
        start = time.perf_counter()
        split = split_prompts(matrix.n_prompts, test_frac=test_frac, val_frac=val_frac, seed=seed + t)
        say(f"trial {t + 1}/{trials}: fitting {estimator_name} on {split.train.size} prompts")
        model = fit_router(
            matrix, costs, cost_unit, split.train, split.val, estimator=estimator_name, estimator_params=params,
            embedder=embedder, features=features, notes=notes,
        )
        if model.selection:
            selections.append(model.selection)
        X = features.get(model.embedder, matrix.prompts, model.estimator.input_kind)
        te = split.test
        pred = model.scaler.inverse_transform(model.estimator.predict(X[te]))
        true = matrix.mean[te]
        keep = np.isfinite(true).all(axis=1)
        if not keep.any():
            raise CatimageError(f"trial {t}: every test prompt lacks a label for some candidate; nothing to evaluate")
        result = evaluate_predictions(pred[keep], true[keep], costs, matrix.candidates)
        per_trial.append(_trial_record(result, seed + t))
        budget_checks.append(_budget_check(model, pred[keep], true[keep], costs))
        if bootstrap > 0:
            say(f"trial {t + 1}/{trials}: bootstrap intervals ({bootstrap} resamples of {result.n_test} test prompts)")
            boots.append(bootstrap_figures(pred[keep], true[keep], costs, bootstrap, seed + 1000 + t))
        say(
            f"trial {t + 1}/{trials} done in {time.perf_counter() - start:.0f} s: area over hull "
            f"{result.summary['area_over_hull']:+.4g}, gain at best fixed cost {result.summary['gain_at_best_fixed_cost']:+.4g}, "
            f"cost ratio {_fmt_ratio(result.summary['cost_ratio_to_match_best_fixed'])}"
        )
        log.info("trial %d/%d: %d test prompts, area over hull %+.4g", t + 1, trials, result.n_test,
                 result.summary["area_over_hull"])
        if t == 0:
            first, dropped0 = result, int((~keep).sum())
            first_test = {"prompt_ids": [matrix.prompt_ids[i] for i in te[keep]], "pred": pred[keep]}
    assert first is not None
    report = first.to_dict()
    summary = report["summary"]
    trials_summary = summarize_trials(per_trial)
    if boots:
        points = np.array([[np.nan if r.get(k) is None else r[k] for k in BOOTSTRAP_FIGURES] for r in per_trial])
        summary["intervals"] = intervals(boots[0], points[0])
        with warnings.catch_warnings():  # a figure undefined in every trial of a resample (no oracle gain) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            trials_summary["intervals"] = intervals(np.nanmean(np.stack(boots), axis=0), np.nanmean(points, axis=0))
    summary["trials"] = trials_summary
    summary["verdict"] = verdict(trials_summary, summary["best_fixed"], matrix.metric) if boots else []
    summary["budget_check"] = budget_checks[0]
    report["per_trial"] = to_jsonable(per_trial)
    # Trial 0's test predictions, so a report can show (report.html) what the router chose per prompt.
    report["test_predictions"] = to_jsonable(first_test)
    report["noise"] = label_noise(matrix, costs)
    all_notes = list(notes)
    if dropped0:
        all_notes.append(f"{dropped0} test prompt(s) with a missing label were dropped from trial 0.")
    all_notes += [
        "Quality at a given cost is read by linear interpolation between consecutive deferral-curve points "
        "(randomising between two routers).",
        "The oracle routes on the test labels themselves (means of few samples), so its curve includes label "
        "noise: an upper bound, not a reachable target.",
        f"Curves come from trial 0 (split seed {seed}); `trials` summarises {trials} re-drawn split(s); intervals "
        f"are {int(CONFIDENCE * 100)}% bias-corrected bootstrap intervals over test prompts ({bootstrap} resamples) and, "
        "over trials, mean +- t std / sqrt(T); the verdict uses the wider of the two.",
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
        "estimator_selection": selections[0] if selections else None,
        "estimator_selection_per_trial": selections,
        "embedder": to_jsonable(embedder.spec),
        "test_frac": test_frac,
        "val_frac": val_frac,
        "seed": seed,
        "interpolation": INTERPOLATION,
        "notes": all_notes,
    }
    return report


def _fmt_ratio(value: float | None) -> str:
    return "miss" if value is None else f"{value:.3g}"


def _budget_check(model: Any, pred: np.ndarray, true: np.ndarray, costs: np.ndarray) -> list[dict[str, Any]]:
    """Budgets = each fixed candidate's cost: lambda from the calibration prompts, then the mean cost
    and quality that lambda gives on the unseen test prompts (does the budget hold out of sample?)."""
    out = []
    for budget in sorted({float(c) for c in costs}):
        lam = model.lambda_for_budget(budget)
        chosen = route(pred, costs, lam)
        out.append({
            "budget": budget, "lambda": lam,
            "test_cost": float(costs[chosen].mean()),
            "test_quality": float(true[np.arange(true.shape[0]), chosen].mean()),
        })
    return out


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
