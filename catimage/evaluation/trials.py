"""`evaluate_table`: fit and evaluate a router on T re-drawn splits of one table (Table 1).

Trial t splits with seed + t into train / calibration / test, fits through the one fit pipeline
(`catimage.model.router_model.fit_router`: scaler / embedder / estimator on the training prompts
only, lambda calibration on held-out calibration prompts), predicts the test prompts, evaluates
(catimage.evaluation.figures) and resamples them for intervals (catimage.evaluation.confidence).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.evaluation.confidence import (
    CONFIDENCE,
    bootstrap_figures,
    intervals,
    summarize_trials,
    verdict,
)
from catimage.evaluation.figures import (
    BOOTSTRAP_FIGURES,
    INTERPOLATION,
    TRIAL_RECORD_KEYS,
    EvalResult,
    evaluate_predictions,
)
from catimage.evaluation.jsonable import to_jsonable
from catimage.evaluation.noise import label_noise
from catimage.features.base import Embedder
from catimage.features.registry import make_embedder
from catimage.features.stage import FeatureCache
from catimage.model.router_model import fit_router
from catimage.policy.routing import route
from catimage.tables.table import QualityMatrix, split_prompts

log = logging.getLogger(__name__)


def evaluate_table(
    matrix: QualityMatrix,
    costs: Any,
    estimator_name: str,
    estimator_params: Mapping[str, Any] | None = None,
    embedder: Embedder | str = "tfidf",
    test_frac: float = 0.1,
    calibration_frac: float = 0.1,
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

    Trial t splits with seed + t into train / calibration (`calibration_frac`) / test (`test_frac`) and fits
    with `catimage.router_model.fit_router` (the same pipeline as `catimage fit` and `train`), the
    embeddings computed once and sliced per trial. Test prompts with any missing label are dropped.
    Each trial's test prompts are resampled `bootstrap` times for intervals (0 = none); each trial
    also checks the calibrated budget on its test prompts. `progress` gets one line per step.
    """
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (len(matrix.candidates),):
        raise CatimageError(
            f"{len(matrix.candidates)} candidates {matrix.candidates} but {costs.size} costs; give one per candidate"
        )
    if trials < 1:
        raise CatimageError(f"trials must be >= 1, got {trials}")
    if calibration_frac <= 0:
        raise CatimageError("calibration_frac must be > 0: the calibration prompts map budgets to lambda")
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
        split = split_prompts(matrix.n_prompts, test_frac=test_frac, calibration_frac=calibration_frac, seed=seed + t)
        say(f"trial {t + 1}/{trials}: fitting {estimator_name} on {split.train.size} prompts")
        model = fit_router(
            matrix, costs, cost_unit, split.train, split.calibration, estimator=estimator_name, estimator_params=params,
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
            f"cost ratio {_fmt_ratio(result.summary)}"
        )
        log.info("trial %d/%d: %d test prompts, area over hull %+.4g", t + 1, trials, result.n_test,
                 result.summary["area_over_hull"])
        if t == 0:
            first, dropped0 = result, int((~keep).sum())
            first_test = {"prompt_ids": [matrix.prompt_ids[i] for i in te[keep]], "pred": pred[keep],
                          "calibration_pred": model.calibration_pred}
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
        "calibration_frac": calibration_frac,
        "seed": seed,
        "interpolation": INTERPOLATION,
        "notes": all_notes,
    }
    return report


def _fmt_ratio(summary: Mapping[str, Any]) -> str:
    text = f"{summary['cost_ratio_or_miss']:.3g}"
    return f"{text} (a miss)" if summary["missed_best_fixed"] else text


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



def _trial_record(result: EvalResult, seed: int) -> dict[str, Any]:
    s = result.summary
    rec = {"seed": seed, "n_test": result.n_test, "best_fixed": s["best_fixed"]}
    rec.update({k: s[k] for k in TRIAL_RECORD_KEYS})
    return rec
