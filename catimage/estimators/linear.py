"""Ridge-regression baseline on pooled prompt embeddings: one scikit-learn Ridge per candidate.

Each candidate is fitted on the prompts that have a label for it (NaN rows dropped), with the sample
counts as sample weights when given. The penalty is chosen per candidate from `alphas`: by
(count-weighted) validation MSE when validation data are passed to `fit`, else by RidgeCV's
efficient leave-one-out (GCV). Predictions are clipped to [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import RidgeCV

from catimage.estimators.base import EstimatorError, QualityEstimator, label_weights

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 3, 13))


class LinearEstimator(QualityEstimator):
    kind = "linear"
    input_kind = "pooled"

    def __init__(self, alphas: tuple[float, ...] = DEFAULT_ALPHAS, use_counts: bool = True) -> None:
        self.alphas = alphas
        self.use_counts = use_counts

    def _fit(self, X, Y, counts, X_val, Y_val, counts_val) -> None:
        alphas = [float(a) for a in self.alphas]
        if not alphas or min(alphas) <= 0:
            raise EstimatorError(f"linear alphas must be positive numbers; got {self.alphas!r}")
        X = X.astype(np.float64)
        X_val = X_val.astype(np.float64) if X_val is not None else None
        w = label_weights(Y, counts if self.use_counts else None)
        w_val = label_weights(Y_val, counts_val) if Y_val is not None else None
        m, d = Y.shape[1], X.shape[1]
        self.coef_ = np.zeros((m, d))
        self.intercept_ = np.zeros(m)
        self.alpha_ = np.zeros(m)
        for j in range(m):
            rows = w[:, j] > 0
            Xj, yj, sw = X[rows], Y[rows, j], w[rows, j]
            vrows = w_val[:, j] > 0 if w_val is not None else None
            if vrows is not None and vrows.any():
                # One SVD serves every alpha (the same closed form Ridge solves), so the validation
                # sweep costs one factorisation per candidate instead of one fit per alpha.
                best = None
                for alpha, coef, intercept in ridge_path(Xj, yj, sw, alphas):
                    pred = np.clip(X_val[vrows] @ coef + intercept, 0.0, 1.0)
                    mse = float(np.average((pred - Y_val[vrows, j]) ** 2, weights=w_val[vrows, j]))
                    if best is None or mse < best[0]:
                        best = (mse, alpha, coef, intercept)
                _, alpha, coef, intercept = best
            else:
                model = RidgeCV(alphas=alphas).fit(Xj, yj, sample_weight=sw)
                alpha, coef, intercept = float(model.alpha_), model.coef_, model.intercept_
            self.coef_[j] = coef
            self.intercept_[j] = intercept
            self.alpha_[j] = alpha

    def _predict(self, X: np.ndarray) -> np.ndarray:
        return X.astype(np.float64) @ self.coef_.T + self.intercept_

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"coef": self.coef_, "intercept": self.intercept_, "alpha": self.alpha_}

    def _restore(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.coef_ = tensors["coef"].astype(np.float64)
        self.intercept_ = tensors["intercept"].astype(np.float64)
        self.alpha_ = tensors["alpha"].astype(np.float64)


def ridge_path(X: np.ndarray, y: np.ndarray, w: np.ndarray, alphas: list[float]):
    """Weighted ridge with intercept for each alpha, from one thin SVD of the centred, weighted X.

    Matches sklearn's Ridge(alpha).fit(X, y, sample_weight=w) (tested), which centres with the
    weighted means and penalises only the coefficients.
    """
    wn = w / w.sum()
    x_mean, y_mean = wn @ X, float(wn @ y)
    sq = np.sqrt(w)[:, None]
    U, S, Vt = np.linalg.svd((X - x_mean) * sq, full_matrices=False)
    uty = U.T @ ((y - y_mean) * sq[:, 0])
    for alpha in alphas:
        coef = Vt.T @ (S / (S**2 + alpha) * uty)
        yield alpha, coef, y_mean - float(x_mean @ coef)
