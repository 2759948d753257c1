"""`evaluate_table`: fit and evaluate the route and/or cascade policy on T re-drawn splits (Table 1).

Trial t splits with seed + t into train / calibration / test, fits through the one fit pipeline
(`catimage.model.router_model.fit_router`; the cascade's `fit_cascade` reuses that very router and
its features), predicts the test prompts, evaluates (catimage.evaluation.figures; the cascade by
simulation on the test prompts' own seed rows, catimage.evaluation.cascade) and resamples them for
intervals (catimage.evaluation.confidence). Every option lives in one `EvaluateOptions`, which the
CLI's `evaluate` command fills from its flags.

The report keeps today's top level for the route policy (fixed, router, oracle, hull, summary,
per_trial, test_predictions, noise, meta) and adds ``policies``: {"route": {...}, "cascade": {...}}
(shape: catimage.evaluation.cascade's docstring), each naming its decision metric and judge.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from catimage.errors import CatimageError
from catimage.evaluation.cascade import CascadeTrial, evaluate_cascade_trial, usable_prompts
from catimage.evaluation.confidence import CONFIDENCE, bootstrap_figures, intervals, summarize_trials, verdict
from catimage.evaluation.figures import (
    BOOTSTRAP_FIGURES,
    INTERPOLATION,
    TRIAL_RECORD_KEYS,
    EvalResult,
    evaluate_predictions,
)
from catimage.evaluation.jsonable import to_jsonable
from catimage.evaluation.noise import label_noise
from catimage.evaluation.routellm import ROUTELLM_FIGURES, routellm_figures
from catimage.features.base import Embedder
from catimage.features.registry import make_embedder
from catimage.features.stage import FeatureCache
from catimage.model.cascade_model import CascadeOptions, fit_cascade
from catimage.model.router_model import RouterModel, fit_router
from catimage.policy.routing import route
from catimage.tables.draws import Draws
from catimage.tables.table import QualityMatrix, split_prompts

log = logging.getLogger(__name__)

Policy = Literal["route", "cascade", "both"]


@dataclass
class EvaluateOptions:
    """Everything `evaluate_table` (and `catimage evaluate`) needs besides the table and the costs.

    `policy`: route, cascade or both (the cascade needs per-draw `draws`). `score_cost`: the decision
    scorer's cost per image, in the pool's cost unit, counted in every scored plan's cost.
    """

    estimator: str = "auto"
    estimator_params: Mapping[str, Any] = field(default_factory=dict)
    embedder: Embedder | str = "tfidf"
    embedder_params: Mapping[str, Any] = field(default_factory=dict)
    test_frac: float = 0.1
    calibration_frac: float = 0.1
    seed: int = 0
    trials: int = 1
    bootstrap: int = 200
    cost_unit: str = "cost"
    notes: tuple[str, ...] = ()
    policy: Policy = "route"
    score_cost: float = 0.0
    cascade: CascadeOptions = field(default_factory=CascadeOptions)

    def check(self) -> None:
        if self.trials < 1:
            raise CatimageError(f"trials must be >= 1, got {self.trials}")
        if self.calibration_frac <= 0:
            raise CatimageError("calibration_frac must be > 0: the calibration prompts map budgets to lambda")
        if self.policy not in ("route", "cascade", "both"):
            raise CatimageError(f"policy must be route, cascade or both, got {self.policy!r}")
        if not np.isfinite(self.score_cost) or self.score_cost < 0:
            raise CatimageError(f"the decision scorer's cost must be a number >= 0, got {self.score_cost}")

    @property
    def wants_route(self) -> bool:
        return self.policy in ("route", "both")

    @property
    def wants_cascade(self) -> bool:
        return self.policy in ("cascade", "both")


@dataclass
class _PolicyTrials:
    """One policy's results over the trials: trial 0's full result, per-trial records, bootstraps."""

    first: EvalResult | None = None
    per_trial: list[dict[str, Any]] = field(default_factory=list)
    boots: list[np.ndarray] = field(default_factory=list)
    budget_check: list[dict[str, Any]] | None = None
    traces: list[dict[str, Any]] = field(default_factory=list)
    routellm: dict[str, Any] = field(default_factory=dict)

    def add(self, result: EvalResult, seed: int, boot: np.ndarray | None, extra: dict[str, Any]) -> None:
        self.per_trial.append(_trial_record(result, seed, extra))
        if boot is not None:
            self.boots.append(boot)
        if self.first is None:
            self.first, self.routellm = result, extra


def evaluate_table(
    matrix: QualityMatrix, costs: Any, options: EvaluateOptions | None = None, *, draws: Draws | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit and evaluate the chosen policies on `options.trials` re-drawn splits; trial 0's curves are
    the report's. Test prompts with any missing label (or, for the cascade, a missing draw) are dropped."""
    options = options or EvaluateOptions()
    costs = _check(matrix, costs, options, draws)
    embedder = options.embedder
    if isinstance(embedder, str):
        embedder = make_embedder(embedder, **dict(options.embedder_params))
    run = _Evaluation(matrix, costs, options, draws, embedder, progress or (lambda _msg: None))
    for t in range(options.trials):
        run.trial(t)
    return run.report()


