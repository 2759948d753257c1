"""Add a generator to a fitted router from a few labelled prompts, without retraining.

A fitted router already knows, for any prompt, every existing candidate's predicted quality, and
(from its training prompts) a set of prompt clusters. A new candidate is described by how its
quality departs from the existing candidates' level:

    q_new(x) = level(x) + c + sum_m w_m g_m(x) + sum_k v_k u_k(x)

where level(x) is the mean predicted quality of the existing candidates (the prompt's difficulty,
as the router sees it), g_m(x) = pred_m(x) - level(x) the existing candidates' predicted
interactions (a new model often behaves like a mix of known ones), and u_k(x) the prompt's soft
membership of training cluster k (its quality profile over prompt clusters). c, w, v are fitted
by ridge regression on the labelled prompts, the penalty chosen by exact leave-one-out (GCV), so
with few labels the new candidate falls back to its mean offset c. Where the new rows also carry
the existing candidates' labels for those prompts, their mean replaces the predicted level in the
fit (less noise).

`fit_added_candidate` fits one; `AddedCandidate.predict_scaled` applies it; the router bundle
stores it beside the base estimator (catimage.model.router_model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from catimage.errors import CatimageError

MEMBERSHIP_TEMPERATURE = 0.05  # cosine similarity units; soft but mostly one or two clusters
_ALPHAS = tuple(float(a) for a in np.geomspace(1e-3, 1e3, 25))


def profile_clusters(X_pooled: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """(K, d) unit centroids of the training prompts' pooled embeddings (k-means on the sphere).

    K defaults to n/50 clipped to [4, 12]: enough clusters to tell prompt kinds apart, few enough
    that 25-100 labelled prompts cover them.
    """
    from sklearn.cluster import KMeans

    X = _unit(X_pooled)
    k = n_clusters or int(np.clip(X.shape[0] // 50, 4, 12))
    k = max(1, min(k, X.shape[0]))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(X)
    return _unit(km.cluster_centers_.astype(np.float32))


def memberships(X_pooled: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, K) soft cluster memberships: softmax of cosine similarity / temperature."""
    sims = _unit(X_pooled) @ centroids.T / MEMBERSHIP_TEMPERATURE
    sims -= sims.max(axis=1, keepdims=True)
    e = np.exp(sims)
    return e / e.sum(axis=1, keepdims=True)


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _design(base_pred: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(level (n,), features (n, M + K)): mean predicted quality and [interactions, memberships]."""
    level = base_pred.mean(axis=1)
    return level, np.concatenate([base_pred - level[:, None], member], axis=1)


@dataclass
class AddedCandidate:
    """A candidate added after fitting: its cost and the ridge coefficients above."""

    name: str
    cost: float
    coef: np.ndarray  # (M_base + K,)
    intercept: float
    alpha: float
    n_labels: int

    def predict_scaled(self, base_pred: np.ndarray, member: np.ndarray) -> np.ndarray:
        """(n,) predicted [0, 1]-scaled quality from the base candidates' scaled predictions."""
        level, F = _design(base_pred, member)
        return np.clip(level + self.intercept + F @ self.coef, 0.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cost": self.cost, "intercept": self.intercept,
                "alpha": self.alpha if np.isfinite(self.alpha) else None,
                "n_labels": self.n_labels}

    @classmethod
    def from_json(cls, doc: dict[str, Any], coef: np.ndarray) -> AddedCandidate:
        return cls(doc["name"], float(doc["cost"]), np.asarray(coef, dtype=np.float64), float(doc["intercept"]),
                   float("inf") if doc["alpha"] is None else float(doc["alpha"]), int(doc["n_labels"]))


def fit_added_candidate(
    name: str,
    cost: float,
    base_pred: np.ndarray,
    member: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    base_labels: np.ndarray | None = None,
    interactions: bool = True,
) -> AddedCandidate:
    """Fit one added candidate from its [0, 1]-scaled labels on n labelled prompts.

    `base_pred` (n, M): the router's scaled predictions of the existing candidates on those prompts;
    `member` (n, K): their cluster memberships; `weights` (n,): sample counts; `base_labels` (n, M):
    the existing candidates' scaled labels there (NaN where unknown) -- rows with all of them use
    their mean as the prompt's level. `interactions=False` fits the mean offset c alone (a baseline).
    """
    labels = np.asarray(labels, dtype=np.float64)
    n = labels.size
    if n < 3:
        raise CatimageError(f"adding {name!r} needs labels on at least 3 prompts; got {n}")
    level, F = _design(base_pred, member)
    if base_labels is not None:
        known = np.isfinite(base_labels).all(axis=1)
        level = np.where(known, np.nanmean(np.where(known[:, None], base_labels, 0.0), axis=1), level)
    target = labels - level
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if not interactions:
        return AddedCandidate(name, float(cost), np.zeros(F.shape[1]), float(np.average(target, weights=w)),
                              float("inf"), n)
    alpha, coef, intercept = ridge_loo(F, target, w)
    return AddedCandidate(name, float(cost), coef, intercept, alpha, n)


def ridge_loo(F: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Weighted ridge with intercept; alpha by exact weighted leave-one-out error."""
    sw = np.sqrt(w / w.mean())
    wn = w / w.sum()
    f_mean, y_mean = wn @ F, float(wn @ y)
    Fc = (F - f_mean) * sw[:, None]
    yc = (y - y_mean) * sw
    U, S, Vt = np.linalg.svd(Fc, full_matrices=False)
    Uty = U.T @ yc
    best = None
    for alpha in _ALPHAS:
        shrink = S**2 / (S**2 + alpha)
        fitted = U @ (shrink * Uty)
        lev = (U**2) @ shrink + wn  # + the intercept's leverage w_i / sum(w)
        loo = (yc - fitted) / np.maximum(1.0 - lev, 1e-6)
        err = float(np.mean(loo**2))
        if best is None or err < best[0] - 1e-15:
            coef = Vt.T @ ((S / (S**2 + alpha)) * Uty)
            best = (err, alpha, coef, y_mean - float(f_mean @ coef))
    _, alpha, coef, intercept = best
    return float(alpha), coef, float(intercept)


def add_from_table(model: Any, table: Any, pool: Any = None, metric: str | None = None,
                   names: list[str] | None = None) -> list[AddedCandidate]:
    """Add every candidate of `table` (a quality table) that `model` does not know yet.

    Its cost comes from the pool file, else from the table's measured `cost` column. Rows of the
    model's own candidates for the same prompts, when present, give the prompts' level (see
    `fit_added_candidate`). Returns the added candidates (the model is changed in place).
    """
    from catimage.tables.pool import MEASURED_COST_UNIT
    from catimage.tables.table import aggregate, metric_columns, validate_table

    table = validate_table(table, "new rows")
    metric = metric or model.metric
    if metric not in metric_columns(table):
        raise CatimageError(f"the new rows have no {metric!r} column (the router's metric); they have "
                            f"{metric_columns(table)}")
    present = list(dict.fromkeys(table.column("candidate").to_pylist()))
    new = [c for c in present if c not in model.candidates]
    if names:
        missing = [n for n in names if n not in present]
        if missing:
            raise CatimageError(f"candidate(s) {missing} have no rows in the new table (it has {present})")
        new = [n for n in new if n in names]
    if not new:
        raise CatimageError(f"the new rows hold no candidate the router lacks (router: {model.candidates}; rows: {present})")
    matrix = aggregate(table, metric=metric, candidates=present)
    measured = matrix.measured_costs()
    base_cols = [matrix.candidates.index(c) if c in matrix.candidates else -1 for c in model.base_candidates]
    base_labels = np.stack([matrix.mean[:, j] if j >= 0 else np.full(matrix.n_prompts, np.nan) for j in base_cols], 1)
    added = []
    if pool is not None:
        pool.require_unit(model.cost_unit, "the router")
    for name in new:
        if pool is not None and name in pool.names and pool.get(name).cost is not None:
            cost = float(pool.get(name).cost)
        elif name in measured and model.cost_unit == MEASURED_COST_UNIT:  # the table's cost column is seconds
            cost = measured[name]
        else:
            raise CatimageError(
                f"no cost for {name!r} in {model.cost_unit} (the router's unit): declare `cost:` in the pool file"
                + (" or give the rows a `cost` column" if model.cost_unit == MEASURED_COST_UNIT else
                   f" (the table's measured seconds cannot stand in for {model.cost_unit})")
            )
        j = matrix.candidates.index(name)
        rows = np.flatnonzero(np.isfinite(matrix.mean[:, j]))
        added.append(model.add_candidate(
            name, cost, [matrix.prompts[i] for i in rows], matrix.mean[rows, j],
            counts=matrix.count[rows, j].astype(np.float64), base_labels=base_labels[rows],
        ))
    return added
