"""k-nearest-neighbour quality estimator on pooled prompt embeddings (cosine similarity).

The prediction for a prompt is, per candidate, the weighted mean of its k nearest training prompts'
labels. Missing (NaN) labels simply drop out of that candidate's mean; with `counts`, a neighbour's
label counts in proportion to the number of samples behind it (a 3-sample mean is less noisy than a
1-sample one, so it gets 3x the weight). If no neighbour has a label for a candidate, the candidate's
count-weighted training mean is used.

``k="auto"`` picks k from `k_grid` by (count-weighted) MSE: on the validation data when they are
passed to `fit`, else by exact leave-one-out on the training prompts (each prompt left out of its
own neighbours); k is capped at the number of training prompts. This is the paper's estimator and
selection rule; `twoway-knn` is the decision-focused variant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from catimage.estimators.base import EstimatorError, QualityEstimator, label_weights, masked_mse

DEFAULT_K = 20


class KNNEstimator(QualityEstimator):
    kind = "knn"
    input_kind = "pooled"

    def __init__(
        self,
        k: int | str = "auto",
        k_grid: tuple[int, ...] = (5, 10, 20, 40, 80),
        weights: str = "uniform",
        use_counts: bool = True,
    ) -> None:
        self.k = k
        self.k_grid = k_grid
        self.weights = weights
        self.use_counts = use_counts

    def _check_params(self) -> None:
        if self.weights not in ("uniform", "distance"):
            raise EstimatorError(f"knn weights must be 'uniform' or 'distance'; got {self.weights!r}")
        if self.k != "auto" and (not isinstance(self.k, int | np.integer) or self.k < 1):
            raise EstimatorError(f"knn k must be a positive integer or 'auto'; got {self.k!r}")
        if not self.k_grid or any(int(k) < 1 for k in self.k_grid):
            raise EstimatorError(f"knn k_grid must hold positive integers; got {self.k_grid!r}")

    def _fit(self, X, Y, counts, X_val, Y_val, counts_val) -> None:
        self._check_params()
        self._set_data(X, Y, label_weights(Y, counts if self.use_counts else None))
        n = X.shape[0]
        self.val_mse_: dict[int, float] = {}
        if self.k != "auto":
            self.k_ = min(int(self.k), n)
        elif X_val is None and n < 3:
            self.k_ = min(DEFAULT_K, n)
        elif X_val is None:  # leave-one-out: the nearest neighbour of a training prompt is itself
            grid = sorted({min(int(k), n - 1) for k in self.k_grid})
            idx, dist = self._neighbours(X, max(grid) + 1)
            not_self = idx != np.arange(n)[:, None]
            keep = np.argsort(~not_self, axis=1, kind="stable")[:, : max(grid)]  # drop self, keep order
            idx, dist = np.take_along_axis(idx, keep, axis=1), np.take_along_axis(dist, keep, axis=1)
            for k in grid:
                pred = self._combine(idx[:, :k], dist[:, :k])
                self.val_mse_[k] = masked_mse(pred, Y, counts if self.use_counts else None)
            self.k_ = min(self.val_mse_, key=lambda k: (self.val_mse_[k], k))
        else:
            grid = sorted({min(int(k), n) for k in self.k_grid})
            idx, dist = self._neighbours(X_val, max(grid))
            for k in grid:
                pred = self._combine(idx[:, :k], dist[:, :k])
                self.val_mse_[k] = masked_mse(pred, Y_val, counts_val)
            self.k_ = min(self.val_mse_, key=lambda k: (self.val_mse_[k], k))

    def _set_data(self, X: np.ndarray, Y: np.ndarray, w: np.ndarray) -> None:
        self.train_X_ = X.astype(np.float32)
        self.train_Y_ = Y.astype(np.float64)
        self.train_w_ = w.astype(np.float64)  # 0 where missing, else the sample count (or 1)
        labels = np.nan_to_num(self.train_Y_)
        self.prior_ = (self.train_w_ * labels).sum(axis=0) / self.train_w_.sum(axis=0)
        self._nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(self.train_X_)

    def _neighbours(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, idx = self._nn.kneighbors(X, n_neighbors=min(k, self.train_X_.shape[0]))
        return idx, dist

    def _combine(self, idx: np.ndarray, dist: np.ndarray) -> np.ndarray:
        if self.weights == "distance":
            nb_w = 1.0 / (np.maximum(dist, 0.0) + 1e-6)
        else:
            nb_w = np.ones_like(dist)
        w = nb_w[:, :, None] * self.train_w_[idx]  # (n, k, M)
        labels = np.nan_to_num(self.train_Y_[idx])
        total = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            pred = (w * labels).sum(axis=1) / total
        return np.where(total > 0, pred, self.prior_[None, :])

    def _predict(self, X: np.ndarray) -> np.ndarray:
        idx, dist = self._neighbours(X, self.k_)
        return self._combine(idx, dist)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"k": int(self.k_), "val_mse": {str(k): v for k, v in self.val_mse_.items()}}
        tensors = {"train_X": self.train_X_, "train_Y": self.train_Y_, "train_w": self.train_w_}
        return meta, tensors

    def _restore(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self._set_data(tensors["train_X"], tensors["train_Y"], tensors["train_w"])
        self.k_ = int(meta["k"])
        self.val_mse_ = {int(k): float(v) for k, v in meta.get("val_mse", {}).items()}