@dataclass
class _Evaluation:
    """The trial loop's state: inputs, the shared feature cache, and each policy's results so far."""

    matrix: QualityMatrix
    costs: np.ndarray
    options: EvaluateOptions
    draws: Draws | None
    embedder: Embedder
    say: Callable[[str], None]
    features: FeatureCache = field(default_factory=FeatureCache)
    route: _PolicyTrials = field(default_factory=_PolicyTrials)
    cascade: _PolicyTrials = field(default_factory=_PolicyTrials)
    selections: list[str] = field(default_factory=list)
    first_test: dict[str, Any] = field(default_factory=dict)
    dropped0: int = 0
    cascade_meta: dict[str, Any] = field(default_factory=dict)

    def trial(self, t: int) -> None:
        """Split with seed + t, fit the router (the one fit pipeline), evaluate each policy on the test prompts."""
        opt, matrix, start = self.options, self.matrix, time.perf_counter()
        split = split_prompts(matrix.n_prompts, test_frac=opt.test_frac, calibration_frac=opt.calibration_frac,
                              seed=opt.seed + t)
        self.say(f"trial {t + 1}/{opt.trials}: fitting {opt.estimator} on {split.train.size} prompts")
        model = fit_router(matrix, self.costs, opt.cost_unit, split.train, split.calibration, estimator=opt.estimator,
                           estimator_params=dict(opt.estimator_params), embedder=self.embedder, features=self.features,
                           notes=opt.notes)
        if model.selection:
            self.selections.append(model.selection)
        test = _test_prompts(matrix, split.test, self.draws, opt, t)
        X = self.features.get(model.embedder, matrix.prompts, model.estimator.input_kind)
        pred = model.scaler.inverse_transform(model.estimator.predict(X[test]))
        if opt.wants_route or t == 0:  # trial 0's route figures are the report's top level
            _route_trial(self.route, model, pred, matrix.mean[test], self.costs, matrix.candidates, opt, opt.seed + t,
                         self.say, t)
        if opt.wants_cascade:
            self._cascade_trial(t, split, model, test, pred)
        self.say(f"trial {t + 1}/{opt.trials} done in {time.perf_counter() - start:.0f} s: "
                 + _trial_line(self.route, self.cascade, opt))
        if t == 0:
            self.dropped0 = int(split.test.size - test.size)
            self.first_test = {"prompt_ids": [matrix.prompt_ids[i] for i in test], "pred": pred,
                               "calibration_pred": model.calibration_pred}

    def _cascade_trial(self, t: int, split: Any, model: RouterModel, test: np.ndarray, pred: np.ndarray) -> None:
        """fit_cascade around this trial's router (same features), then simulate its plans on the test rows."""
        opt, draws = self.options, self.draws
        assert draws is not None
        self.say(f"trial {t + 1}/{opt.trials}: cascade plans")
        cascade = fit_cascade(self.matrix, draws, self.costs, opt.cost_unit, split.train, split.calibration,
                              score_cost=opt.score_cost, options=opt.cascade, router=model, features=self.features)
        X = self.features.get(model.embedder, self.matrix.prompts, "pooled")[test]
        trial = evaluate_cascade_trial(cascade, draws.subset(test), X, self.costs, bootstrap=opt.bootstrap,
                                       seed=opt.seed + t + 2000, means=pred)
        _add_cascade(self.cascade, trial, opt.seed + t, n_plans=len(cascade.plans))
        if t == 0:
            self.cascade.budget_check, self.cascade.traces = trial.budget_check, trial.traces
            self.cascade_meta = {"n_plans": len(cascade.plans), "max_attempts": opt.cascade.max_attempts,
                                 "thresholds": cascade.plan_thresholds.tolist(), "score_cost": opt.score_cost,
                                 "distinct": cascade.options.distinct, "router_means": opt.cascade.router_means,
                                 "draw_estimator": cascade.estimator.selection_}

    def report(self) -> dict[str, Any]:
        """Today's route top level plus `policies` (route and/or cascade blocks)."""
        metric = self.matrix.metric
        report = _route_report(self.route, self.matrix, self.costs, self.options, self.embedder, self.selections,
                               self.first_test, self.dropped0)
        report["policies"] = {}
        if self.options.wants_route:
            report["policies"]["route"] = _policy_block(self.route, metric, None, False, metric)
        if self.options.wants_cascade:
            assert self.draws is not None
            block = _policy_block(self.cascade, metric, self.draws.decision_metric, self.draws.upper_bound, metric)
            block["traces"], block["plans"] = to_jsonable(self.cascade.traces), to_jsonable(self.cascade_meta)
            report["policies"]["cascade"] = block
        return report


