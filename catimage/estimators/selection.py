"""Choosing hyper-parameters by what routing needs, not by label MSE.

The router sends a prompt to argmax_m pred_m(x) - lam * c_m. Any per-prompt offset added to every
candidate's prediction changes no decision, so most of the label variance (how hard a prompt is)
is irrelevant to the router; what matters is each candidate's mean and the prompt x candidate
interaction. This module holds the pieces every decision-focused estimator shares:

* `two_way` -- the explicit decomposition y[i, m] = a_i + b_m + r[i, m] of a label matrix with
  missing cells (count-weighted), and `noise_shrinkage`: empirical-Bayes shrinkage of each cell's
  interaction toward 0 (its candidate's mean) using sample counts and per-cell variances;
* the selection objective is `catimage.policy.routing.area_over_hull` (the evaluation's own area
  figure), computed on out-of-sample predictions and the (noisy) training labels. Label noise is
  independent of out-of-sample predictions, so the score is unbiased for comparing settings;
* `calibration_slope` -- the cross-validated least-squares slope of labels on out-of-sample
  interaction predictions: how far to trust them relative to the candidate means (James-Stein-like
  shrinkage that needs no noise variance, so it works with one sample per cell);
* `size_grid` / `kfold` -- grids that scale with the table and fold assignment for inner CV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TwoWay:
    """y = offset[:, None] + means[None, :] + resid (NaN where y is missing)."""

    offset: np.ndarray  # (n,) per-prompt level a_i
    means: np.ndarray  # (M,) per-candidate level b_m
    resid: np.ndarray  # (n, M) interaction r, NaN where missing


def two_way(Y: np.ndarray, w: np.ndarray, iterations: int = 3) -> TwoWay:
    """Weighted two-way decomposition of a matrix with missing cells (w = 0 there).

    A few rounds of alternating weighted means (exact in one round for a complete matrix).
    A prompt with a single label gets r = 0 there: one label says nothing about the interaction.
    """
    y = np.nan_to_num(Y)
    w = np.where(np.isfinite(Y), w, 0.0)
    offset = np.zeros(Y.shape[0])
    col_w = np.maximum(w.sum(axis=0), 1e-12)
    row_w = w.sum(axis=1)
    means = (w * y).sum(axis=0) / col_w
    for it in range(iterations):
        offset = np.where(row_w > 0, (w * (y - means[None, :])).sum(axis=1) / np.maximum(row_w, 1e-12), 0.0)
        if it < iterations - 1:  # end on an offset update: a one-label row then has r = 0 exactly
            means = (w * (y - offset[:, None])).sum(axis=0) / col_w
    resid = np.where(w > 0, y - offset[:, None] - means[None, :], np.nan)
    return TwoWay(offset, means, resid)


def noise_shrinkage(
    resid: np.ndarray, counts: np.ndarray, var: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Empirical-Bayes shrinkage of each cell's interaction toward its candidate's mean.

    Per candidate m: noise variance sigma2_m pooled from the cells' sample variances (cells with
    >= 2 samples), true-interaction variance tau2_m = var(r) - mean(sigma2_m / n) (moment
    estimate, floored). A cell's interaction shrinks by tau2 / (tau2 + sigma2 / n) and weighs
    1 / (tau2 + sigma2 / n) in any average. Without per-cell variances (one sample per cell)
    every cell shrinks alike: return r unchanged and unit weights (the global trust level is then
    set by the cross-validated `calibration_slope`).
    """
    have = np.isfinite(resid) & (counts > 0)
    shrunk = np.where(have, resid, 0.0)
    weights = have.astype(np.float64)
    info: dict[str, list[float]] = {"sigma2": [], "tau2": []}
    if var is None:
        return shrunk, weights * np.maximum(counts, 0), info
    for m in range(resid.shape[1]):
        cells = have[:, m]
        vm = var[:, m]
        ok = cells & np.isfinite(vm) & (counts[:, m] >= 2)
        if ok.sum() < 5:
            weights[:, m] = np.where(cells, counts[:, m], 0.0)
            info["sigma2"].append(float("nan"))
            info["tau2"].append(float("nan"))
            continue
        dof = counts[ok, m] - 1.0
        sigma2 = float((dof * vm[ok]).sum() / dof.sum())
        n = np.maximum(counts[cells, m], 1.0)
        r = resid[cells, m]
        tau2 = max(float(np.mean(r**2) - np.mean(sigma2 / n)), 0.05 * float(np.mean(r**2)), 1e-12)
        noise = sigma2 / np.maximum(counts[:, m], 1.0)
        shrunk[:, m] = np.where(cells, shrunk[:, m] * tau2 / (tau2 + noise), 0.0)
        weights[:, m] = np.where(cells, 1.0 / (tau2 + noise), 0.0)
        weights[:, m] /= weights[cells, m].mean()
        info["sigma2"].append(sigma2)
        info["tau2"].append(tau2)
    return shrunk, weights, info


def calibration_slope(
    target: np.ndarray, pred: np.ndarray, w: np.ndarray, low: float = 0.0, high: float = 2.0
) -> np.ndarray:
    """(M,) per-candidate slope of out-of-sample interaction labels on predictions, clipped.

    The MSE-optimal multiplier for predictions made without the row's own label: shrinks noisy
    smoothers toward the candidate mean (slope < 1) and stretches over-smoothed ones (> 1).
    """
    w = np.where(np.isfinite(target), w, 0.0)
    t = np.nan_to_num(target)
    num = (w * t * pred).sum(axis=0)
    den = (w * pred * pred).sum(axis=0)
    slope = np.where(den > 1e-15, num / np.maximum(den, 1e-15), 0.0)
    return np.clip(slope, low, high)


def size_grid(n: int, low: int = 5, points: int = 12, top_fraction: float = 0.5) -> list[int]:
    """Neighbourhood sizes from `low` to `top_fraction` of the table, geometrically spaced.

    Grids that scale with the table: on 400 prompts k tops out at 200, on 9,000 at 4,500.
    """
    top = max(min(int(n * top_fraction), n - 1), 1)
    low = min(low, top)
    return sorted({round(k) for k in np.geomspace(low, top, points)})


def kfold(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """(n,) fold index of each row, balanced and shuffled."""
    folds = max(2, min(int(folds), n))
    return np.random.default_rng(seed).permutation(np.arange(n) % folds)
