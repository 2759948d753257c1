"""Estimators chosen by inner cross-validation on the routing objective: ``ensemble`` and ``auto``.

Both split the training prompts into `folds` folds and get every member's out-of-fold (OOF)
predictions (each member runs its own hyper-parameter selection inside the fold's training part,
so the OOF predictions are honest). Then:

* ``ensemble`` averages members chosen by greedy forward selection with replacement (Caruana et
  al. 2004) on the OOF routing score: start from the best member, add whichever member raises the
  score of the average most, stop when nothing does. Averaging predictions is linear, so the
  per-prompt offsets that the decision ignores stay irrelevant.
* ``auto`` compares every member alone and that ensemble, and keeps the best. The ensemble's score
  is itself cross-fitted (weights chosen on the other folds' OOF rows, scored on this fold's), so it
  does not win merely because it was selected on the rows it is scored on.

The chosen model is then refitted on all training prompts. `explanation_` says, in words, what was
picked and each option's inner-CV score ("why"). Without costs, the objective is interaction MSE.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from catimage.estimators.base import EstimatorError, QualityEstimator, label_weights
from catimage.estimators.selection import kfold, two_way
from catimage.estimators.single import make_single_estimator, single_estimator_class
from catimage.policy.routing import area_over_hull

log = logging.getLogger(__name__)

# The paper's knn and the two decision-focused estimators: cheap enough to cross-validate on 10,000
# prompts. (`linear` is the per-candidate ridge baseline that twoway-ridge supersedes; the transformer
# takes per-token input and is a named option of its own.)
DEFAULT_MEMBERS: tuple[str, ...] = ("twoway-knn", "twoway-ridge", "knn")


def _make_member(name: str, params: dict[str, Any] | None) -> QualityEstimator:
    return make_single_estimator(name, **(params or {}))


def _score(pred: np.ndarray, Y: np.ndarray, costs: np.ndarray | None, w: np.ndarray) -> float:
    if costs is not None:
        return area_over_hull(pred, Y, costs)
    resid = two_way(Y, w).resid
    g = pred - pred.mean(axis=1, keepdims=True)
    g = g - g.mean(axis=0)
    have = np.isfinite(resid)
    return -float((w * np.where(have, (np.nan_to_num(resid) - g) ** 2, 0.0)).sum() / max(w[have].sum(), 1e-12))


def greedy_weights(preds: dict[str, np.ndarray], rows: np.ndarray, Y: np.ndarray, costs: np.ndarray | None,
                   w: np.ndarray, rounds: int) -> Counter:
    """Forward selection with replacement of members whose average maximises the score on `rows`."""
    names = list(preds)
    scores = {n: _score(preds[n][rows], Y[rows], costs, w[rows]) for n in names}
    first = max(names, key=lambda n: (scores[n], -names.index(n)))
    chosen = Counter({first: 1})
    total = preds[first][rows].copy()
    best = scores[first]
    for _ in range(max(rounds - 1, 0)):
        k = sum(chosen.values())
        trial = {n: _score((total + preds[n][rows]) / (k + 1), Y[rows], costs, w[rows]) for n in names}
        name = max(names, key=lambda n: (trial[n], -names.index(n)))
        if trial[name] <= best + 1e-12:
            break
        chosen[name] += 1
        total += preds[name][rows]
        best = trial[name]
    return chosen


def _average(preds: dict[str, np.ndarray], weights: Counter) -> np.ndarray:
    total = sum(weights.values())
    return sum(preds[n] * c for n, c in weights.items()) / total


class EnsembleEstimator(QualityEstimator):
    """Average of members chosen greedily on out-of-fold routing scores (see the module docstring)."""

    kind = "ensemble"
    input_kind = "pooled"
    _pick_best_single = False

    def __init__(
        self,
        members: Sequence[str] = DEFAULT_MEMBERS,
        member_params: dict[str, dict[str, Any]] | None = None,
        folds: int | str = "auto",
        rounds: int = 8,
        random_state: int = 0,
    ) -> None:
        self.members = members
        self.member_params = member_params
        self.folds = folds
        self.rounds = rounds
        self.random_state = random_state

    def _member_list(self) -> list[str]:
        names = list(dict.fromkeys(self.members))
        if not names:
            raise EstimatorError(f"{self.kind} needs at least one member estimator")
        kinds = {_make_member(n, (self.member_params or {}).get(n)).input_kind for n in names}
        if kinds != {"pooled"}:
            raise EstimatorError(
                f"{self.kind} members must all take pooled embeddings; {names} mix {sorted(kinds)} "
                "(the transformer is a named option of its own)"
            )
        return names

    def _fit(self, X, Y, counts, X_val, Y_val, counts_val) -> None:
        names = self._member_list()
        costs, var = self._fit_costs, self._fit_var
        n = X.shape[0]
        self.folds_ = (5 if n < 2000 else 3) if self.folds == "auto" else int(self.folds)
        folds = kfold(n, self.folds_, self.random_state)
        w = label_weights(Y, counts)
        oof = {name: np.full(Y.shape, np.nan) for name in names}
        for f in range(int(folds.max()) + 1):
            tr, te = folds != f, folds == f
            for name in names:
                est = _make_member(name, (self.member_params or {}).get(name))
                est.fit(X[tr], Y[tr], None if counts is None else counts[tr],
                        costs=costs, var=None if var is None else var[tr])
                oof[name][te] = est.predict(X[te])
            log.info("%s: fold %d/%d done", self.kind, f + 1, int(folds.max()) + 1)
        all_rows = np.arange(n)
        self.cv_scores_ = {name: _score(oof[name], Y, costs, w) for name in names}
        # Cross-fitted ensemble: weights from the other folds' OOF rows, applied to this fold's rows.
        ens_oof = np.full(Y.shape, np.nan)
        for f in range(int(folds.max()) + 1):
            weights = greedy_weights(oof, np.flatnonzero(folds != f), Y, costs, w, int(self.rounds))
            ens_oof[folds == f] = _average(oof, weights)[folds == f]
        self.cv_scores_["ensemble"] = _score(ens_oof, Y, costs, w)
        weights = greedy_weights(oof, all_rows, Y, costs, w, int(self.rounds))
        if self._pick_best_single:
            options = [*names, "ensemble"]
            pick = max(options, key=lambda o: (self.cv_scores_[o], -options.index(o)))
            if pick != "ensemble":
                weights = Counter({pick: 1})
        self.choice_ = dict(weights)
        self.fitted_members_ = []
        for name, count in weights.items():
            est = _make_member(name, (self.member_params or {}).get(name))
            est.fit(X, Y, counts, costs=costs, var=var)
            self.fitted_members_.append((name, float(count), est))
        self.objective_ = "routing area over hull" if costs is not None else "interaction MSE"
        self.explanation_ = self._explain()
        log.info("%s", self.explanation_)

    def _label(self) -> str:
        if len(self.choice_) == 1:
            return next(iter(self.choice_))
        return "ensemble of " + " + ".join(f"{n} x{int(c)}" for n, c in self.choice_.items())

    def _explain(self) -> str:
        ranked = sorted(self.cv_scores_.items(), key=lambda kv: -kv[1])
        listed = ", ".join(f"{k} {v:+.4f}" for k, v in ranked)
        return (f"{self.kind} picked {self._label()}: inner {self.folds_}-fold CV {self.objective_} on the "
                f"training prompts ([0, 1]-scaled units; higher is better): {listed}")

    def _predict(self, X: np.ndarray) -> np.ndarray:
        total = sum(c for _, c, _ in self.fitted_members_)
        return sum(c * est.predict(X) for _, c, est in self.fitted_members_) / total

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        members, tensors = [], {}
        for i, (name, count, est) in enumerate(self.fitted_members_):
            meta, arrays = est._state()
            members.append({"kind": name, "count": count, "params": est.get_params(), "meta": meta,
                            "shapes": {"n_features_in": est.n_features_in_, "n_candidates": est.n_candidates_}})
            tensors.update({f"m{i}.{k}": v for k, v in arrays.items()})
        meta = {"members": members, "cv_scores": self.cv_scores_, "choice": self.choice_, "folds": self.folds_,
                "objective": self.objective_, "explanation": self.explanation_}
        return meta, tensors

    def _restore(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.fitted_members_ = []
        for i, doc in enumerate(meta["members"]):
            prefix = f"m{i}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            est = single_estimator_class(doc["kind"])._from_saved(doc, sub)
            self.fitted_members_.append((doc["kind"], float(doc["count"]), est))
        self.cv_scores_ = dict(meta.get("cv_scores", {}))
        self.folds_ = meta.get("folds", self.folds)
        self.choice_ = dict(meta.get("choice", {}))
        self.objective_ = meta.get("objective", "")
        self.explanation_ = meta.get("explanation", "")


class AutoEstimator(EnsembleEstimator):
    """The best of each member alone and their greedy ensemble, by inner-CV routing score."""

    kind = "auto"
    _pick_best_single = True