def _check(matrix: QualityMatrix, costs: Any, options: EvaluateOptions, draws: Draws | None) -> np.ndarray:
    options.check()
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (len(matrix.candidates),):
        raise CatimageError(
            f"{len(matrix.candidates)} candidates {matrix.candidates} but {costs.size} costs; give one per candidate"
        )
    if options.wants_cascade:
        if draws is None:
            raise CatimageError("the cascade policy needs the table's per-draw scores (draws); pass --decision-metric")
        if list(draws.prompt_ids) != list(matrix.prompt_ids) or list(draws.candidates) != list(matrix.candidates):
            raise CatimageError("the draws and the quality matrix must come from one table (same prompts and candidates)")
    return costs


def _test_prompts(matrix: QualityMatrix, test: np.ndarray, draws: Draws | None, options: EvaluateOptions, t: int) -> np.ndarray:
    keep = np.isfinite(matrix.mean[test]).all(axis=1)
    if options.wants_cascade and draws is not None:
        keep &= usable_prompts(draws, options.cascade.max_attempts)[test]
    if not keep.any():
        raise CatimageError(f"trial {t}: every test prompt lacks a label (or a draw) for some candidate; nothing to evaluate")
    return test[keep]


def _route_trial(runs: _PolicyTrials, model: RouterModel, pred: np.ndarray, true: np.ndarray, costs: np.ndarray,
                 candidates: list[str], options: EvaluateOptions, seed: int, say: Callable[[str], None], t: int) -> None:
    result = evaluate_predictions(pred, true, costs, candidates)
    boot = None
    if options.bootstrap > 0:
        say(f"trial {t + 1}/{options.trials}: bootstrap intervals ({options.bootstrap} resamples of {result.n_test} test prompts)")
        boot = bootstrap_figures(pred, true, costs, options.bootstrap, seed + 1000)
    runs.add(result, seed, boot, routellm_figures(result.router, true.mean(axis=0), costs))
    if runs.budget_check is None:
        runs.budget_check = _budget_check(model, pred, true, costs)
    log.info("trial %d: %d test prompts, route area over hull %+.4g", t + 1, result.n_test, result.summary["area_over_hull"])


def _add_cascade(runs: _PolicyTrials, trial: CascadeTrial, seed: int, n_plans: int) -> None:
    runs.add(trial.result, seed, trial.boot, trial.routellm)
    log.info("cascade (%d plans): area over hull %+.4g", n_plans, trial.result.summary["area_over_hull"])


def _trial_line(route_runs: _PolicyTrials, cascade_runs: _PolicyTrials, options: EvaluateOptions) -> str:
    parts = []
    for name, runs, wanted in (("route", route_runs, options.wants_route), ("cascade", cascade_runs, options.wants_cascade)):
        if wanted and runs.per_trial:
            r = runs.per_trial[-1]
            parts.append(f"{name}: area over hull {r['area_over_hull']:+.4g}, gain at best fixed cost "
                         f"{r['gain_at_best_fixed_cost']:+.4g}, cost ratio {_fmt_ratio(r)}")
    return "; ".join(parts)


def _fmt_ratio(record: Mapping[str, Any]) -> str:
    value = record.get("cost_ratio_or_miss")
    return "n/a" if value is None else f"{value:.3g}" + (" (miss)" if record.get("missed_best_fixed") else "")


