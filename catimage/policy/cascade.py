"""Cost-aware cascades on arrays: per-draw statistics, the plan set, each plan's expected value and cost.

A plan (catimage.policy.plans) draws attempts a_1..a_K in order, each with a fresh seed, scores each
image with the decision metric D, accepts the first with D >= t, and after the last attempt returns
the best-scoring image drawn. What it earns is read on the judge J. Per prompt, a policy picks the
plan maximising ``value - lam * cost`` (ties to the cheaper plan: `catimage.policy.routing.route`,
the same rule and the same lambda sweep / calibration as routing, with per-prompt costs).

Per-draw statistics (`DrawStats`, predicted per prompt by catimage.estimators.draws), for every
candidate m and every threshold t of a grid t_0 < ... < t_{T-1}::

    p_pass[i, m, k] = P(D >= t_k)          q_pass[i, m, k] = E[J | D >= t_k]
    q_fail[i, m, k] = E[J | D <  t_k]      q_mean[i, m]    = E[J]

The grid cuts D into T + 1 bins (bin 0: D < t_0; bin b: t_{b-1} <= D < t_b; bin T: D >= t_{T-1});
`DrawStats.bins` gives each bin's probability pi and partial judge expectation e = E[J; D in bin].

Expected value and cost of a plan (attempts a_1..a_K, threshold t_k or None), draws independent
across attempts (fresh seeds), P_j = p_pass[a_j, k] (0 when the threshold is None)::

    reach_j = prod_{l<j} (1 - P_l)                        (attempt j is drawn)
    cost    = sum_j reach_j * (c_{a_j} + s)               (s = scorer cost; 0 for the unscored route plan)
    value   = sum_j reach_j * P_j * q_pass[a_j, k]  +  E[J_returned ; every draw fails]

EXACT under independence of fresh-seed draws: cost, and every term but the last (the accepted
branch). APPROXIMATED: the all-fail return, "the best-scoring of the failed draws". It needs the
joint law of every failed draw's D and J, and the statistics keep D only at the grid's resolution.
We compute it as if, inside one bin, (a) a draw's judge score did not depend on where in the bin its
decision score lies (J | D in bin has mean e / pi) and (b) the draws falling in the same bin were
equally likely to be the highest (their positions in the bin exchangeable, as i.i.d. continuous
positions make them). Then, failed region = bins 0..k (all bins when the threshold is None), with
F_l[b] = P(D_l in a bin below b)::

    E[J_ret ; all fail] = sum_{b <= k} sum_j e_{a_j}[b] * integral_0^1 prod_{l != j} (F_{a_l}[b] + u * pi_{a_l}[b]) du

(the integral sums, over which other draws share draw j's bin, the chance that every other draw is
lower and j is the top one of its bin). The integrand is a polynomial of degree K - 1 in u, so
Gauss-Legendre with K // 2 + 1 nodes integrates it exactly. The approximation becomes exact as the
grid gets finer (each bin holding one decision value); a one-attempt plan is exact (value = q_mean).
The offline evaluation (catimage.evaluation.cascade) never uses this formula: it simulates every
plan on the test prompts' own seed rows.

`enumerate_plans` lists every plan up to K attempts (the route plans first); `plan_values` scores
them all per prompt in vectorised numpy (the all-fail term is computed once per MULTISET of
attempts, since it does not depend on their order, and once per grid bin, then summed over the
failed bins of each threshold). 7 candidates x K = 4 x 6 thresholds is ~17,000 plans: a second or
two on 200 prompts. The sweep over lambda (catimage.policy.routing) first drops, per prompt, the plans
that another plan beats on both value and cost, so it stays as fast as routing's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.policy.plans import Plan
from catimage.policy.routing import route

__all__ = [
    "DrawStats",
    "PlanArrays",
    "choose_plans",
    "encode_plans",
    "enumerate_plans",
    "plan_values",
]

_THRESHOLD_ATOL = 1e-9


@dataclass(frozen=True)
class DrawStats:
    """Predicted per-draw statistics of every candidate on n prompts at a grid of T thresholds.

    Units: thresholds in the decision metric's units; q_* in the judge's units. `q_pass` where
    `p_pass` is 0 and `q_fail` where it is 1 are never used (they are set to q_mean).
    """

    candidates: tuple[str, ...]
    thresholds: np.ndarray  # (T,) strictly increasing
    p_pass: np.ndarray  # (n, M, T)
    q_pass: np.ndarray  # (n, M, T)
    q_fail: np.ndarray  # (n, M, T)
    q_mean: np.ndarray  # (n, M)

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        t = np.asarray(self.thresholds, dtype=np.float64).reshape(-1)
        if t.size == 0 or not np.isfinite(t).all() or (t.size > 1 and (np.diff(t) <= 0).any()):
            raise CatimageError(f"thresholds must be finite and strictly increasing, got {t.tolist()}")
        object.__setattr__(self, "thresholds", t)
        n, m = np.shape(self.q_mean)
        if m != len(self.candidates):
            raise CatimageError(f"q_mean has {m} candidate columns for {len(self.candidates)} candidates")
        for name in ("p_pass", "q_pass", "q_fail"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != (n, m, t.size):
                raise CatimageError(f"{name} has shape {arr.shape}, expected {(n, m, t.size)}")
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "q_mean", np.asarray(self.q_mean, dtype=np.float64))
        if not all(np.isfinite(getattr(self, k)).all() for k in ("p_pass", "q_pass", "q_fail", "q_mean")):
            raise CatimageError("draw statistics must be finite (no NaN): predict them for every candidate")

    @property
    def n_prompts(self) -> int:
        return int(self.q_mean.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray) -> DrawStats:
        idx = np.asarray(idx, dtype=np.int64)
        return DrawStats(self.candidates, self.thresholds, self.p_pass[idx], self.q_pass[idx], self.q_fail[idx],
                         self.q_mean[idx])

    def bins(self) -> tuple[np.ndarray, np.ndarray]:
        """(pi, e), each (n, M, T + 1): probability of each decision bin and E[J; D in bin]."""
        p = np.clip(self.p_pass, 0.0, 1.0)
        e_pass = p * self.q_pass
        one = np.ones(p.shape[:2] + (1,))
        upper_p = np.concatenate([one, p], axis=2)  # P(D >= t_{b-1}), with t_{-1} = -inf
        lower_p = np.concatenate([p, 0 * one], axis=2)
        upper_e = np.concatenate([self.q_mean[:, :, None], e_pass], axis=2)
        lower_e = np.concatenate([e_pass, 0 * one], axis=2)
        return np.maximum(upper_p - lower_p, 0.0), upper_e - lower_e

    def with_means(self, q_mean: Any) -> DrawStats:
        """The same per-draw shape around other mean predictions: q_pass and q_fail move by each
        (prompt, candidate)'s change of mean, so q_mean = p q_pass + (1 - p) q_fail still holds.
        Used to put a better mean predictor (the router's) under the draw estimator's pass laws."""
        q_mean = np.asarray(q_mean, dtype=np.float64)
        if q_mean.shape != self.q_mean.shape:
            raise CatimageError(f"means of shape {q_mean.shape} for statistics of shape {self.q_mean.shape}")
        delta = (q_mean - self.q_mean)[:, :, None]
        return DrawStats(self.candidates, self.thresholds, self.p_pass, self.q_pass + delta, self.q_fail + delta, q_mean)

    @classmethod
    def from_sums(
        cls, candidates: Sequence[str], thresholds: Any, count: np.ndarray, n_pass: np.ndarray,
        j_pass: np.ndarray, j_total: np.ndarray,
    ) -> DrawStats:
        """Statistics from (possibly weighted) sums over draws: `count` (n, M) draws, `n_pass`
        (n, M, T) draws with D >= t, `j_pass` (n, M, T) their judge sum, `j_total` (n, M) judge sum."""
        count = np.asarray(count, dtype=np.float64)
        if (count <= 0).any():
            raise CatimageError("every (prompt, candidate) needs at least one draw (or prior weight) behind it")
        q_mean = j_total / count
        p = n_pass / count[:, :, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            q_pass = np.where(n_pass > 0, j_pass / n_pass, q_mean[:, :, None])
            n_fail = count[:, :, None] - n_pass
            q_fail = np.where(n_fail > 1e-12, (j_total[:, :, None] - j_pass) / n_fail, q_mean[:, :, None])
        return cls(tuple(candidates), np.asarray(thresholds, dtype=np.float64), p, q_pass, q_fail, q_mean)

    @classmethod
    def from_samples(cls, candidates: Sequence[str], decision: Any, judge: Any, thresholds: Any) -> DrawStats:
        """Empirical statistics of each (prompt, candidate)'s own draws (n, M, S), NaN = absent."""
        d, j = np.asarray(decision, dtype=np.float64), np.asarray(judge, dtype=np.float64)
        if d.shape != j.shape or d.ndim != 3:
            raise CatimageError(f"decision {d.shape} and judge {j.shape} must both be (n, M, S)")
        t = np.asarray(thresholds, dtype=np.float64)
        present = np.isfinite(d) & np.isfinite(j)
        passed = present[..., None] & (np.nan_to_num(d, nan=-np.inf)[..., None] >= t)  # (n, M, S, T)
        jz = np.where(present, j, 0.0)
        return cls.from_sums(candidates, t, present.sum(axis=2), passed.sum(axis=2),
                             (passed * jz[..., None]).sum(axis=2), jz.sum(axis=2))


# --- the plan set -------------------------------------------------------------------------------


def enumerate_plans(
    candidates: Sequence[str], max_attempts: int, thresholds: Sequence[float | None], distinct: bool = False,
) -> list[Plan]:
    """Every plan of up to `max_attempts` attempts: the route plans (one per candidate) first, then
    for k = 2..K every ordered sequence of k candidates (with repeats; `distinct=True`: each
    candidate at most once, for tables with one sample per cell) at every threshold. A `None` in
    `thresholds` adds the best-of-k plans (no early acceptance). One-attempt plans with a threshold
    are left out: they score an image and return it whatever the score (the route plan, dearer).
    """
    candidates = list(candidates)
    if not candidates:
        raise CatimageError("no candidates to make plans of")
    if int(max_attempts) < 1:
        raise CatimageError(f"max_attempts must be >= 1, got {max_attempts}")
    plans = [Plan.route(c) for c in candidates]
    for k in range(2, int(max_attempts) + 1):
        seqs = itertools.permutations(candidates, k) if distinct else itertools.product(candidates, repeat=k)
        for seq in seqs:
            plans.extend(Plan(tuple(seq), t) for t in thresholds)
    return plans


@dataclass(frozen=True)
class PlanArrays:
    """Plans as index arrays against a candidate list and a threshold grid.

    `attempts` (P, K) candidate indices (-1 past a plan's end), `length` (P,), `threshold` (P,)
    index into the grid, T (= the grid's size) for None, `scored` (P,) bool.
    """

    attempts: np.ndarray
    length: np.ndarray
    threshold: np.ndarray
    scored: np.ndarray


def encode_plans(plans: Sequence[Plan], candidates: Sequence[str], thresholds: Any) -> PlanArrays:
    """Index arrays of `plans`; every plan threshold must be on the grid `thresholds`."""
    index = {c: j for j, c in enumerate(candidates)}
    grid = np.asarray(thresholds, dtype=np.float64)
    if not plans:
        raise CatimageError("no plans given")
    k_max = max(len(p.attempts) for p in plans)
    att = np.full((len(plans), k_max), -1, dtype=np.int64)
    tix = np.full(len(plans), grid.size, dtype=np.int64)
    for i, plan in enumerate(plans):
        unknown = [a for a in plan.attempts if a not in index]
        if unknown:
            raise CatimageError(f"plan {plan.label()!r} names candidate(s) {unknown} outside {list(candidates)}")
        att[i, : len(plan.attempts)] = [index[a] for a in plan.attempts]
        if plan.threshold is not None:
            hit = np.flatnonzero(np.abs(grid - plan.threshold) <= _THRESHOLD_ATOL * max(1.0, abs(plan.threshold)))
            if hit.size == 0:
                raise CatimageError(
                    f"plan threshold {plan.threshold:g} is not on the statistics' grid {grid.tolist()}; "
                    "predict the draw statistics at the plans' thresholds"
                )
            tix[i] = int(hit[0])
    length = np.array([len(p.attempts) for p in plans], dtype=np.int64)
    scored = np.array([p.scored for p in plans], dtype=bool)
    return PlanArrays(att, length, tix, scored)


# --- expected value and cost --------------------------------------------------------------------


def plan_values(stats: DrawStats, plans: Sequence[Plan], costs: Any, score_cost: float) -> tuple[np.ndarray, np.ndarray]:
    """(value, cost), each (n, P): expected judge quality and expected cost of every plan per prompt.

    `costs` (M,): the candidates' costs in `stats.candidates` order; `score_cost`: the decision
    scorer's cost per image (same unit). See the module docstring for what is exact.
    """
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (len(stats.candidates),):
        raise CatimageError(f"{len(stats.candidates)} candidates but costs of shape {costs.shape}")
    if not np.isfinite(score_cost) or score_cost < 0:
        raise CatimageError(f"the decision scorer's cost must be a number >= 0, got {score_cost}")
    arrays = encode_plans(plans, stats.candidates, stats.thresholds)
    n, n_plans = stats.n_prompts, len(plans)
    value, cost = np.zeros((n, n_plans)), np.zeros((n, n_plans))
    zeros = np.zeros(stats.p_pass.shape[:2] + (1,))
    p_ext = np.concatenate([np.clip(stats.p_pass, 0.0, 1.0), zeros], axis=2)  # index T: never accepted
    e_ext = np.concatenate([p_ext[:, :, :-1] * stats.q_pass, zeros], axis=2)
    fail = _all_fail_terms(stats, arrays)
    per_image = np.where(arrays.scored, float(score_cost), 0.0)
    for k in np.unique(arrays.length):
        g = np.flatnonzero(arrays.length == k)
        tix = arrays.threshold[g]
        reach = np.ones((n, g.size))
        for j in range(int(k)):
            a = arrays.attempts[g, j]
            value[:, g] += reach * e_ext[:, a, tix]
            cost[:, g] += reach * (costs[a] + per_image[g])[None, :]
            reach = reach * (1.0 - p_ext[:, a, tix])
        value[:, g] += fail[:, g]
    return value, cost


def _all_fail_terms(stats: DrawStats, arrays: PlanArrays) -> np.ndarray:
    """(n, P): E[J of the best-scoring failed draw; every draw fails] (the approximated term)."""
    pi, e = stats.bins()
    below = np.cumsum(pi, axis=2) - pi  # P(D in a bin below b)
    n, n_bins = pi.shape[0], pi.shape[2]
    out = np.zeros((n, arrays.attempts.shape[0]))
    for k in np.unique(arrays.length):
        g = np.flatnonzero(arrays.length == k)
        sets, which = np.unique(np.sort(arrays.attempts[g, : int(k)], axis=1), axis=0, return_inverse=True)
        nodes, weights = np.polynomial.legendre.leggauss(int(k) // 2 + 1)
        nodes, weights = (nodes + 1.0) / 2.0, weights / 2.0
        F, P, E = below[:, sets, :], pi[:, sets, :], e[:, sets, :]  # (n, U, k, B)
        term = np.zeros((n, sets.shape[0], n_bins))
        for u, w in zip(nodes, weights):
            term += w * (E * _leave_one_out_product(F + u * P, axis=2)).sum(axis=2)
        cum = np.cumsum(term, axis=2)  # failed region of threshold index t: bins 0..t
        out[:, g] = cum[:, which.reshape(-1), arrays.threshold[g]]
    return out


def _leave_one_out_product(x: np.ndarray, axis: int) -> np.ndarray:
    """prod over `axis` of every element but the one at each position (no division: zeros are fine)."""
    x = np.moveaxis(x, axis, -1)
    ones = np.ones(x.shape[:-1] + (1,))
    before = np.cumprod(np.concatenate([ones, x[..., :-1]], axis=-1), axis=-1)
    after = np.flip(np.cumprod(np.flip(np.concatenate([x[..., 1:], ones], axis=-1), -1), axis=-1), -1)
    return np.moveaxis(before * after, -1, axis)


def choose_plans(value: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """Per prompt, the plan index maximising value - lam * cost (ties to the cheaper plan, then the
    lower index): `catimage.policy.routing.route` with per-prompt costs, the one rule."""
    return route(value, cost, lam)
