"""The router bundle, and the ONE fit pipeline every caller uses.

`fit_router` is the whole fit sequence: scaler on the training prompts' labels -> embedder fit on
the training prompts -> embed (through a `FeatureCache`, so `evaluate`'s trials embed once) ->
estimator fit (hyper-parameters chosen inside the training prompts, by the routing objective when
the estimator supports it) -> predictions on held-out calibration prompts. `RouterModel.fit`
(`catimage fit`), `catimage.evaluation.trials.evaluate_table` (`catimage evaluate`, the demo) and
`jobs/train_estimator.py` (`catimage train`, which hands the estimator fit to Ray Train through
the `fit_estimator` hook) all call it.

A model directory holds::

    router.json              format version, candidates, costs, cost unit, metric, scaler, embedder
                             spec, estimator kind and what its selection chose, added candidates
    estimator/               estimator.json + estimator.safetensors (catimage.estimators format)
    embedder/                the embedder's spec (and a fitted vocabulary / statistics, when it learned)
    calibration.safetensors  predicted quality of held-out prompts (sets lambda from a budget) and
                             their pooled embeddings (to extend it when a candidate is added)
    profile.safetensors      prompt-cluster centroids of the training prompts, and the added
                             candidates' coefficients (catimage.model.add_candidate)

The calibration prompts are held out of everything else: they choose no hyper-parameter, stop no
training, and only map a budget to lambda, so the lambda chosen for a budget is not fitted to
prompts whose predictions are over-confident. Format 1 bundles (before candidates could be added)
still load and route.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from catimage.errors import BudgetError, CatimageError
from catimage.estimators import QualityEstimator, load_estimator, make_estimator
from catimage.features.base import Embedder
from catimage.features.registry import load_embedder, make_embedder
from catimage.features.stage import FeatureCache, embed_features
from catimage.features.tokens import TokenBatch
from catimage.model.add_candidate import AddedCandidate, memberships, profile_clusters
from catimage.policy.routing import calibrate_lambda, route, utility_ranking
from catimage.tables.table import MetricScaler, QualityMatrix, split_prompts

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class Decision:
    """One routed prompt: the choice, why (predicted quality of every candidate), and the fallbacks."""

    prompt: str
    candidate: str
    index: int
    lam: float
    cost: float
    predicted: dict[str, float]
    ranking: list[str] = field(default_factory=list)  # by utility, best first: the fallback order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitData:
    """What an estimator fit consumes: training prompts' features and [0, 1]-scaled labels."""

    X: np.ndarray | TokenBatch
    Y: np.ndarray  # NaN = missing
    counts: np.ndarray
    var: np.ndarray  # per-cell sample variance in scaled units, NaN below two samples
    costs: np.ndarray


# fit_estimator(estimator, data) -> fitted estimator: how `catimage train` puts the fit on Ray Train.
EstimatorFit = Callable[[QualityEstimator, FitData], QualityEstimator]


def embed_for(embedder: Embedder, prompts: Sequence[str], input_kind: str) -> np.ndarray | TokenBatch:
    """The embedding an estimator of `input_kind` consumes: pooled (n, d) or a ragged TokenBatch."""
    return embed_features(embedder, prompts, input_kind)


