"""Decision-focused estimators: candidate means + shrunk prompt x candidate interactions.

Both learn the explicit two-way decomposition y[i, m] = a_i + b_m + r[i, m] of the training labels
(`selection.two_way`): the router's argmax ignores the prompt level a_i, so each model predicts the
interaction r from the prompt embedding and adds it, scaled by a cross-validated trust factor, to
the candidate mean b_m (plus a smoothed a(x), which moves no decision but keeps predictions in the
metric's range). Noise-aware: each training cell's interaction is shrunk toward 0 by empirical
Bayes with its sample count and variance (`selection.noise_shrinkage`).

Hyper-parameters are chosen on exact leave-one-out predictions of the training prompts, scored by
the routing objective (area of the deferral curve over the mixture hull) when `fit` gets the
candidates' costs, else by interaction MSE:

* ``twoway-knn``: cosine k-NN average of the interactions; k from a grid that grows with the table
  (5 ... n/2), LOO by excluding each prompt from its own neighbours.
* ``twoway-ridge``: ridge regression of the interactions on the embedding; alpha from a grid on
  the data's singular values, LOO from the closed form (r_i - fit_i) / (1 - h_ii).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from catimage.estimators.base import EstimatorError, QualityEstimator, label_weights
from catimage.estimators.selection import (
    calibration_slope,
    noise_shrinkage,
    size_grid,
    two_way,
)
from catimage.policy.routing import area_over_hull

log = logging.getLogger(__name__)

_CHUNK = 1024


def _normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def neighbour_means(
    Q: np.ndarray, X: np.ndarray, values: np.ndarray, weights: np.ndarray, grid: list[int],
    exclude_self: bool = False,
) -> list[np.ndarray]:
    """For each k of `grid`: (n_q, M) weighted mean of `values` over each query's k most
    cosine-similar rows of X (rows L2-normalised). Weights 0 everywhere -> 0.

    One `argpartition` with every k as a pivot puts each row's top-k set first for all k at once
    (no full sort), and the band sums between consecutive k are accumulated, so the whole grid costs
    about one k-NN query. `exclude_self`: Q is X and a row is never its own neighbour (leave-one-out).
    Chunked over queries: memory O(chunk x n).
    """
    n = X.shape[0]
    grid = sorted({min(int(k), n - 1 if exclude_self else n) for k in grid})
    kmax = grid[-1]
    bounds = np.asarray([0, *grid[:-1]])
    wv = (weights * values).astype(np.float32)
    w32 = weights.astype(np.float32)
    out = [np.zeros((Q.shape[0], values.shape[1])) for _ in grid]
    for start in range(0, Q.shape[0], _CHUNK):
        sims = Q[start : start + _CHUNK] @ X.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, start + rows] = -np.inf
        if kmax < n:
            nb = np.argpartition(-sims, [k - 1 for k in grid], axis=1)[:, :kmax]
        else:
            nb = np.tile(np.arange(n), (sims.shape[0], 1))
        num = np.cumsum(np.add.reduceat(wv[nb], bounds, axis=1, dtype=np.float64), axis=1)
        den = np.cumsum(np.add.reduceat(w32[nb], bounds, axis=1, dtype=np.float64), axis=1)
        mean = np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)
        for j in range(len(grid)):
            out[j][start : start + sims.shape[0]] = mean[:, j]
    return out


def _objective(pred: np.ndarray, Y: np.ndarray, costs: np.ndarray | None, resid: np.ndarray, w: np.ndarray,
               means: np.ndarray) -> float:
    """Routing score with costs, else minus the weighted interaction MSE."""
    if costs is not None:
        return area_over_hull(pred, Y, costs)
    g = pred - pred.mean(axis=1, keepdims=True) - (means - means.mean())
    have = np.isfinite(resid)
    return -float((w * np.where(have, (np.nan_to_num(resid) - g) ** 2, 0.0)).sum() / max(w[have].sum(), 1e-12))


class _TwoWayBase(QualityEstimator):
    """Shared fitting steps: decomposition, noise shrinkage, slope, selection bookkeeping."""

    input_kind = "pooled"

    def _decompose(self, Y: np.ndarray, counts: np.ndarray | None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        if Y.shape[0] < 3:
            raise EstimatorError(f"{self.kind} needs at least 3 training prompts; got {Y.shape[0]}")
        w = label_weights(Y, counts if self.use_counts else None)
        tw = two_way(Y, w)
        cnt = counts if (counts is not None and self.use_counts) else np.isfinite(Y).astype(np.float64)
        shrunk, omega, info = noise_shrinkage(tw.resid, cnt, self._fit_var if self.use_counts else None)
        self.noise_ = info
        return tw, shrunk, omega, w

    def _trust(self, resid: np.ndarray, g: np.ndarray, w: np.ndarray) -> np.ndarray:
        """How far to trust the interaction predictions: per-candidate CV slope, one pooled slope, or 1."""
        if self.trust == "candidate":
            return calibration_slope(resid, g, w)
        if self.trust == "pooled":
            one = calibration_slope(resid.reshape(-1, 1), g.reshape(-1, 1), w.reshape(-1, 1))
            return np.full(g.shape[1], float(one[0]))
        if self.trust == "none":
            return np.ones(g.shape[1])
        raise EstimatorError(f"{self.kind} trust must be 'candidate', 'pooled' or 'none'; got {self.trust!r}")

    def _select(self, settings: list, loo_preds, tw, Y, w) -> None:
        """Score every setting's LOO predictions; keep the best of the smoothed scores.

        The routing score of one setting is noisy on a small table, and neighbouring settings of a
        geometric grid route almost alike, so each setting is judged by the mean score of itself and
        its grid neighbours (a 3-point moving average); exact ties go to the later (smoother) one.
        """
        costs = self._fit_costs
        raw, slopes = [], []
        for g in loo_preds:
            slope = self._trust(tw.resid, g, w)
            pred = tw.offset[:, None] + tw.means[None, :] + slope[None, :] * g
            raw.append(_objective(pred, Y, costs, tw.resid, w, tw.means))
            slopes.append(slope)
        raw_arr = np.asarray(raw)
        smooth = np.array([raw_arr[max(i - 1, 0): i + 2].mean() for i in range(raw_arr.size)])
        best = max(range(len(settings)), key=lambda i: (smooth[i], i))
        self.scores_ = {str(k): float(v) for k, v in zip(settings, raw_arr)}
        self.smoothed_scores_ = {str(k): float(v) for k, v in zip(settings, smooth)}
        self.slopes_ = {str(k): sl.tolist() for k, sl in zip(settings, slopes)}
        self.setting_, self.slope_ = settings[best], slopes[best]
        self.objective_ = "routing area over hull" if costs is not None else "interaction MSE"


class TwoWayKNNEstimator(_TwoWayBase):
    """Cosine k-NN over double-centred, noise-shrunk interactions; k by LOO routing objective."""

    kind = "twoway-knn"

    def __init__(self, k: int | str = "auto", grid_points: int = 12, max_k_fraction: float = 0.25,
                 trust: str = "pooled", use_counts: bool = True) -> None:
        self.k = k
        self.trust = trust
        self.grid_points = grid_points
        self.max_k_fraction = max_k_fraction
        self.use_counts = use_counts

    def _fit(self, X, Y, counts, X_val, Y_val, counts_val) -> None:
        tw, shrunk, omega, w = self._decompose(Y, counts)
        n = X.shape[0]
        self.train_X_ = _normalise(X)
        self.values_ = shrunk.astype(np.float32)
        self.weights_ = omega.astype(np.float32)
        self.offset_ = tw.offset.astype(np.float64)
        self.means_ = tw.means.astype(np.float64)
        if self.k != "auto":
            if not isinstance(self.k, int | np.integer) or self.k < 1:
                raise EstimatorError(f"twoway-knn k must be a positive integer or 'auto'; got {self.k!r}")
            grid = [min(int(self.k), n - 1)]
        else:
            grid = size_grid(n, points=int(self.grid_points), top_fraction=float(self.max_k_fraction))
        grid = sorted({min(k, n - 1) for k in grid})
        loo = neighbour_means(self.train_X_, self.train_X_, self.values_, self.weights_, grid, exclude_self=True)
        self._select(grid, loo, tw, Y, w)
        self.k_ = int(self.setting_)
        log.info("twoway-knn: k=%d of %s by %s (n=%d)", self.k_, grid, self.objective_, n)

    def _predict(self, X: np.ndarray) -> np.ndarray:
        values = np.concatenate([self.values_, self.offset_[:, None].astype(np.float32)], axis=1)
        weights = np.concatenate([self.weights_, np.ones((self.weights_.shape[0], 1), np.float32)], axis=1)
        (smooth,) = neighbour_means(_normalise(X), self.train_X_, values, weights, [self.k_])
        g, level = smooth[:, :-1], smooth[:, -1]
        return level[:, None] + self.means_[None, :] + self.slope_[None, :] * g

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"k": int(self.k_), "objective": self.objective_, "scores": self.scores_}
        tensors = {"train_X": self.train_X_, "values": self.values_, "weights": self.weights_,
                   "offset": self.offset_, "means": self.means_, "slope": np.asarray(self.slope_, dtype=np.float64)}
        return meta, tensors

    def _restore(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.k_ = int(meta["k"])
        self.objective_ = meta.get("objective", "")
        self.scores_ = dict(meta.get("scores", {}))
        self.train_X_ = tensors["train_X"]
        self.values_, self.weights_ = tensors["values"], tensors["weights"]
        self.offset_, self.means_, self.slope_ = tensors["offset"], tensors["means"], tensors["slope"]


def _thin_svd(Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD without the numerically negligible directions.

    A tall matrix (n >= 4 d, e.g. 10,000 x 400) goes through the d x d Gram matrix's eigenproblem,
    a fraction of a second where LAPACK's SVD can take tens of seconds on a busy machine; the
    squared condition number is harmless there because directions below 1e-5 of the top singular
    value are dropped. Anything else uses LAPACK's SVD directly.
    """
    n, d = Xc.shape
    if n >= 4 * d:
        evals, V = np.linalg.eigh(Xc.T @ Xc)
        keep = evals > max(float(evals.max()), 1e-300) * 1e-10
        S = np.sqrt(evals[keep])
        V = V[:, keep]
        return (Xc @ V) / S, S, V.T
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    keep = S > (S[0] if S.size else 0.0) * 1e-5
    return U[:, keep], S[keep], Vt[keep]


