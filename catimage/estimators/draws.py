"""What one draw will score: a k-NN estimator of per-draw statistics (`DrawStats`) for new prompts.

A cascade needs, per prompt and candidate, the law of a SINGLE draw's (decision, judge) scores: the
chance that an image passes a threshold and what it is worth when it does or does not
(catimage.policy.cascade). The estimator pools, for a new prompt and each candidate, the seed rows of
the k nearest training prompts that HOLD draws of that candidate (cosine distance on pooled prompt
embeddings, sklearn NearestNeighbors), and shrinks them toward that candidate's draws over all
training prompts by `prior_weight` pseudo-draws::

    P(D >= t) = (#neighbour draws with D >= t + a * P_all(D >= t)) / (#neighbour draws + a)

and the same for the judge's partial sums. Neighbours are sought among a candidate's holders because
served traffic (catimage.tables.served_log) is sparse: a logged prompt holds one candidate's draw,
and the k nearest prompts overall would hold none of a rarely served candidate, leaving only its
global law. On a full table every prompt holds every candidate and the two readings coincide.
Non-parametric, so exact at ANY threshold (the training
draws are kept; thresholds are given at predict time) and robust to the skewed, bounded, often
discrete scores that verifiers and raters give. k and a are chosen inside the training prompts by
exact leave-one-out (each prompt left out of its own neighbours) on the sum of two scores, each
relative to the prior-only prediction: the Brier score of pass events at the thresholds of the
`selection_thresholds` grid, and the squared error of the mean judge score of a draw.

It is NOT in the QualityEstimator registry: its labels are per-draw arrays (n, M, S) of two metrics,
not (n, M) means of one, and it predicts `DrawStats`, not an (n, M) matrix, so it cannot be swapped
for a quality estimator. It keeps the scikit-learn contract (get_params / set_params / clone from
the constructor, fit / predict) and the estimators' save format idea (JSON + safetensors, no pickle)
under its own file names, `draw_estimator.json` / `draw_estimator.safetensors`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.neighbors import NearestNeighbors

from catimage.estimators.base import EstimatorError, check_X
from catimage.policy.cascade import DrawStats

log = logging.getLogger(__name__)

DRAWS_JSON = "draw_estimator.json"
DRAWS_TENSORS = "draw_estimator.safetensors"
FORMAT_VERSION = 1

__all__ = ["DrawEstimator", "default_thresholds", "load_draw_estimator"]


GRID_LEVELS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))


def default_thresholds(decision: np.ndarray, levels: Any = GRID_LEVELS) -> np.ndarray:
    """A threshold grid from quantiles of the (training) draws' decision scores: distinct values only."""
    values = np.asarray(decision, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise EstimatorError("no finite decision scores to place thresholds on")
    grid = np.unique(np.quantile(values, np.asarray(levels, dtype=np.float64), method="inverted_cdf"))
    return grid[grid > values.min()] if (grid > values.min()).any() else grid


class DrawEstimator(BaseEstimator):
    """k-NN over prompt embeddings pooling neighbours' (decision, judge) draws, shrunk to the global law."""

    kind = "draws-knn"
    input_kind = "pooled"

    def __init__(
        self,
        k: int | str = "auto",
        k_grid: tuple[int, ...] = (5, 10, 20, 40, 80),
        prior_weight: float | str = "auto",
        prior_grid: tuple[float, ...] = (1.0, 4.0, 16.0),
    ) -> None:
        self.k = k
        self.k_grid = k_grid
        self.prior_weight = prior_weight
        self.prior_grid = prior_grid

    # --- fit ----------------------------------------------------------------------------------
    def fit(self, X: Any, decision: Any, judge: Any) -> DrawEstimator:
        """Fit on training prompts' pooled embeddings X (n, d) and their draws (n, M, S), NaN = absent."""
        X = check_X(X, "pooled")
        decision, judge = self._check_draws(decision, judge, X.shape[0])
        self._set_data(X, decision, judge)
        self.selection_ = self._select(X)
        log.info("draw estimator: k=%d, prior weight %.3g (leave-one-out over %d training prompts)",
                 self.k_, self.prior_weight_, X.shape[0])
        return self

    def _check_draws(self, decision: Any, judge: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        d, j = np.asarray(decision, dtype=np.float64), np.asarray(judge, dtype=np.float64)
        if d.ndim != 3 or d.shape != j.shape or d.shape[0] != n:
            raise EstimatorError(f"decision {d.shape} and judge {j.shape} must both be ({n}, M, S): one row per prompt of X")
        present = np.isfinite(d) & np.isfinite(j)
        empty = np.flatnonzero(present.sum(axis=(0, 2)) == 0)
        if empty.size:
            raise EstimatorError(f"candidate column(s) {empty.tolist()} have no draws in the training prompts")
        return np.where(present, d, np.nan), np.where(present, j, np.nan)

    def _set_data(self, X: np.ndarray, decision: np.ndarray, judge: np.ndarray) -> None:
        self.train_X_ = np.asarray(X, dtype=np.float32)
        self.decision_ = decision
        self.judge_ = judge
        self.n_features_in_ = int(X.shape[1])
        self.n_candidates_ = int(decision.shape[1])
        self._holders, self._nns = self._index_holders(np.isfinite(decision).any(axis=2))

    def _index_holders(self, has: np.ndarray) -> tuple[list[np.ndarray], list[NearestNeighbors]]:
        """Per candidate, the training prompts holding at least one of its draws, and a neighbour index
        over them (one index shared by the candidates every prompt holds: a full table's case)."""
        shared = None
        holders, nns = [], []
        for m in range(has.shape[1]):
            rows = np.flatnonzero(has[:, m])
            if rows.size == has.shape[0]:
                if shared is None:
                    shared = NearestNeighbors(metric="cosine", algorithm="brute").fit(self.train_X_)
                nns.append(shared)
            else:
                nns.append(NearestNeighbors(metric="cosine", algorithm="brute").fit(self.train_X_[rows]))
            holders.append(rows)
        return holders, nns

    def _neighbours(self, X: np.ndarray, k: int, m: int, exclude_self: bool = False) -> np.ndarray:
        """(n_query, k') training-prompt indices of the k nearest holders of candidate m's draws (k' =
        min(k, holders)); `exclude_self` for the training prompts themselves (leave-one-out)."""
        rows = self._holders[m]
        want = min(k + int(exclude_self), rows.size)
        _, idx = self._nns[m].kneighbors(X, n_neighbors=want)
        idx = rows[idx]
        if not exclude_self:
            return idx
        own = np.arange(X.shape[0])[:, None]
        keep = np.argsort(idx == own, axis=1, kind="stable")[:, : min(k, rows.size - 1 if rows.size > 1 else 1)]
        return np.take_along_axis(idx, keep, axis=1)

    def _neighbour_sums(self, sums: dict[str, np.ndarray], X: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """Sums over each query prompt's k nearest holders, candidate by candidate: (n_query, M[, T])."""
        out = {name: np.empty((X.shape[0], *v.shape[1:])) for name, v in sums.items()}
        for m in range(self.n_candidates_):
            idx = self._neighbours(X, k, m)
            for name, v in sums.items():
                out[name][:, m] = v[idx, m].sum(axis=1)
        return out

    def _sums(self, thresholds: np.ndarray) -> dict[str, np.ndarray]:
        """Per training prompt and candidate: draws, passes and judge sums at `thresholds`."""
        present = np.isfinite(self.decision_)
        d = np.where(present, self.decision_, -np.inf)
        jz = np.where(present, self.judge_, 0.0)
        passed = d[..., None] >= thresholds  # (n, M, S, T)
        return {
            "count": present.sum(axis=2).astype(np.float64),
            "n_pass": passed.sum(axis=2).astype(np.float64),
            "j_pass": (passed * jz[..., None]).sum(axis=2),
            "j_total": jz.sum(axis=2),
            "j_sq": (jz * jz).sum(axis=2),
        }

    def _stats(self, nb: dict[str, np.ndarray], glob: dict[str, np.ndarray], a: float, thresholds: np.ndarray) -> DrawStats:
        """Neighbour sums shrunk toward the global per-draw law by `a` pseudo-draws."""
        per_draw = 1.0 / glob["count"]  # (M,)
        return DrawStats.from_sums(
            [str(i) for i in range(self.n_candidates_)], thresholds,
            nb["count"] + a,
            nb["n_pass"] + a * (glob["n_pass"] * per_draw[:, None])[None],
            nb["j_pass"] + a * (glob["j_pass"] * per_draw[:, None])[None],
            nb["j_total"] + a * (glob["j_total"] * per_draw)[None],
        )

    # --- selection ------------------------------------------------------------------------------
    def _select(self, X: np.ndarray) -> dict[str, Any]:
        n = X.shape[0]
        grid_t = default_thresholds(self.decision_, np.linspace(0.1, 0.9, 9))
        sums = self._sums(grid_t)
        glob = {k: v.sum(axis=0) for k, v in sums.items()}
        ks = [min(int(self.k), n - 1 if n > 1 else 1)] if self.k != "auto" else sorted({min(int(k), max(n - 1, 1)) for k in self.k_grid})
        alphas = [float(self.prior_weight)] if self.prior_weight != "auto" else [float(a) for a in self.prior_grid]
        if self.k != "auto" and self.prior_weight != "auto" or n < 3:
            self.k_, self.prior_weight_ = ks[0], alphas[0]
            return {"k": self.k_, "prior_weight": self.prior_weight_, "scores": {}}
        base = self._loo_score({k: np.zeros_like(v) for k, v in sums.items()}, sums, glob, 1.0, grid_t)
        scores: dict[str, float] = {}
        csum = self._loo_cumulative(X, sums, max(ks))
        for k in ks:
            nb = {name: np.take(v, min(k, v.shape[1]) - 1, axis=1) for name, v in csum.items()}
            for a in alphas:
                scores[f"k={k},a={a:g}"] = _relative_score(self._loo_score(nb, sums, glob, a, grid_t), base)
        best = min(scores, key=scores.get)
        self.k_ = int(best.split(",")[0][2:])
        self.prior_weight_ = float(best.split("a=")[1])
        return {"k": self.k_, "prior_weight": self.prior_weight_, "scores": scores,
                "criterion": "leave-one-out Brier of pass events + judge MSE, each relative to the global law"}

    def _loo_cumulative(self, X: np.ndarray, sums: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        """Running sums over each training prompt's nearest holders (itself left out), per candidate:
        (n, k', M[, T]); a candidate with fewer holders repeats its last running sum."""
        out = {name: np.empty((X.shape[0], k, *v.shape[1:])) for name, v in sums.items()}
        for m in range(self.n_candidates_):
            idx = self._neighbours(X, k, m, exclude_self=True)
            for name, v in sums.items():
                run = np.cumsum(v[idx, m], axis=1)
                out[name][:, : run.shape[1], m] = run
                out[name][:, run.shape[1]:, m] = run[:, -1:]
        return out

    def _loo_score(self, nb, own, glob, a, thresholds) -> np.ndarray:
        """(2,) mean Brier of pass events and mean squared judge error of each prompt's own draws."""
        st = self._stats(nb, glob, a, thresholds)
        cnt = own["count"]
        f = own["n_pass"] / np.maximum(cnt, 1)[..., None]
        brier = (st.p_pass**2 - 2 * st.p_pass * f + f) * cnt[..., None]
        mse = st.q_mean**2 * cnt - 2 * st.q_mean * own["j_total"] + own["j_sq"]
        total = max(float(cnt.sum()), 1.0)
        return np.array([brier.sum() / (total * thresholds.size), mse.sum() / total])

    # --- predict --------------------------------------------------------------------------------
    def predict(self, X: Any, thresholds: Any, candidates: Any = None) -> DrawStats:
        """`DrawStats` of new prompts at `thresholds` (decision units); `candidates` names the columns."""
        if not hasattr(self, "k_"):
            raise EstimatorError("this draw estimator is not fitted: call fit(X, decision, judge) or load one")
        X = check_X(X, "pooled")
        if X.shape[1] != self.n_features_in_:
            raise EstimatorError(f"X has width {X.shape[1]}, the estimator was fitted on {self.n_features_in_}: "
                                 "use the same embedder as at fit time")
        thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        sums = self._sums(thresholds)
        glob = {k: v.sum(axis=0) for k, v in sums.items()}
        nb = self._neighbour_sums(sums, X, self.k_)
        stats = self._stats(nb, glob, self.prior_weight_, thresholds)
        names = tuple(candidates) if candidates is not None else stats.candidates
        if len(names) != self.n_candidates_:
            raise EstimatorError(f"{len(names)} candidate names for {self.n_candidates_} fitted candidates")
        return DrawStats(names, stats.thresholds, stats.p_pass, stats.q_pass, stats.q_fail, stats.q_mean)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        if not hasattr(self, "k_"):
            raise EstimatorError("fit the draw estimator before saving it")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        doc = {"format_version": FORMAT_VERSION, "kind": self.kind,
               "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.get_params().items()},
               "k": self.k_, "prior_weight": self.prior_weight_,
               "selection": {k: v for k, v in self.selection_.items() if k != "scores"},
               "scores": self.selection_.get("scores", {})}
        (directory / DRAWS_JSON).write_text(json.dumps(doc, indent=2))
        save_file({"train_X": np.ascontiguousarray(self.train_X_), "decision": np.ascontiguousarray(self.decision_),
                   "judge": np.ascontiguousarray(self.judge_)}, str(directory / DRAWS_TENSORS))
        return directory


def load_draw_estimator(directory: str | Path) -> DrawEstimator:
    """Read a draw estimator written by `DrawEstimator.save` (JSON + safetensors; no pickle)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not (directory / DRAWS_JSON).is_file() or not (directory / DRAWS_TENSORS).is_file():
        raise EstimatorError(f"{directory} lacks {DRAWS_JSON} / {DRAWS_TENSORS}; pass a directory written by "
                             "DrawEstimator.save")
    doc = json.loads((directory / DRAWS_JSON).read_text())
    if doc.get("format_version") != FORMAT_VERSION or doc.get("kind") != DrawEstimator.kind:
        raise EstimatorError(f"{directory / DRAWS_JSON}: not a draw estimator of format {FORMAT_VERSION}; refit it")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["params"].items()}
    est = DrawEstimator(**params)
    t = load_file(str(directory / DRAWS_TENSORS))
    est._set_data(t["train_X"], t["decision"], t["judge"])
    est.k_, est.prior_weight_ = int(doc["k"]), float(doc["prior_weight"])
    est.selection_ = {**doc.get("selection", {}), "scores": doc.get("scores", {})}
    return est


def _relative_score(score: np.ndarray, base: np.ndarray) -> float:
    """Sum of each part of a leave-one-out score relative to the global law's. A part the global law
    gets exactly right (base 0: e.g. a judge constant across every draw) says nothing about k and is
    left out, rather than turning every candidate score into NaN."""
    return float(np.sum(np.divide(score, base, out=np.zeros_like(score, dtype=np.float64), where=base > 0)))