def fit_router(
    matrix: QualityMatrix,
    costs: np.ndarray,
    cost_unit: str,
    train: np.ndarray,
    calibration: np.ndarray,
    *,
    estimator: str = "auto",
    estimator_params: dict[str, Any] | None = None,
    embedder: Embedder | str = "minilm",
    embedder_params: dict[str, Any] | None = None,
    features: FeatureCache | None = None,
    fit_estimator: EstimatorFit | None = None,
    notes: Sequence[str] = (),
) -> RouterModel:
    """The fit pipeline: split given -> scaler -> embedder fit -> embed -> estimator fit -> calibration.

    `train` / `calibration`: prompt indices of `matrix` (disjoint; test prompts are in neither).
    `features` caches embeddings across calls (pass one per table when fitting many splits).
    """
    costs = np.asarray(costs, dtype=np.float64)
    train, calibration = np.asarray(train, dtype=np.int64), np.asarray(calibration, dtype=np.int64)
    if costs.shape != (len(matrix.candidates),):
        raise CatimageError(
            f"{len(matrix.candidates)} candidates {matrix.candidates} but {costs.size} costs; give one per candidate"
        )
    if calibration.size == 0:
        raise CatimageError("the fit needs held-out calibration prompts (calibration_frac > 0) to map budgets to lambda")
    if np.intersect1d(train, calibration).size:
        raise CatimageError("training and calibration prompts overlap; they must be disjoint")
    features = features if features is not None else FeatureCache()
    scaler = MetricScaler.fit(matrix.mean[train])
    if isinstance(embedder, str):
        embedder = make_embedder(embedder, **(embedder_params or {}))
    embedder.fit([matrix.prompts[i] for i in train])
    est = make_estimator(estimator, **(estimator_params or {}))
    X = features.get(embedder, matrix.prompts, est.input_kind)
    Y = scaler.transform(matrix.mean)
    var = matrix.var / (scaler.high - scaler.low) ** 2
    data = FitData(X[train], Y[train], matrix.count[train].astype(np.float64), var[train], costs)
    log.info("fitting %s on %d prompts x %d candidates (%d held out for calibration)",
             estimator, train.size, len(matrix.candidates), calibration.size)
    if fit_estimator is not None:
        est = fit_estimator(est, data)
    else:
        est.fit(data.X, data.Y, data.counts, costs=data.costs, var=data.var)
    calibration_pred = scaler.inverse_transform(est.predict(X[calibration]))
    pooled = X if est.input_kind == "pooled" else features.get(embedder, matrix.prompts, "pooled")
    centroids = profile_clusters(pooled[train])
    selection = getattr(est, "explanation_", None)
    return RouterModel(
        matrix.candidates, costs, cost_unit, matrix.metric, scaler, embedder, est, calibration_pred,
        notes=notes, calibration_pooled=pooled[calibration], centroids=centroids, selection=selection,
    )