def _summary(runs: _PolicyTrials, metric: str) -> dict[str, Any]:
    """Trial 0's summary + RouteLLM figures + the trials' Table 1, intervals and verdict."""
    assert runs.first is not None
    summary = dict(runs.first.summary)
    summary.update({k: runs.routellm.get(k) for k in ROUTELLM_FIGURES})
    trials_summary = summarize_trials(runs.per_trial)
    for key in ROUTELLM_FIGURES:
        vals = [r[key] for r in runs.per_trial if r.get(key) is not None]
        trials_summary[f"mean_{key}"] = float(np.mean(vals)) if vals else None
    if runs.boots:
        points = np.array([[np.nan if r.get(k) is None else r[k] for k in BOOTSTRAP_FIGURES] for r in runs.per_trial])
        summary["intervals"] = intervals(runs.boots[0], points[0])
        with warnings.catch_warnings():  # a figure undefined in every trial of a resample (no oracle gain) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            trials_summary["intervals"] = intervals(np.nanmean(np.stack(runs.boots), axis=0), np.nanmean(points, axis=0))
    summary["trials"] = trials_summary
    summary["verdict"] = verdict(trials_summary, summary["best_fixed"], metric) if runs.boots else []
    summary["budget_check"] = runs.budget_check
    return summary


def _policy_block(runs: _PolicyTrials, metric: str, decision: str | None, upper: bool, judge: str) -> dict[str, Any]:
    assert runs.first is not None
    first = runs.first.to_dict()
    return {
        "summary": to_jsonable(_summary(runs, metric)),
        "per_trial": to_jsonable(runs.per_trial),
        "curve": first["router"],
        "fixed": first["fixed"],
        "hull": first["hull"],
        "oracle": first["oracle"],
        "decision_metric": decision,
        "judge_metric": judge,
        "upper_bound": bool(upper),
    }


def _route_report(runs: _PolicyTrials, matrix: QualityMatrix, costs: np.ndarray, options: EvaluateOptions,
                  embedder: Embedder, selections: list[str], first_test: dict[str, Any], dropped0: int) -> dict[str, Any]:
    """Today's top level: the route policy's curves and figures (trial 0), Table 1, noise, meta."""
    assert runs.first is not None
    report = runs.first.to_dict()
    report["summary"] = to_jsonable(_summary(runs, matrix.metric))
    report["per_trial"] = to_jsonable(runs.per_trial)
    report["test_predictions"] = to_jsonable(first_test)
    report["noise"] = label_noise(matrix, costs)
    report["meta"] = _meta(matrix, costs, options, embedder, selections, runs.first.n_test, dropped0)
    return report


def _meta(matrix: QualityMatrix, costs: np.ndarray, options: EvaluateOptions, embedder: Embedder,
          selections: list[str], n_test: int, dropped0: int) -> dict[str, Any]:
    notes = list(options.notes)
    if dropped0:
        notes.append(f"{dropped0} test prompt(s) with a missing label were dropped from trial 0.")
    notes += [
        ("Quality at a given cost is read by linear interpolation between consecutive deferral-curve points "
        "(randomising between two routers)."),
        ("The oracle routes on the test labels themselves (means of few samples), so its curve includes label "
        "noise: an upper bound, not a reachable target."),
        (f"Curves come from trial 0 (split seed {options.seed}); `trials` summarises {options.trials} re-drawn split(s); "
        f"intervals are {int(CONFIDENCE * 100)}% bias-corrected bootstrap intervals over test prompts ({options.bootstrap} "
        "resamples) and, over trials, mean +- t std / sqrt(T); the verdict uses the wider of the two."),
    ]
    if options.wants_cascade:
        notes.append("Cascade figures simulate each plan on the test prompts' own seed rows (attempt j draws seed slot j), "
                     "deciding on predicted plan values and reporting realised judge quality and realised cost, the "
                     "decision scorer's cost included.")
    return {
        "metric": matrix.metric,
        "cost_unit": options.cost_unit,
        "candidates": list(matrix.candidates),
        "costs": costs.tolist(),
        "n_prompts": matrix.n_prompts,
        "n_test": n_test,
        "n_test_dropped": dropped0,
        "estimator": options.estimator,
        "estimator_params": to_jsonable(dict(options.estimator_params)),
        "estimator_selection": selections[0] if selections else None,
        "estimator_selection_per_trial": selections,
        "embedder": to_jsonable(embedder.spec),
        "test_frac": options.test_frac,
        "calibration_frac": options.calibration_frac,
        "seed": options.seed,
        "policy": options.policy,
        "interpolation": INTERPOLATION,
        "notes": notes,
    }


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


def _trial_record(result: EvalResult, seed: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    s = result.summary
    rec = {"seed": seed, "n_test": result.n_test, "best_fixed": s["best_fixed"]}
    rec.update({k: s[k] for k in TRIAL_RECORD_KEYS})
    rec.update({k: extra.get(k) for k in ROUTELLM_FIGURES})
    return rec
