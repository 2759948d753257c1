"""The fitted cascade: per prompt, which PLAN to follow (catimage.policy.plans) under one budget.

`fit_cascade` goes through THE fit pipeline: `catimage.model.router_model.fit_router` fits the router
(scaler -> embedder fit on the training prompts -> features through the shared `FeatureCache` ->
quality estimator -> calibration predictions); the cascade then reads the SAME fitted embedder's
pooled features of the same prompts from the same cache (nothing is embedded or fitted twice) and
fits the per-draw estimator (catimage.estimators.draws) on the training prompts' seed rows. The
calibration prompts only map a budget to lambda, by EXPECTED plan cost.

The bundle (`CascadeModel`): the router bundle (routing is unchanged: `.decide`), the draw estimator,
the decision metric (what serving scores each image with), the judge (what the estimator predicts
and the figures report), the decision scorer's cost per image, the plan set, the threshold grid of
the draw statistics, and the calibration prompts' predicted draw statistics. Serving calls
``.plan(prompts, budget=None, lam=None) -> list[Plan]`` and executes each plan exactly as
catimage.policy.plans documents.

A directory holds::

    cascade.json                format, metrics, scorer cost, plan set spec, threshold grid, notes
    router/                     the router bundle (catimage.model.router_model format)
    draws/                      draw_estimator.json + draw_estimator.safetensors
    calibration.safetensors     predicted draw statistics of the calibration prompts
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from catimage.errors import BudgetError, CatimageError
from catimage.estimators.draws import DrawEstimator, default_thresholds, load_draw_estimator
from catimage.features.stage import FeatureCache, embed_features
from catimage.model.router_model import RouterModel, fit_router
from catimage.policy.cascade import DrawStats, choose_plans, enumerate_plans, plan_values
from catimage.policy.plans import Plan
from catimage.policy.routing import calibrate_lambda, pareto_options
from catimage.tables.draws import CascadeInputs, Draws
from catimage.tables.table import QualityMatrix, split_prompts

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

__all__ = ["CascadeModel", "CascadeOptions", "fit_cascade"]


@dataclass(frozen=True)
class CascadeOptions:
    """The plan set and the draw estimator's settings (chosen before seeing any test prompt).

    `plan_thresholds`: acceptance thresholds in the decision metric's units; None: the quantiles
    `threshold_levels` of the training prompts' decision scores (every draw of every candidate).
    `distinct`: each candidate at most once per plan; None: when the table has one sample per cell.
    `best_of`: also the plans without early acceptance (draw all, keep the best-scoring).
    `router_means`: True puts the ROUTER's mean predictions under the draw estimator's pass laws
    (`DrawStats.with_means`), so the route plans are valued exactly as routing values them. Default
    False: the draw estimator's own k-NN means, which keep each prompt's pass law and its judge
    means consistent; on the world table (noisy decider, 5 splits) they gave the better cascade
    (cost ratio 0.343 vs 0.368, area over hull +0.029 vs +0.025; docs/policies.md).
    """

    max_attempts: int = 4
    plan_thresholds: tuple[float, ...] | None = None
    threshold_levels: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)
    distinct: bool | None = None
    best_of: bool = False
    router_means: bool = False
    draw_estimator: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CascadeOptions:
        data = dict(data)
        for key in ("plan_thresholds", "threshold_levels"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


def _thresholds(options: CascadeOptions, decision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(plan thresholds, statistics grid ⊇ plan thresholds), from the training draws' decision scores."""
    if options.plan_thresholds is not None:
        plan_t = np.unique(np.asarray(options.plan_thresholds, dtype=np.float64))
    else:
        plan_t = default_thresholds(decision, options.threshold_levels)
    grid = np.unique(np.concatenate([plan_t, default_thresholds(decision)]))
    return plan_t, grid


