"""The router bundle: everything needed to turn a prompt into a routing decision, saved as one folder.

A model directory holds::

    router.json              candidates, costs, cost unit, metric, scaler, embedder spec, estimator kind
    estimator/               estimator.json + estimator.safetensors (catimage.estimators format)
    embedder/                the embedder's spec (and a tfidf vocabulary, when it learned one)
    calibration.safetensors  predicted quality of held-out prompts, to set lambda from a budget

`catimage route`, the Ray Train job and the Serve router all read this one format. Calibration uses
held-out (validation) prompts so that the lambda chosen for a budget is not fitted to the
training prompts whose predictions are over-confident.
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

from catimage.embed import Embedder, load_embedder, make_embedder
from catimage.errors import BudgetError, CatimageError
from catimage.estimators import QualityEstimator, load_estimator, make_estimator
from catimage.routing import calibrate_lambda, route
from catimage.table import MetricScaler, QualityMatrix, Split, split_prompts

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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
class TrainingData:
    """Estimator inputs for one split: embeddings, scaled labels (NaN = missing), sample counts."""

    X: np.ndarray
    Y: np.ndarray
    counts: np.ndarray


def embed_for(embedder: Embedder, prompts: Sequence[str], input_kind: str) -> np.ndarray:
    """The embedding an estimator of `input_kind` consumes: pooled (n, d) or per-token (n, T, d)."""
    if input_kind == "tokens":
        return embedder.encode_tokens(list(prompts))
    if input_kind == "pooled":
        return embedder.encode(list(prompts))
    raise CatimageError(f"unknown estimator input kind {input_kind!r}")


def prepare_training_data(
    matrix: QualityMatrix, embedder: Embedder, input_kind: str, split: Split, scaler: MetricScaler
) -> dict[str, TrainingData]:
    """Embed every prompt once and slice it into train / val / test arrays with scaled labels."""
    X = embed_for(embedder, matrix.prompts, input_kind)
    Y = scaler.transform(matrix.mean)  # NaN (missing) stays NaN
    out = {}
    for name in ("train", "val", "test"):
        idx = getattr(split, name)
        out[name] = TrainingData(X[idx], Y[idx], matrix.count[idx].astype(np.float64))
    return out


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
    ) -> None:
        self.candidates = list(candidates)
        self.costs = np.asarray(costs, dtype=np.float64)
        if self.costs.shape != (len(self.candidates),):
            raise CatimageError(f"{len(self.candidates)} candidates but {self.costs.shape[0]} costs")
        self.cost_unit = cost_unit
        self.metric = metric
        self.scaler = scaler
        self.embedder = embedder
        self.estimator = estimator
        self.calibration_pred = np.asarray(calibration_pred, dtype=np.float64)
        if self.calibration_pred.ndim != 2 or self.calibration_pred.shape[1] != len(self.candidates):
            raise CatimageError("calibration predictions must be (n, M) with one column per candidate")
        self.notes = list(notes)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, *args: Any, **kwargs: Any) -> RouterModel:
        """Assemble a bundle from already-fitted parts (what the Ray Train job does)."""
        return cls(*args, **kwargs)

    @classmethod
    def fit(
        cls,
        matrix: QualityMatrix,
        costs: np.ndarray,
        cost_unit: str,
        embedder_name: str = "minilm",
        embedder_params: dict[str, Any] | None = None,
        estimator_name: str = "knn",
        estimator_params: dict[str, Any] | None = None,
        val_frac: float = 0.1,
        seed: int = 0,
        notes: Sequence[str] = (),
    ) -> RouterModel:
        """Fit in-process on all prompts but a validation split (early stopping + lambda calibration)."""
        split = split_prompts(matrix.n_prompts, test_frac=0.0, val_frac=val_frac, seed=seed)
        scaler = MetricScaler.fit(matrix.mean[split.train])
        embedder = make_embedder(embedder_name, **(embedder_params or {}))
        embedder.fit([matrix.prompts[i] for i in split.train])
        estimator = make_estimator(estimator_name, **(estimator_params or {}))
        data = prepare_training_data(matrix, embedder, estimator.input_kind, split, scaler)
        estimator.fit(
            data["train"].X, data["train"].Y, counts=data["train"].counts,
            X_val=data["val"].X, Y_val=data["val"].Y, counts_val=data["val"].counts,
        )
        calibration = scaler.inverse_transform(estimator.predict(data["val"].X))
        log.info("fitted %s on %d prompts (%d held out for calibration)", estimator_name, len(split.train), len(split.val))
        return cls(matrix.candidates, costs, cost_unit, matrix.metric, scaler, embedder, estimator, calibration, notes)

    # --- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.estimator.save(path / "estimator")
        self.embedder.save(path / "embedder")
        save_file({"pred": np.ascontiguousarray(self.calibration_pred)}, str(path / "calibration.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "candidates": self.candidates,
            "costs": self.costs.tolist(),
            "cost_unit": self.cost_unit,
            "metric": self.metric,
            "scaler": self.scaler.to_dict(),
            "embedder": self.embedder.spec,
            "estimator": type(self.estimator).__name__,
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
        if meta.get("format_version") != FORMAT_VERSION:
            raise CatimageError(f"{path}: model format {meta.get('format_version')} is not {FORMAT_VERSION}; refit it")
        return cls(
            candidates=meta["candidates"],
            costs=np.asarray(meta["costs"], dtype=np.float64),
            cost_unit=meta["cost_unit"],
            metric=meta["metric"],
            scaler=MetricScaler.from_dict(meta["scaler"]),
            embedder=load_embedder(path / "embedder"),
            estimator=load_estimator(path / "estimator"),
            calibration_pred=load_file(str(path / "calibration.safetensors"))["pred"],
            notes=meta.get("notes", []),
        )

    # --- inference ----------------------------------------------------------------------------
    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted quality of every candidate for each prompt, in the metric's own units."""
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, len(self.candidates)))
        X = embed_for(self.embedder, prompts, self.estimator.input_kind)
        return self.scaler.inverse_transform(self.estimator.predict(X))

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
        """Route prompts; lambda comes from `lam`, else from `budget`, else 0 (best predicted quality)."""
        if budget is not None and lam is not None:
            raise BudgetError("give a budget or a lambda, not both")
        if lam is None:
            lam = self.lambda_for_budget(budget) if budget is not None else 0.0
        elif not np.isfinite(lam) or lam < 0:
            raise BudgetError(f"lambda must be a non-negative number, got {lam}")
        prompts = list(prompts)
        pred = self.predict(prompts)
        chosen = route(pred, self.costs, lam)
        utility = pred - lam * self.costs
        decisions = []
        for i, prompt in enumerate(prompts):
            # Best utility first; ties broken toward the cheaper candidate, as the rule does.
            order = sorted(range(len(self.candidates)), key=lambda j: (-utility[i, j], self.costs[j], j))
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