class TwoWayRidgeEstimator(_TwoWayBase):
    """Ridge regression of double-centred, noise-shrunk interactions; alpha by LOO routing objective."""

    kind = "twoway-ridge"

    def __init__(self, alpha: float | str = "auto", n_alphas: int = 15, trust: str = "pooled",
                 use_counts: bool = True) -> None:
        self.alpha = alpha
        self.trust = trust
        self.n_alphas = n_alphas
        self.use_counts = use_counts

    def _fit(self, X, Y, counts, X_val, Y_val, counts_val) -> None:
        tw, shrunk, _, w = self._decompose(Y, counts)
        n = X.shape[0]
        X = X.astype(np.float64)
        self.x_mean_ = X.mean(axis=0)
        Xc = X - self.x_mean_
        # Targets: the interactions (0 = the candidate's mean where missing) and the prompt level.
        T = np.concatenate([shrunk, tw.offset[:, None]], axis=1)
        self.t_mean_ = T.mean(axis=0)
        Tc = T - self.t_mean_
        U, S, Vt = _thin_svd(Xc)
        UtT = U.T @ Tc
        if self.alpha == "auto":
            top = float(S[0] ** 2) if S.size else 1.0
            alphas = list(np.geomspace(top * 1e-5, top * 3.0, int(self.n_alphas)))
        else:
            if not isinstance(self.alpha, int | float) or self.alpha <= 0:
                raise EstimatorError(f"twoway-ridge alpha must be a positive number or 'auto'; got {self.alpha!r}")
            alphas = [float(self.alpha)]
        loo = []
        for alpha in alphas:
            shrink = S**2 / (S**2 + alpha)
            fitted = U @ (shrink[:, None] * UtT)
            lev = (U**2) @ shrink + 1.0 / n
            loo_c = Tc - (Tc - fitted) / np.maximum(1.0 - lev, 1e-6)[:, None]
            loo.append((loo_c + self.t_mean_)[:, :-1])
        self._select(alphas, loo, tw, Y, w)
        self.alpha_ = float(self.setting_)
        self.coef_ = Vt.T @ ((S / (S**2 + self.alpha_))[:, None] * UtT)  # (d, M + 1)
        self.means_ = tw.means.astype(np.float64)
        log.info("twoway-ridge: alpha=%.3g by %s (n=%d)", self.alpha_, self.objective_, n)

    def _predict(self, X: np.ndarray) -> np.ndarray:
        T = (X.astype(np.float64) - self.x_mean_) @ self.coef_ + self.t_mean_
        g, level = T[:, :-1], T[:, -1]
        return level[:, None] + self.means_[None, :] + self.slope_[None, :] * g

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"alpha": self.alpha_, "objective": self.objective_, "scores": self.scores_}
        tensors = {"coef": self.coef_, "x_mean": self.x_mean_, "t_mean": self.t_mean_, "means": self.means_,
                   "slope": np.asarray(self.slope_, dtype=np.float64)}
        return meta, tensors

    def _restore(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.alpha_ = float(meta["alpha"])
        self.objective_ = meta.get("objective", "")
        self.scores_ = dict(meta.get("scores", {}))
        self.coef_, self.x_mean_, self.t_mean_ = tensors["coef"], tensors["x_mean"], tensors["t_mean"]
        self.means_, self.slope_ = tensors["means"], tensors["slope"]