class CascadeModel:
    """Router bundle + draw estimator + metrics + scorer cost + plan set + calibration statistics."""

    def __init__(
        self, router: RouterModel, estimator: DrawEstimator, decision_metric: str, judge_metric: str,
        score_cost: float, options: CascadeOptions, plan_thresholds: np.ndarray, grid: np.ndarray,
        calibration_stats: DrawStats, notes: Sequence[str] = (),
    ) -> None:
        self.router = router
        self.estimator = estimator
        self.decision_metric = decision_metric
        self.judge_metric = judge_metric
        self.score_cost = float(score_cost)
        self.options = options
        self.plan_thresholds = np.asarray(plan_thresholds, dtype=np.float64)
        self.grid = np.asarray(grid, dtype=np.float64)
        self.calibration_stats = calibration_stats
        self.notes = list(notes)
        distinct = bool(options.distinct)
        extra: list[float | None] = [None] if options.best_of else []
        self._calibration_values: tuple[np.ndarray, np.ndarray] | None = None
        self.plans = enumerate_plans(self.candidates, options.max_attempts, [*self.plan_thresholds.tolist(), *extra],
                                     distinct=distinct)

    @property
    def candidates(self) -> list[str]:
        return list(self.router.base_candidates)

    @property
    def costs(self) -> np.ndarray:
        return self.router.costs[: len(self.router.base_candidates)]

    @property
    def cost_unit(self) -> str:
        return self.router.cost_unit

    @property
    def upper_bound(self) -> bool:
        """The decision metric is the judge: this cascade's figures are upper bounds."""
        return self.decision_metric == self.judge_metric

    @classmethod
    def fit(cls, matrix: QualityMatrix, draws: Draws, costs: np.ndarray, cost_unit: str, *, score_cost: float,
            options: CascadeOptions | None = None, calibration_frac: float = 0.1, seed: int = 0,
            **router_args: Any) -> CascadeModel:
        """Fit on every prompt but a calibration split (`fit_cascade` with a train / calibration split),
        as `RouterModel.fit` does for routing; `router_args` go to `fit_router`."""
        split = split_prompts(matrix.n_prompts, test_frac=0.0, calibration_frac=calibration_frac, seed=seed)
        return fit_cascade(matrix, draws, costs, cost_unit, split.train, split.calibration, score_cost=score_cost,
                           options=options, **router_args)

    # --- prediction ----------------------------------------------------------------------------
    def predict_stats(self, prompts: Sequence[str], X: np.ndarray | None = None,
                      means: np.ndarray | None = None) -> DrawStats:
        """Predicted per-draw statistics of `prompts` (or of their pooled features `X`, when given);
        `means`: the router's predictions for them when already computed (with `router_means`)."""
        if X is None:
            X = embed_features(self.router.embedder, list(prompts), "pooled")
        stats = self.estimator.predict(X, self.grid, self.candidates)
        if not self.options.router_means:
            return stats
        if means is None:
            means = self._router_means(list(prompts), X)
        return stats.with_means(means)

    def _router_means(self, prompts: list[str], X: np.ndarray) -> np.ndarray:
        """The router's predictions, from the pooled features already computed when its estimator reads
        pooled features (one embedding per request in serving), else through `RouterModel.predict`."""
        router = self.router
        if router.estimator.input_kind == "pooled" and not router.added:
            return router.scaler.inverse_transform(router.estimator.predict(X))
        return router.predict(prompts)[:, : len(self.candidates)]

    def plan_values(self, stats: DrawStats) -> tuple[np.ndarray, np.ndarray]:
        """(expected judge value, expected cost), each (n, P) over `self.plans`."""
        return plan_values(stats, self.plans, self.costs, self.score_cost)

    def lambda_for_budget(self, budget: float, stats: DrawStats | None = None) -> float:
        """The smallest lambda whose EXPECTED average plan cost on the calibration prompts meets `budget`;
        with `stats` (`predict_stats` of other prompts, e.g. the most recently served), on those."""
        try:
            budget = float(budget)
        except (TypeError, ValueError):
            raise BudgetError(f"budget must be a number, got {budget!r}") from None
        if not np.isfinite(budget) or budget < 0:
            raise BudgetError(f"budget must be a non-negative number of {self.cost_unit}, got {budget}")
        if stats is not None:
            return calibrate_lambda(*pareto_options(*self.plan_values(stats))[:2], budget)
        if self._calibration_values is None:  # the calibration prompts' non-dominated plans, computed once
            self._calibration_values = pareto_options(*self.plan_values(self.calibration_stats))[:2]
        return calibrate_lambda(*self._calibration_values, budget)

    def plan(self, prompts: Sequence[str], budget: float | None = None, lam: float | None = None,
             X: np.ndarray | None = None) -> list[Plan]:
        """The plan each prompt should follow: argmax expected value - lam * expected cost (ties to the
        cheaper). lambda from `lam`, else from `budget`, else 0 (best expected quality)."""
        if budget is not None and lam is not None:
            raise BudgetError("give a budget or a lambda, not both")
        if lam is None:
            lam = self.lambda_for_budget(budget) if budget is not None else 0.0
        elif np.isnan(lam) or lam < 0:
            raise BudgetError(f"lambda must be a non-negative number, got {lam}")
        prompts = list(prompts)
        if not prompts:
            return []
        value, cost = self.plan_values(self.predict_stats(prompts, X))
        return [self.plans[int(p)] for p in choose_plans(value, cost, float(lam))]

    def decide(self, prompts: Sequence[str], budget: float | None = None, lam: float | None = None) -> list[Any]:
        """Routing, unchanged: the router bundle's decisions."""
        return self.router.decide(prompts, budget=budget, lam=lam)

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.router.save(path / "router")
        self.estimator.save(path / "draws")
        st = self.calibration_stats
        save_file({"p_pass": st.p_pass, "q_pass": st.q_pass, "q_fail": st.q_fail, "q_mean": st.q_mean},
                  str(path / "calibration.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "decision_metric": self.decision_metric,
            "judge_metric": self.judge_metric,
            "score_cost": self.score_cost,
            "cost_unit": self.cost_unit,
            "options": self.options.to_dict(),
            "plan_thresholds": self.plan_thresholds.tolist(),
            "grid": self.grid.tolist(),
            "n_plans": len(self.plans),
            "notes": self.notes,
        }
        (path / "cascade.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CascadeModel:
        path = Path(path)
        meta_path = path / "cascade.json"
        if not meta_path.is_file():
            raise CatimageError(f"{path} is not a catimage cascade directory (no cascade.json); fit one with "
                                "catimage.model.cascade_model.fit_cascade and save it")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CatimageError(f"{path}: cascade format {meta.get('format_version')} is not {FORMAT_VERSION}; refit it")
        router = RouterModel.load(path / "router")
        calib = load_file(str(path / "calibration.safetensors"))
        grid = np.asarray(meta["grid"], dtype=np.float64)
        stats = DrawStats(tuple(router.base_candidates), grid, calib["p_pass"], calib["q_pass"], calib["q_fail"],
                          calib["q_mean"])
        return cls(router, load_draw_estimator(path / "draws"), meta["decision_metric"], meta["judge_metric"],
                   meta["score_cost"], CascadeOptions.from_dict(meta["options"]), np.asarray(meta["plan_thresholds"]),
                   grid, stats, meta.get("notes", []))


def fit_cascade(
    matrix: QualityMatrix,
    draws: Draws,
    costs: np.ndarray,
    cost_unit: str,
    train: np.ndarray,
    calibration: np.ndarray,
    *,
    score_cost: float,
    options: CascadeOptions | None = None,
    router: RouterModel | None = None,
    features: FeatureCache | None = None,
    **router_args: Any,
) -> CascadeModel:
    """Fit the cascade on `train` prompts; `calibration` prompts map budgets to lambda.

    `matrix` is the judge's quality matrix (what the router learns), `draws` the same prompts'
    per-draw decision and judge scores (rows aligned). `router`: an already fitted router bundle
    of the same split (evaluate fits one per trial for the route policy and shares it); else
    `fit_router(matrix, costs, cost_unit, train, calibration, features=features, **router_args)`.
    """
    options = options or CascadeOptions()
    _check_aligned(matrix, draws)
    if not np.isfinite(score_cost) or score_cost < 0:
        raise CatimageError(f"the decision scorer's cost must be a number >= 0 (in {cost_unit}), got {score_cost}")
    features = features if features is not None else FeatureCache()
    if router is None:
        router = fit_router(matrix, costs, cost_unit, train, calibration, features=features, **router_args)
    X = features.get(router.embedder, matrix.prompts, "pooled")
    train, calibration = np.asarray(train, dtype=np.int64), np.asarray(calibration, dtype=np.int64)
    estimator = DrawEstimator(**options.draw_estimator).fit(X[train], draws.decision[train], draws.judge[train])
    plan_t, grid = _thresholds(options, draws.decision[train])
    if options.distinct is None:
        options = CascadeOptions(**{**options.to_dict(), "distinct": draws.n_seeds == 1,
                                    "plan_thresholds": options.plan_thresholds})
    calibration_stats = estimator.predict(X[calibration], grid, matrix.candidates)
    if options.router_means:
        calibration_stats = calibration_stats.with_means(router.base_calibration_pred)
    notes = list(router.notes)
    if draws.upper_bound:
        notes.append(f"The decision metric is the judge ({draws.judge_metric}): every cascade figure is an upper bound.")
    return CascadeModel(router, estimator, draws.decision_metric, draws.judge_metric, score_cost, options, plan_t, grid,
                        calibration_stats, notes)


def fit_cascade_around(
    router_dir: str | Path, matrix: QualityMatrix, costs: np.ndarray, inputs: CascadeInputs, *,
    options: CascadeOptions | None = None, calibration_frac: float = 0.1, seed: int = 0,
) -> CascadeModel:
    """A cascade around a router already fitted (its embedder and predictions unchanged): the per-draw
    model learns from every prompt of `matrix` but a calibration split, deciding on `inputs` (from
    `catimage.tables.draws.cascade_inputs`). What the demo serves and the shipped world bundle is."""
    split = split_prompts(matrix.n_prompts, test_frac=0.0, calibration_frac=calibration_frac, seed=seed)
    router = RouterModel.load(router_dir)
    return fit_cascade(matrix, inputs.draws, costs, router.cost_unit, split.train, split.calibration,
                       score_cost=inputs.score_cost, options=options, router=router)


def _check_aligned(matrix: QualityMatrix, draws: Draws) -> None:
    if list(draws.candidates) != list(matrix.candidates):
        raise CatimageError(f"draws have candidates {draws.candidates}, the matrix {matrix.candidates}; use one order")
    if list(draws.prompt_ids) != list(matrix.prompt_ids):
        raise CatimageError("draws and the quality matrix hold different prompts (or another order); build both from "
                            "one table")
    if draws.judge_metric != matrix.metric:
        raise CatimageError(f"the matrix is read on {matrix.metric!r} but the draws' judge is {draws.judge_metric!r}; "
                            "the router and the cascade must learn the same judge")
