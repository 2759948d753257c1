"""The routing rule, lambda calibration, the exact deferral curve and the prompt-agnostic hull.

Everything here is pure numpy and works in the metric's own units (predictions, labels) and the
pool's cost unit. The router sends prompt i to

    r_i(lambda) = argmax_m  pred[i, m] - lambda * cost[m]          (exact ties -> cheaper, then lower index)

Geometry used throughout: for one prompt, the candidates are points (cost_m, pred_m). The routed
choice at lambda is the point of the upper concave hull of those points supported by a line of
slope lambda. As lambda grows from 0 the choice walks left along the hull, from the best predicted
candidate to the cheapest one, switching exactly at the hull's edge slopes
(pred_a - pred_b) / (cost_a - cost_b). So each prompt's routed cost is a non-increasing step
function of lambda, the average routed cost too, and the union of all prompts' edge slopes is the
complete set of lambdas at which anything changes: the deferral curve evaluated there is exact, not
a grid approximation.

Per-prompt costs: every function here that takes `costs` accepts either one cost per candidate
(M,) or one per prompt and option (n, M). The second is what a cascade needs (catimage.policy.cascade:
the options are plans, whose expected costs differ per prompt); routing is its special case, and
route and cascade share this one rule, sweep and calibration. With (n, M) costs the sweep first
keeps, per prompt, only the options no other option beats on both prediction and cost (dropping the
rest changes no choice at any lambda: a dropped option loses every tie by the tie rule), so thousands
of plans sweep as fast as a handful of candidates. `deferral_curve_arrays` can also REPORT a cost
other than the one decided on (`realized_cost`): a cascade decides on expected plan costs and is
judged on what each plan really spent.

Curve semantics (used consistently by `interpolate_curve`, `cost_to_reach` and catimage.evaluation):
between two consecutive deterministic routers (lambda_k, lambda_{k+1}) one may randomise per prompt,
so every cost between their costs is achievable with the linearly interpolated quality. Quality at
a cost below the curve's cheapest point is NaN (not achievable); above its most expensive point it
is that point's quality (extra budget buys nothing: lambda=0 already takes the best prediction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from catimage.errors import BudgetError, CatimageError

__all__ = [
    "CurvePoint",
    "HullPoint",
    "area_between",
    "area_over_hull",
    "calibrate_lambda",
    "cost_to_reach",
    "curve_arrays",
    "deferral_curve",
    "deferral_curve_arrays",
    "expected_wait_s",
    "interpolate_curve",
    "max_precise_lambda",
    "mixture_hull",
    "pareto_options",
    "route",
    "utility_ranking",
]

# Relative slack when comparing average costs with a budget: an average of n equal costs can differ
# from that cost by an ulp, and "budget exactly at the cheapest candidate" must still be met.
_COST_RTOL = 1e-12


@dataclass(frozen=True)
class CurvePoint:
    """One deterministic router on the deferral curve: valid for lambda in [lam, next point's lam)."""

    lam: float
    cost: float
    quality: float

    def to_dict(self) -> dict[str, float]:
        return {"lambda": self.lam, "cost": self.cost, "quality": self.quality}


@dataclass(frozen=True)
class HullPoint:
    """A vertex of the fixed candidates' upper concave hull; `index` is the candidate's column."""

    cost: float
    quality: float
    index: int = -1

    def to_dict(self) -> dict[str, float | int]:
        return {"cost": self.cost, "quality": self.quality, "index": self.index}


# --- validation ---------------------------------------------------------------------------------


def _check_costs(costs: Any, m: int | None = None, n: int | None = None) -> np.ndarray:
    """Costs as float64: (M,) one per candidate, or (n, M) one per prompt and option."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim not in (1, 2) or costs.size == 0:
        raise CatimageError(
            f"costs must be a non-empty 1-D array (one per candidate) or a (prompts x candidates) array, got shape {costs.shape}"
        )
    if m is not None and costs.shape[-1] != m:
        raise CatimageError(
            f"predictions have {m} candidate column(s) but {costs.shape[-1]} cost(s) were given; "
            "pass one cost per candidate, in the same order"
        )
    if costs.ndim == 2 and n is not None and costs.shape[0] != n:
        raise CatimageError(f"per-prompt costs have {costs.shape[0]} row(s) for {n} prompt(s); give one row per prompt")
    if not np.isfinite(costs).all():
        raise CatimageError(f"costs must be finite numbers, got {costs.tolist() if costs.size < 50 else 'a non-finite value'}")
    if (costs < 0).any():
        raise CatimageError("costs must be >= 0; check the pool file's `cost:` values")
    return costs


def _check_matrix(values: Any, name: str, m: int | None = None, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise CatimageError(f"{name} must be a 2-D (prompts x candidates) array, got shape {arr.shape}")
    if m is not None and arr.shape[1] != m:
        raise CatimageError(f"{name} has {arr.shape[1]} candidate column(s), expected {m} (one per cost)")
    if n is not None and arr.shape[0] != n:
        raise CatimageError(f"{name} has {arr.shape[0]} prompt row(s), expected {n} (as many as the predictions)")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise CatimageError(
            f"{name} has {bad} NaN/infinite value(s); drop prompts with missing labels or predictions first"
        )
    return arr


def _check_inputs(pred: Any, costs: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    if pred.ndim != 2:
        raise CatimageError(f"pred must be a 2-D (prompts x candidates) array, got shape {pred.shape}")
    costs = _check_costs(costs, pred.shape[1], pred.shape[0])
    return _check_matrix(pred, "pred", m=costs.shape[-1]), costs


def _per_prompt(costs: np.ndarray, n: int) -> np.ndarray:
    """(n, M) view of (M,) or (n, M) costs."""
    return np.broadcast_to(costs, (n, costs.shape[-1]))


def _check_lambda(lam: Any) -> float:
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise BudgetError(f"lambda must be a number, got {lam!r}") from None
    if np.isnan(lam) or lam < 0:
        raise BudgetError(f"lambda must be >= 0 (0 = best predicted quality, larger = cheaper), got {lam}")
    return lam


def _cost_order(costs: np.ndarray) -> np.ndarray:
    """Candidate columns sorted by (cost, index): argmax over this order breaks ties to the cheaper."""
    return np.lexsort((np.arange(costs.size), costs))


# --- the rule -----------------------------------------------------------------------------------


def route(pred: Any, costs: Any, lam: float) -> np.ndarray:
    """Routed candidate index per prompt: argmax_m pred - lam * cost, exact ties to the cheaper one
    (then the lower index). `costs` (M,) or per prompt (n, M).

    `lam = inf` is allowed and means the limit: the cheapest candidate(s), best predicted among them.
    """
    pred, costs = _check_inputs(pred, costs)
    lam = _check_lambda(lam)
    return _argmax_utility(pred, _per_prompt(costs, pred.shape[0]), lam)


def _argmax_utility(pred: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """The rule on checked (n, M) arrays: best utility, ties to the cheaper, then the lower index."""
    if pred.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if np.isinf(lam):
        util = np.where(cost == cost.min(axis=1, keepdims=True), pred, -np.inf)
    else:
        util = pred - lam * cost
    tie = util == util.max(axis=1, keepdims=True)
    cheapest = np.where(tie, cost, np.inf).min(axis=1, keepdims=True)
    return np.argmax(tie & (cost == cheapest), axis=1).astype(np.int64)


def max_precise_lambda(costs: Any, quality_resolution: float) -> float:
    """The largest lambda at which `pred - lam * cost` still tells apart predictions that differ by
    `quality_resolution`: float64 rounds lam * cost (and the subtraction) to within a few ulps of
    lam * max(cost), so beyond this the rule's choice among candidates is decided by rounding.
    """
    costs = _check_costs(costs)
    top = float(costs.max())
    if top <= 0:
        return float("inf")
    return float(quality_resolution) / (4.0 * np.finfo(np.float64).eps * top)


def expected_wait_s(in_flight: Any, slots: Any, service_s: Any, cold_start_s: float = 60.0) -> np.ndarray:
    """Expected queueing delay (seconds) of one more request at each candidate.

    A candidate with `slots` requests drawn at once (replicas x per-replica concurrency) and
    `in_flight` outstanding serves the newcomer right away while a slot is free; otherwise it waits
    for (in_flight + 1 - slots) / slots services of `service_s` each. No slot at all (scaled to
    zero, or replicas still starting) costs a cold start on top.
    """
    in_flight = np.asarray(in_flight, dtype=np.float64)
    slots = np.asarray(slots, dtype=np.float64)
    service_s = np.asarray(service_s, dtype=np.float64)
    ahead = np.maximum(in_flight + 1.0 - slots, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        queued = np.where(slots > 0, ahead / np.where(slots > 0, slots, 1.0) * service_s, cold_start_s + in_flight * service_s)
    return queued


def utility_ranking(pred: Any, costs: Any, lam: float, penalty: Any = None) -> np.ndarray:
    """Candidates per prompt, best first, by utility = pred - lam * cost - penalty.

    `penalty` (M,) or (n, M), in quality units, is what load-aware routing subtracts
    (mu * expected wait). Ties go to the cheaper candidate, then the lower index, as `route` breaks
    them; so with no penalty column 0 of the result equals `route(pred, costs, lam)`.
    """
    pred, costs = _check_inputs(pred, costs)
    lam = _check_lambda(lam)
    if np.isinf(lam):
        util = np.where(costs == costs.min(), pred, -np.inf)
    else:
        util = pred - lam * costs
    if penalty is not None:
        util = util - np.broadcast_to(np.asarray(penalty, dtype=np.float64), util.shape)
    m = costs.size
    # lexsort: last key is primary -> (-utility, cost, index).
    idx = np.broadcast_to(np.arange(m), util.shape)
    cost_b = np.broadcast_to(costs, util.shape)
    return np.stack([np.lexsort((idx[i], cost_b[i], -util[i])) for i in range(util.shape[0])]).astype(np.int64) if util.shape[0] else np.zeros((0, m), np.int64)


def _mean_cost(choice: np.ndarray, costs: np.ndarray) -> float:
    """Average routed cost; from integer counts (exact up to one rounding) when costs are (M,)."""
    if costs.ndim == 2:
        return float(costs[np.arange(choice.size), choice].mean()) if choice.size else 0.0
    counts = np.bincount(choice, minlength=costs.size)
    return float(counts @ costs) / max(choice.size, 1)


def _meets(avg_cost: float, budget: float, costs: np.ndarray) -> bool:
    return avg_cost <= budget + _COST_RTOL * max(1.0, float(costs.max()))


# --- the sweep over lambda ----------------------------------------------------------------------


@dataclass
class _Events:
    """Where each prompt's choice changes: at `lam[e]`, prompt `row[e]` moves `src[e]` -> `dst[e]`.

    Events are sorted by lambda; `start` is every prompt's choice at lambda = 0.
    """

    start: np.ndarray
    lam: np.ndarray
    row: np.ndarray
    src: np.ndarray
    dst: np.ndarray


def _sweep(pred: np.ndarray, costs: np.ndarray) -> _Events:
    """Walk every prompt's upper hull from its lambda=0 choice to the cheapest candidate.

    Vectorised gift wrapping: from the current choice v, the next switch is to the strictly cheaper
    candidate j minimising the slope (pred_v - pred_j) / (cost_v - cost_j); equal slopes (collinear
    points) go to the cheapest of them, as the tie rule says. At most M-1 steps, each O(n M).
    `costs` (M,) or (n, M).
    """
    n, m = pred.shape
    rows = np.arange(n)
    cost = _per_prompt(costs, n)
    cur = _argmax_utility(pred, cost, 0.0)
    start = cur.copy()
    last = np.zeros(n)
    lams, rws, srcs, dsts = [], [], [], []
    for _ in range(m):
        dc = cost[rows, cur][:, None] - cost
        cheaper = dc > 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            slope = np.where(cheaper, (pred[rows, cur][:, None] - pred) / np.where(cheaper, dc, 1.0), np.inf)
        smin = slope.min(axis=1)
        moving = np.isfinite(smin)
        if not moving.any():
            break
        tie = (slope == smin[:, None]) & cheaper
        tie_cost = np.where(tie, cost, np.inf).min(axis=1, keepdims=True)
        nxt = np.argmax(tie & (cost == tie_cost), axis=1)
        idx = np.nonzero(moving)[0]
        # Rounding could put a slope an ulp below the previous switch; lambda must not go back.
        at = np.maximum(smin[idx], last[idx])
        lams.append(at)
        rws.append(idx)
        srcs.append(cur[idx])
        dsts.append(nxt[idx])
        last[idx] = at
        cur = np.where(moving, nxt, cur)
    if lams:
        lam = np.concatenate(lams)
        srt = np.argsort(lam, kind="stable")
        return _Events(start, lam[srt], np.concatenate(rws)[srt], np.concatenate(srcs)[srt], np.concatenate(dsts)[srt])
    empty = np.zeros(0, dtype=np.int64)
    return _Events(start, np.zeros(0), empty, empty, empty)


def _group_ends(lam: np.ndarray) -> np.ndarray:
    """Index of the last event of each run of equal lambdas (the state after all of them)."""
    if lam.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(np.append(lam[1:] != lam[:-1], True))[0]


def _cost_steps(ev: _Events, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lambdas, mean costs) of the curve points. (M,) costs: from integer counts, so no rounding
    drift builds up; (n, M) costs: running sums of each switch's cost change (the last point, all
    prompts on their cheapest option, is recomputed by the callers)."""
    n = ev.start.size
    ends = _group_ends(ev.lam)
    lam = np.concatenate([[0.0], ev.lam[ends]])
    if costs.ndim == 2:
        first = costs[np.arange(n), ev.start].sum()
        steps = np.cumsum(costs[ev.row, ev.dst] - costs[ev.row, ev.src])
        return lam, np.concatenate([[first], first + steps[ends]]) / n
    m = costs.size
    counts0 = np.bincount(ev.start, minlength=m)
    delta = np.zeros((ev.lam.size, m), dtype=np.int64)
    e = np.arange(ev.lam.size)
    delta[e, ev.src] -= 1
    delta[e, ev.dst] += 1
    counts = counts0[None, :] + np.cumsum(delta, axis=0)
    cost = np.concatenate([[counts0 @ costs], counts[ends] @ costs]) / n
    return lam, cost


def pareto_options(pred: Any, costs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt, the options that no other beats on both prediction and cost: (pred, cost, index),
    each (n, F), F the widest prompt's count; narrower rows are padded with copies of their
    cheapest kept option (equal cost: never switched to, and it loses every tie to the original).

    The rule's choice over the kept options equals its choice over all of them at every lambda:
    a dropped option has a kept one at least as good and at most as dear, which wins its ties.
    """
    pred, costs = _check_inputs(pred, costs)
    n, m = pred.shape
    cost = _per_prompt(costs, n)
    idx = np.broadcast_to(np.arange(m), (n, m))
    order = np.lexsort((idx, -pred, cost), axis=1)  # cost up, prediction down, index up
    p_sorted = np.take_along_axis(pred, order, axis=1)
    best_before = np.concatenate([np.full((n, 1), -np.inf), np.maximum.accumulate(p_sorted, axis=1)[:, :-1]], axis=1)
    keep = p_sorted > best_before
    width = max(int(keep.sum(axis=1).max()) if n else 1, 1)
    pos = np.sort(np.where(keep, np.arange(m), m), axis=1)[:, :width]
    pos = np.where(pos == m, 0, pos)
    cols = np.take_along_axis(order, pos, axis=1)
    rows = np.arange(n)[:, None]
    return pred[rows, cols], cost[rows, cols], cols


# --- calibration --------------------------------------------------------------------------------


def calibrate_lambda(pred: Any, costs: Any, budget: float) -> float:
    """The smallest lambda >= 0 whose average routed cost on these (calibration) prompts is <= budget.

    `costs` (M,) or per prompt (n, M) (a cascade's expected plan costs). Exact: the average cost only
    changes at the prompts' hull slopes, so the answer is 0 or one of them. The returned float is
    then checked with the rule itself (and nudged up if rounding at an exact tie would pick the
    dearer option), so routing these prompts at the returned lambda really meets the budget. Always
    finite: when rounding defeats the nudges, it is a lambda large enough that every prompt takes
    its cheapest option (which meets any budget that is allowed at all).
    """
    pred, costs = _check_inputs(pred, costs)
    if pred.shape[0] == 0:
        raise CatimageError("calibration needs at least one prompt's predictions")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise BudgetError(f"budget must be a number, got {budget!r}") from None
    if not np.isfinite(budget):
        raise BudgetError(f"budget must be a finite number, got {budget}")
    if costs.ndim == 2:
        pred, costs, _ = pareto_options(pred, costs)
    cheapest = float(costs.min(axis=-1).mean()) if costs.ndim == 2 else float(costs.min())
    if not _meets(cheapest, budget, costs):
        what = "the cheapest options' mean cost" if costs.ndim == 2 else "the cheapest candidate's cost"
        raise BudgetError(
            f"budget {budget:g} is below {what} {cheapest:g} (in the pool's cost unit, the same unit as the pool "
            f"file's `cost:` values); raise the budget to at least {cheapest:g}"
        )
    lams, avg = _cost_steps(_sweep(pred, costs), costs)
    ok = np.nonzero([_meets(a, budget, costs) for a in avg])[0]
    lam = float(lams[ok[0]]) if ok.size else _all_cheapest_lambda(pred, costs)
    if lam == 0.0:
        return 0.0
    return _nudged(pred, costs, budget, lam)


def _routes_within(pred: np.ndarray, costs: np.ndarray, lam: float, budget: float) -> bool:
    return _meets(_mean_cost(_argmax_utility(pred, _per_prompt(costs, pred.shape[0]), lam), costs), budget, costs)


def _nudged(pred: np.ndarray, costs: np.ndarray, budget: float, lam: float) -> float:
    """`lam`, or the first of lam + 1, 2, 4, ... ulps that meets the budget under the rule itself
    (rounding at an exact tie can pick the dearer option); finite in every case."""
    step, candidate = float(np.spacing(lam)), lam
    for _ in range(64):
        if _routes_within(pred, costs, candidate, budget):
            return candidate
        candidate = lam + step
        step *= 2.0
    return _all_cheapest_lambda(pred, costs)


def _all_cheapest_lambda(pred: np.ndarray, costs: np.ndarray) -> float:
    """A finite lambda at which every prompt takes its cheapest option (as lambda = inf does): above
    every hull slope, with margin, capped at the largest float (where lam * cost overflows for every
    dearer option, which the rule then never picks)."""
    n = pred.shape[0]
    cost = _per_prompt(costs, n)
    low = cost.min(axis=1, keepdims=True)
    gap = np.where(cost > low, cost - low, np.inf).min()
    spread = float(pred.max() - pred.min()) if pred.size else 0.0
    with np.errstate(over="ignore", divide="ignore"):
        lam = 4.0 * (spread + 1.0) / gap if np.isfinite(gap) else 0.0
    return float(min(lam, np.finfo(np.float64).max))


# --- the exact deferral curve -------------------------------------------------------------------


def deferral_curve_arrays(
    pred: Any, costs: Any, quality: Any, realized_cost: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`deferral_curve` as three arrays (lambda, mean cost, mean true quality), lambda increasing.

    `costs` (M,) or (n, M) decide; `realized_cost` (n, M), when given, is the cost REPORTED for each
    prompt and option (a cascade decides on expected plan costs and pays what its draws cost).
    """
    pred, costs = _check_inputs(pred, costs)
    n = pred.shape[0]
    if n == 0:
        raise CatimageError("the deferral curve needs at least one prompt")
    quality = _check_matrix(quality, "quality", m=pred.shape[1], n=n)
    if realized_cost is not None:
        realized_cost = _check_costs(realized_cost, pred.shape[1], n)
        if realized_cost.ndim != 2:
            realized_cost = _per_prompt(realized_cost, n)
    if costs.ndim == 2:
        pred, costs, cols = pareto_options(pred, costs)
        rows = np.arange(n)[:, None]
        quality = quality[rows, cols]
        realized_cost = None if realized_cost is None else realized_cost[rows, cols]
    ev = _sweep(pred, costs)
    lam, cost = _cost_steps(ev, costs if realized_cost is None else realized_cost)
    q0 = quality[np.arange(n), ev.start]
    dq = quality[ev.row, ev.dst] - quality[ev.row, ev.src]
    ends = _group_ends(ev.lam)
    total = np.concatenate([[q0.sum()], q0.sum() + np.cumsum(dq)[ends]])
    if ends.size:
        # The end point is recomputed directly so that it equals the all-cheapest router exactly.
        final = _argmax_utility(pred, _per_prompt(costs, n), np.inf)
        total[-1] = quality[np.arange(n), final].sum()
        if realized_cost is not None or costs.ndim == 2:
            paid = _per_prompt(costs, n) if realized_cost is None else realized_cost
            cost[-1] = paid[np.arange(n), final].mean()
    return lam, cost, total / n


def deferral_curve(pred: Any, costs: Any, quality: Any) -> list[CurvePoint]:
    """The exact deferral curve of routing on `pred`, scored with the true labels `quality`.

    One point per distinct lambda at which some prompt's routed choice changes, from lambda = 0
    (best predicted quality, highest cost) to the last switch, after which every prompt sits on the
    cheapest candidate (lambda -> inf). cost = mean routed cost, quality = mean of
    quality[i, route_i]. `quality` must be finite: drop prompts with missing labels first.
    With `quality = pred` passed as the true labels this is the oracle's curve.
    """
    lam, cost, qual = deferral_curve_arrays(pred, costs, quality)
    return [CurvePoint(float(a), float(b), float(c)) for a, b, c in zip(lam, cost, qual)]


# --- the prompt-agnostic baseline ---------------------------------------------------------------


def mixture_hull(costs: Any, qualities: Any) -> list[HullPoint]:
    """Upper concave hull of the fixed candidates' (cost, mean quality), cheapest to best.

    This is what a prompt-agnostic router achieves by sending a random fraction of prompts to each
    of two neighbouring candidates. It starts at the cheapest candidate (best quality among equally
    cheap ones) and ends at the best-quality candidate (cheapest among equally good ones); points
    below the hull and collinear points on an edge are not vertices. Monotone chain on <= M points:
    scipy's Qhull rejects the degenerate inputs (two points, collinear, equal costs) that pools have.
    """
    costs = _check_costs(costs)
    qual = np.asarray(qualities, dtype=np.float64)
    if qual.shape != costs.shape:
        raise CatimageError(f"{costs.size} costs but qualities have shape {qual.shape}")
    if not np.isfinite(qual).all():
        raise CatimageError("fixed-candidate qualities must be finite (drop prompts with missing labels first)")
    best_q = qual.max()
    best = min(np.nonzero(qual == best_q)[0], key=lambda j: (costs[j], j))
    order = np.lexsort((np.arange(costs.size), -qual, costs))  # cost up, quality down, index up
    hull: list[int] = []
    for j in order:
        if costs[j] > costs[best]:
            break
        if hull and costs[j] == costs[hull[-1]]:
            continue  # same cost, not better: dominated by the point already kept
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (costs[b] - costs[a]) * (qual[j] - qual[a]) - (qual[b] - qual[a]) * (costs[j] - costs[a])
            if cross >= 0:  # b is on or below the segment a -> j
                hull.pop()
            else:
                break
        hull.append(int(j))
    return [HullPoint(float(costs[j]), float(qual[j]), int(j)) for j in hull]


# --- reading curves -----------------------------------------------------------------------------

CurveLike = Sequence[CurvePoint] | Sequence[HullPoint] | Sequence[Mapping[str, float]] | tuple[np.ndarray, np.ndarray]


def curve_arrays(points: CurveLike) -> tuple[np.ndarray, np.ndarray]:
    """(cost, quality) of curve points sorted by cost (attributes or dict keys `cost`, `quality`, or
    a pair of arrays (costs, qualities), which is how the selection loops pass curves cheaply)."""
    if isinstance(points, tuple) and len(points) == 2 and isinstance(points[0], np.ndarray):
        cost, qual = np.asarray(points[0], dtype=np.float64), np.asarray(points[1], dtype=np.float64)
        if cost.size == 0:
            raise CatimageError("an empty curve has no quality at any cost")
        srt = np.argsort(cost, kind="stable")
        return cost[srt], qual[srt]
    if len(points) == 0:
        raise CatimageError("an empty curve has no quality at any cost")
    first = points[0]
    if isinstance(first, Mapping):
        cost = np.array([float(p["cost"]) for p in points])  # type: ignore[index]
        qual = np.array([float(p["quality"]) for p in points])  # type: ignore[index]
    else:
        cost = np.array([float(p.cost) for p in points])  # type: ignore[union-attr]
        qual = np.array([float(p.quality) for p in points])  # type: ignore[union-attr]
    srt = np.argsort(cost, kind="stable")
    return cost[srt], qual[srt]


def interpolate_curve(
    points: CurveLike, cost: float | np.ndarray, kind: Literal["linear", "step"] = "linear"
) -> float | np.ndarray:
    """Quality of a curve at a given average cost.

    `linear` (the default, used by every report figure, as in the paper): linear interpolation
    between neighbouring points, which randomising between two deterministic routers achieves.
    `step`: the quality of the most expensive deterministic point whose cost is <= `cost`.
    Below the cheapest point: NaN (not achievable). Above the dearest point: that point's quality.
    """
    xs, ys = curve_arrays(points)
    c = np.asarray(cost, dtype=np.float64)
    if kind == "linear":
        out = np.interp(c, xs, ys)
    elif kind == "step":
        idx = np.searchsorted(xs, c, side="right") - 1
        out = ys[np.clip(idx, 0, xs.size - 1)]
    else:
        raise CatimageError(f"unknown interpolation {kind!r}; use 'linear' or 'step'")
    # A mean of n equal costs can land an ulp above that cost: summation rounding is not "cheaper".
    tol = 1e-9 * max(1.0, abs(float(xs[0])))
    out = np.where(c < xs[0] - tol, np.nan, out)
    return float(out) if out.ndim == 0 else out


def cost_to_reach(points: CurveLike, target: float, atol: float = 1e-9) -> float | None:
    """The smallest average cost at which the (linearly interpolated) curve reaches `target` quality.

    None if it never does. `atol` absorbs summation rounding so that a curve whose end point *is*
    a fixed candidate reaches that candidate's quality.
    """
    xs, ys = curve_arrays(points)
    goal = float(target) - atol
    if ys[0] >= goal:
        return float(xs[0])
    for k in range(1, xs.size):
        if ys[k] >= goal:
            q0, q1 = ys[k - 1], ys[k]
            frac = (float(target) - q0) / (q1 - q0) if q1 > q0 else 1.0
            return float(xs[k - 1] + min(max(frac, 0.0), 1.0) * (xs[k] - xs[k - 1]))
    return None


# --- areas ---------------------------------------------------------------------------------------


def area_between(upper: Sequence[Any], lower: Sequence[Any], lo: float, hi: float) -> float:
    """Mean of (upper(c) - lower(c)) over c in [lo, hi], both curves read by linear interpolation.

    Exact: both are piecewise linear, so the trapezoid rule on the union of their breakpoints is the
    integral. When lo == hi it is the difference at that cost.
    """
    if hi < lo:
        raise CatimageError(f"cost range [{lo}, {hi}] is empty")
    if hi == lo:
        return float(interpolate_curve(upper, lo) - interpolate_curve(lower, lo))
    xs = np.concatenate([curve_arrays(upper)[0], curve_arrays(lower)[0], [lo, hi]])
    xs = np.unique(xs[(xs >= lo) & (xs <= hi)])
    diff = np.asarray(interpolate_curve(upper, xs)) - np.asarray(interpolate_curve(lower, xs))
    if np.isnan(diff).any():
        raise CatimageError("a curve does not reach down to the cheapest candidate's cost; cannot integrate")
    return float(np.trapezoid(diff, xs) / (hi - lo))


def area_over_hull(pred: Any, labels: Any, costs: Any) -> float:
    """THE area figure: mean quality of the exact deferral curve of routing on `pred` (scored with
    `labels`) over the mixture hull of the fixed candidates, on the fixed costs' range.

    Rows with a missing label or prediction are left out; -inf below two rows. Higher is better;
    0 = no better than mixing fixed candidates at random. The evaluation reports it as
    `area_over_hull`; the estimators' hyper-parameter selection maximises it out of sample.
    """
    pred, labels = np.asarray(pred, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    costs = _check_costs(costs, pred.shape[1])
    rows = np.isfinite(labels).all(axis=1) & np.isfinite(pred).all(axis=1)
    if rows.sum() < 2:
        return float("-inf")
    lo, hi = float(costs.min()), float(costs.max())
    if hi <= lo:
        return 0.0
    _, cost, qual = deferral_curve_arrays(pred[rows], costs, labels[rows])
    return area_between((cost, qual), mixture_hull(costs, labels[rows].mean(axis=0)), lo, hi)