class RouterModel:
    """Embedder + estimator + metric scaler + candidate costs + calibration predictions."""

    def __init__(
        self,
        candidates: Sequence[str],
        costs: np.ndarray,
        cost_unit: str,
        metric: str,
        scaler: MetricScaler,
        embedder: Embedder,
        estimator: QualityEstimator,
        calibration_pred: np.ndarray,
        notes: Sequence[str] = (),
        calibration_pooled: np.ndarray | None = None,
        centroids: np.ndarray | None = None,
        selection: str | None = None,
        added: Sequence[AddedCandidate] = (),
    ) -> None:
        self.base_candidates = list(candidates)
        self.added = list(added)
        candidates = [*self.base_candidates, *(a.name for a in self.added)]
        costs = np.concatenate([np.asarray(costs, dtype=np.float64)[: len(self.base_candidates)],
                                [a.cost for a in self.added]]) if self.added else costs
        self.candidates = list(candidates)
        self.costs = np.asarray(costs, dtype=np.float64)
        if self.costs.shape != (len(self.candidates),):
            raise CatimageError(f"{len(self.candidates)} candidates but {self.costs.shape[0]} costs")
        self.cost_unit = cost_unit
        self.metric = metric
        self.scaler = scaler
        self.embedder = embedder
        self.estimator = estimator
        self.notes = list(notes)
        self.calibration_pooled = None if calibration_pooled is None else np.asarray(calibration_pooled, np.float32)
        self.centroids = None if centroids is None else np.asarray(centroids, np.float32)
        self.selection = selection
        self.base_calibration_pred = np.asarray(calibration_pred, dtype=np.float64)
        if self.base_calibration_pred.ndim != 2 or self.base_calibration_pred.shape[1] != len(self.base_candidates):
            raise CatimageError("calibration predictions must be (n, M) with one column per (fitted) candidate")
        self.calibration_pred = self._calibration_with_added()

    def _calibration_with_added(self) -> np.ndarray:
        """Calibration predictions of every candidate: the fitted ones, then each added one."""
        if not self.added:
            return self.base_calibration_pred
        self._check_profile()
        base = self.scaler.transform(self.base_calibration_pred)
        member = memberships(self.calibration_pooled, self.centroids)
        cols = [self.scaler.inverse_transform(a.predict_scaled(base, member))[:, None] for a in self.added]
        return np.concatenate([self.base_calibration_pred, *cols], axis=1)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        matrix: QualityMatrix,
        costs: np.ndarray,
        cost_unit: str,
        embedder_name: str = "minilm",
        embedder_params: dict[str, Any] | None = None,
        estimator_name: str = "auto",
        estimator_params: dict[str, Any] | None = None,
        calibration_frac: float = 0.1,
        seed: int = 0,
        notes: Sequence[str] = (),
        fit_estimator: EstimatorFit | None = None,
        embedder: Embedder | None = None,
    ) -> RouterModel:
        """Fit on all prompts but a calibration split (`fit_router` with a train / calibration split)."""
        split = split_prompts(matrix.n_prompts, test_frac=0.0, calibration_frac=calibration_frac, seed=seed)
        return fit_router(
            matrix, costs, cost_unit, split.train, split.calibration, estimator=estimator_name,
            estimator_params=estimator_params, embedder=embedder if embedder is not None else embedder_name,
            embedder_params=embedder_params, fit_estimator=fit_estimator, notes=notes,
        )

    # --- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.estimator.save(path / "estimator")
        self.embedder.save(path / "embedder")
        calib = {"pred": np.ascontiguousarray(self.base_calibration_pred)}
        if self.calibration_pooled is not None:
            calib["pooled"] = np.ascontiguousarray(self.calibration_pooled)
        save_file(calib, str(path / "calibration.safetensors"))
        profile = {f"added.{i}.coef": np.ascontiguousarray(a.coef) for i, a in enumerate(self.added)}
        if self.centroids is not None:
            profile["centroids"] = np.ascontiguousarray(self.centroids)
        if profile:
            save_file(profile, str(path / "profile.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "candidates": self.base_candidates,
            "costs": self.costs[: len(self.base_candidates)].tolist(),
            "cost_unit": self.cost_unit,
            "metric": self.metric,
            "scaler": self.scaler.to_dict(),
            "embedder": self.embedder.spec,
            "estimator": type(self.estimator).__name__,
            "estimator_kind": self.estimator.kind,
            "selection": self.selection,
            "added": [a.to_json() for a in self.added],
            "notes": self.notes,
        }
        (path / "router.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RouterModel:
        path = Path(path)
        meta_path = path / "router.json"
        if not meta_path.is_file():
            raise CatimageError(
                f"{path} is not a catimage model directory (no router.json); create one with "
                "`catimage fit TABLE --pool POOL.yaml --out DIR` or `catimage train`"
            )
        meta = json.loads(meta_path.read_text())
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CatimageError(
                f"{path}: model format {version} is not one this catimage reads {list(READABLE_VERSIONS)}; "
                "refit it with `catimage fit` (or use the catimage version that wrote it)"
            )
        calib = load_file(str(path / "calibration.safetensors"))
        profile = load_file(str(path / "profile.safetensors")) if (path / "profile.safetensors").is_file() else {}
        added = [AddedCandidate.from_json(doc, profile[f"added.{i}.coef"]) for i, doc in enumerate(meta.get("added", []))]
        return cls(
            candidates=meta["candidates"],
            costs=np.asarray(meta["costs"], dtype=np.float64),
            cost_unit=meta["cost_unit"],
            metric=meta["metric"],
            scaler=MetricScaler.from_dict(meta["scaler"]),
            embedder=load_embedder(path / "embedder"),
            estimator=load_estimator(path / "estimator"),
            calibration_pred=calib["pred"],
            notes=meta.get("notes", []),
            calibration_pooled=calib.get("pooled"),
            centroids=profile.get("centroids"),
            selection=meta.get("selection"),
            added=added,
        )

    # --- adding candidates ---------------------------------------------------------------------
    def _check_profile(self) -> None:
        if self.centroids is None or self.calibration_pooled is None:
            raise CatimageError(
                "this model was saved before candidates could be added (format 1, no prompt profile); "
                "refit it with `catimage fit` first"
            )

    def add_candidate(
        self, name: str, cost: float, prompts: Sequence[str], labels: np.ndarray,
        counts: np.ndarray | None = None, base_labels: np.ndarray | None = None, interactions: bool = True,
    ) -> AddedCandidate:
        """Add a generator from its labels (metric units) on a few prompts; no retraining.

        `base_labels` (n, M_base, metric units, NaN = unknown): the existing candidates' labels on
        the same prompts, when known. See catimage.model.add_candidate for the model.
        """
        from catimage.model.add_candidate import fit_added_candidate

        self._check_profile()
        if name in self.candidates:
            raise CatimageError(f"candidate {name!r} is already in this router ({self.candidates})")
        if not np.isfinite(cost) or cost < 0:
            raise CatimageError(f"the cost of {name!r} must be a number >= 0; got {cost}")
        base, member = self._base_scaled(prompts)
        scaled_base = None if base_labels is None else np.where(
            np.isfinite(base_labels), self.scaler.transform(base_labels), np.nan)
        added = fit_added_candidate(name, float(cost), base, member, self.scaler.transform(labels), counts, scaled_base,
                                    interactions=interactions)
        self.added.append(added)
        self.candidates.append(name)
        self.costs = np.append(self.costs, float(cost))
        self.calibration_pred = self._calibration_with_added()
        log.info("added %s from %d labelled prompts (ridge alpha %.3g)", name, added.n_labels, added.alpha)
        return added

    # --- inference ----------------------------------------------------------------------------
    def _base_scaled(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Scaled base predictions and (when a profile exists) cluster memberships of `prompts`."""
        X = embed_for(self.embedder, prompts, self.estimator.input_kind)
        base = self.estimator.predict(X)
        if self.centroids is None:
            return base, None
        pooled = X if self.estimator.input_kind == "pooled" else self.embedder.encode(list(prompts))
        return base, memberships(pooled, self.centroids)

    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted quality of every candidate for each prompt, in the metric's own units."""
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, len(self.candidates)))
        base, member = self._base_scaled(prompts)
        if self.added:
            base = np.concatenate([base, *(a.predict_scaled(base, member)[:, None] for a in self.added)], axis=1)
        return self.scaler.inverse_transform(base)

    def lambda_for_budget(self, budget: float) -> float:
        """The smallest lambda whose average cost on the calibration prompts meets `budget`."""
        try:
            budget = float(budget)
        except (TypeError, ValueError):
            raise BudgetError(f"budget must be a number, got {budget!r}") from None
        if not np.isfinite(budget) or budget < 0:
            raise BudgetError(f"budget must be a non-negative number of {self.cost_unit}, got {budget}")
        return calibrate_lambda(self.calibration_pred, self.costs, budget)

    def decide(self, prompts: Sequence[str], budget: float | None = None, lam: float | None = None) -> list[Decision]:
        """Route prompts; lambda comes from `lam`, else from `budget`, else 0 (best predicted quality).

        `lam = inf` is the limit (every prompt on its cheapest candidate, best predicted among equally
        cheap ones); the ranking then follows cost, never inf * 0 = NaN utilities.
        """
        if budget is not None and lam is not None:
            raise BudgetError("give a budget or a lambda, not both")
        if lam is None:
            lam = self.lambda_for_budget(budget) if budget is not None else 0.0
        elif np.isnan(lam) or lam < 0:
            raise BudgetError(f"lambda must be a non-negative number, got {lam}")
        prompts = list(prompts)
        pred = self.predict(prompts)
        chosen = route(pred, self.costs, lam)
        # Best utility first; ties broken toward the cheaper candidate, as the rule does.
        ranking = utility_ranking(pred, self.costs, lam) if prompts else np.zeros((0, len(self.candidates)), np.int64)
        decisions = []
        for i, prompt in enumerate(prompts):
            order = ranking[i]
            j = int(chosen[i])
            decisions.append(
                Decision(
                    prompt=prompt,
                    candidate=self.candidates[j],
                    index=j,
                    lam=float(lam),
                    cost=float(self.costs[j]),
                    predicted={c: float(pred[i, k]) for k, c in enumerate(self.candidates)},
                    ranking=[self.candidates[k] for k in order],
                )
            )
        return decisions
