"""What every quality estimator shares: input checks, the save format, masked scoring.

An estimator maps prompt embeddings X to the expected [0, 1]-scaled quality of each of M candidates.
Labels Y are S-sample means with NaN where a (prompt, candidate) was never scored; `counts` says how
many samples each mean rests on. Every estimator ignores NaN labels and may weight labels by count.

On disk an estimator is a directory with ``estimator.json`` (kind, params, shapes, small metadata)
and ``estimator.safetensors`` (arrays): no pickle, so a bundle from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator

from catimage.errors import CatimageError

ESTIMATOR_JSON = "estimator.json"
ESTIMATOR_TENSORS = "estimator.safetensors"
FORMAT_VERSION = 1


class EstimatorError(CatimageError):
    """Bad estimator input (shapes, labels) or use before fitting."""


def check_X(X: Any, input_kind: str, what: str = "X") -> Any:
    """X as float32 of the shape `input_kind` needs: (n, d) pooled or (n, T, d) tokens.

    Token inputs may also be a `catimage.features.tokens.TokenBatch` (ragged float16 tokens): it is
    passed through without a copy, which is what keeps 10,000-prompt tables in memory.
    """
    from catimage.features.tokens import TokenBatch

    if isinstance(X, TokenBatch):
        if input_kind != "tokens":
            raise EstimatorError(
                f"{what} is per-token (TokenBatch), but this estimator takes {input_kind} embeddings of 2 "
                "dimensions ((n, d)); build it with embedder.encode(prompts)"
            )
        if len(X) == 0:
            raise EstimatorError(f"{what} has no rows")
        return X
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise EstimatorError(f"{what} must be a numeric array: {err}") from None
    want = 2 if input_kind == "pooled" else 3
    if arr.ndim != want:
        hint = "embedder.encode(prompts)" if input_kind == "pooled" else "embedder.encode_tokens(prompts)"
        raise EstimatorError(
            f"{what} has shape {arr.shape}, but this estimator takes {input_kind} embeddings of "
            f"{want} dimensions ({'(n, d)' if want == 2 else '(n, T, d)'}); build it with {hint}"
        )
    if arr.shape[0] == 0:
        raise EstimatorError(f"{what} has no rows")
    if not np.isfinite(arr).all():
        raise EstimatorError(f"{what} holds NaN or infinite values; embeddings must be finite")
    return arr


def check_Y(Y: Any, n: int, what: str = "Y", n_candidates: int | None = None) -> np.ndarray:
    """Y as float64 (n, M) in [0, 1] with NaN for missing; every candidate needs >= 1 label."""
    try:
        arr = np.asarray(Y, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise EstimatorError(f"{what} must be a numeric array: {err}") from None
    if arr.ndim != 2 or arr.shape[0] != n:
        raise EstimatorError(f"{what} has shape {arr.shape}; expected ({n}, M): one row per prompt of X")
    if n_candidates is not None and arr.shape[1] != n_candidates:
        raise EstimatorError(f"{what} has {arr.shape[1]} candidate columns; the training labels had {n_candidates}")
    if np.isinf(arr).any():
        raise EstimatorError(f"{what} holds infinite values; use NaN for missing labels")
    finite = arr[np.isfinite(arr)]
    if finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
        raise EstimatorError(
            f"{what} has values in [{finite.min():.3g}, {finite.max():.3g}]; estimators take [0, 1]-scaled "
            "labels: scale them with catimage.table.MetricScaler fitted on the training split"
        )
    return np.clip(arr, 0.0, 1.0)


def check_counts(counts: Any, Y: np.ndarray, what: str = "counts") -> np.ndarray | None:
    """Sample counts (n, M) >= 0 matching Y, or None. Zero-count entries act as missing labels."""
    if counts is None:
        return None
    arr = np.asarray(counts, dtype=np.float64)
    if arr.shape != Y.shape:
        raise EstimatorError(f"{what} has shape {arr.shape}; it must match the labels' {Y.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise EstimatorError(f"{what} must be finite and >= 0 (the number of samples behind each mean)")
    return arr


def label_weights(Y: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """Per-entry weights: 0 where the label is missing, else its sample count (1 without counts)."""
    w = np.isfinite(Y).astype(np.float64)
    if counts is not None:
        w = w * counts
    return w


def masked_mse(pred: np.ndarray, Y: np.ndarray, counts: np.ndarray | None = None) -> float:
    """Mean squared error over labelled entries, weighted by sample counts when given."""
    w = label_weights(Y, counts)
    if w.sum() <= 0:
        raise EstimatorError("no labelled entries to score (all labels NaN or zero counts)")
    err = np.where(w > 0, (np.nan_to_num(Y) - pred) ** 2, 0.0)
    return float((w * err).sum() / w.sum())


def require_labels_per_candidate(Y: np.ndarray, counts: np.ndarray | None) -> None:
    w = label_weights(Y, counts)
    empty = np.flatnonzero(w.sum(axis=0) <= 0)
    if empty.size:
        raise EstimatorError(
            f"candidate column(s) {empty.tolist()} have no labels in the training split; drop those candidates "
            "or score some of their samples"
        )


class QualityEstimator(BaseEstimator, ABC):
    """Base class. Subclasses declare `kind` / `input_kind` and implement the four hooks.

    scikit-learn's BaseEstimator supplies get_params / set_params / clone from the constructor
    signature, so every hyperparameter must be an explicit keyword argument of ``__init__``.
    """

    kind: ClassVar[str]
    input_kind: ClassVar[str]  # "pooled" or "tokens"

    # ---- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        counts: np.ndarray | None,
        X_val: np.ndarray | None,
        Y_val: np.ndarray | None,
        counts_val: np.ndarray | None,
    ) -> None: ...

    @abstractmethod
    def _predict(self, X: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named float arrays) describing the fitted model."""

    @abstractmethod
    def _restore(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None: ...

    # ---- public API --------------------------------------------------------------------------
    def fit(
        self,
        X: Any,
        Y: Any,
        counts: Any = None,
        X_val: Any = None,
        Y_val: Any = None,
        counts_val: Any = None,
        *,
        costs: Any = None,
        var: Any = None,
    ) -> QualityEstimator:
        """Fit on prompts' embeddings X and their scaled mean qualities Y (NaN = missing).

        `costs` (M,): the candidates' costs; estimators that select hyper-parameters use them to
        score settings by the routing objective (area over the mixture hull) instead of MSE.
        `var` (n, M): per-cell sample variance of the labels in scaled units (NaN below two
        samples), for noise-aware shrinkage. Estimators that do not use them ignore them.
        """
        self.is_fitted_ = False
        self._fit_costs = None if costs is None else _check_costs(costs, np.shape(Y)[-1] if np.ndim(Y) == 2 else None)
        self._fit_var = None if var is None else np.asarray(var, dtype=np.float64)
        X = check_X(X, self.input_kind)
        Y = check_Y(Y, X.shape[0])
        counts = check_counts(counts, Y)
        require_labels_per_candidate(Y, counts)
        if (X_val is None) != (Y_val is None):
            raise EstimatorError("pass X_val and Y_val together (or neither)")
        if self._fit_var is not None and self._fit_var.shape != Y.shape:
            raise EstimatorError(f"var has shape {self._fit_var.shape}; it must match the labels' {Y.shape}")
        if X_val is not None:
            X_val = check_X(X_val, self.input_kind, "X_val")
            if X_val.shape[-1] != X.shape[-1]:
                raise EstimatorError(f"X_val has width {X_val.shape[-1]}; X has {X.shape[-1]}")
            Y_val = check_Y(Y_val, X_val.shape[0], "Y_val", n_candidates=Y.shape[1])
            counts_val = check_counts(counts_val, Y_val, "counts_val")
            if label_weights(Y_val, counts_val).sum() <= 0:
                raise EstimatorError("the validation labels are all missing; pass a split with labels or none")
        elif counts_val is not None:
            raise EstimatorError("counts_val given without X_val / Y_val")
        self.n_features_in_ = int(X.shape[-1])
        self.n_candidates_ = int(Y.shape[1])
        self._fit(X, Y, counts, X_val, Y_val, counts_val)
        self.is_fitted_ = True
        return self

    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise EstimatorError(
                f"this {self.kind} estimator is not fitted: call fit(X, Y) or load one with load_estimator(dir)"
            )

    def predict(self, X: Any) -> np.ndarray:
        """(n, M) float64 expected scaled quality in [0, 1]."""
        self._check_fitted()
        X = check_X(X, self.input_kind)
        if X.shape[-1] != self.n_features_in_:
            raise EstimatorError(
                f"X has embedding width {X.shape[-1]}, but the estimator was fitted on width "
                f"{self.n_features_in_}: use the same embedder as at fit time"
            )
        return np.clip(np.asarray(self._predict(X), dtype=np.float64), 0.0, 1.0)

    def save(self, directory: str | Path) -> Path:
        """Write ``estimator.json`` + ``estimator.safetensors`` into `directory`; returns it."""
        from safetensors.numpy import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta, tensors = self._state()
        doc = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "input_kind": self.input_kind,
            "params": self.get_params(),
            "shapes": {"n_features_in": self.n_features_in_, "n_candidates": self.n_candidates_},
            "meta": meta,
        }
        (directory / ESTIMATOR_JSON).write_text(json.dumps(doc, indent=2, default=_json_default))
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / ESTIMATOR_TENSORS))
        return directory

    @classmethod
    def _from_saved(cls, doc: dict[str, Any], tensors: dict[str, np.ndarray]) -> QualityEstimator:
        # JSON has no tuples; sequence-valued params are tuples in every estimator's signature.
        est = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["params"].items()})
        est.n_features_in_ = int(doc["shapes"]["n_features_in"])
        est.n_candidates_ = int(doc["shapes"]["n_candidates"])
        est._restore(doc.get("meta", {}), tensors)
        est.is_fitted_ = True
        return est


def _check_costs(costs: Any, m: int | None) -> np.ndarray:
    arr = np.asarray(costs, dtype=np.float64)
    if arr.ndim != 1 or (m is not None and arr.size != m):
        raise EstimatorError(f"costs must be one number per candidate ({m}); got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise EstimatorError(f"costs must be finite and >= 0; got {arr.tolist()}")
    return arr


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in estimator.json")
