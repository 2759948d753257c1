"""Judging a cascade offline: simulate every plan on the test prompts' OWN seed rows.

Simulation (`simulate_plans`): attempt j of a plan draws seed slot j of the table (the j-th seed of
each cell in seed order), so every attempt is a seed not drawn before on that prompt, whichever
candidate drew it (builds share a seed slot's starting noise across candidates, so reusing a slot
would not be a fresh draw). A table with ONE sample per cell (rated sets) still allows one attempt
per candidate: there attempt j draws the candidate's one sample, so plans must use distinct
candidates. The stop rule is catimage.policy.plans's (`executed_attempts`, its reference
implementation): accept the first draw whose decision score >= threshold, else return the
best-scoring draw (earliest on exact ties). Realised judge quality and realised cost per prompt and
plan; the decision scorer's cost counts for every image of a scored plan.

The cascade's deferral curve sweeps lambda exactly (catimage.policy.routing, per-prompt costs):
each prompt follows the plan maximising PREDICTED value - lambda * EXPECTED cost, and the curve reports
the mean REALISED judge quality and realised cost of those plans. Its figures are the routing ones
(catimage.evaluation.figures.evaluate_curve: fixed candidates, mixture hull, the routing oracle,
area over the hull, cost ratio or miss, ...), the bootstrap resamples test prompts
(catimage.evaluation.confidence.bootstrap_resamples), and APGR / CPT come from
catimage.evaluation.routellm. When the decision metric is the judge, every figure is an upper bound.

What `report.json` holds per policy (catimage.evaluation.trials builds it; report/html/plot read it
through catimage.evaluation.figures.policy_views)::

    "policies": {
      "route":   {"summary", "per_trial", "curve", "decision_metric": null, "judge_metric", "upper_bound": false,
                  "fixed", "hull", "oracle"},
      "cascade": {... the same keys ..., "decision_metric": NAME, "upper_bound": bool,
                  "traces": [{"prompt_id", "prompt", "budget", "lambda", "plan": {"attempts", "threshold"},
                              "label", "attempts": [attempt_trace rows]}],
                  "plans": {"n_plans", "max_attempts", "thresholds", "score_cost", "distinct", "router_means",
                            "draw_estimator"}}
    }

    per_trial rows: {"seed", "n_test", "best_fixed", <figures.TRIAL_RECORD_KEYS>, "apgr", "cpt_50", "cpt_80"}
    attempt_trace rows: {"candidate", "seed" (the table's seed value), "decision" (null for the unscored
                         route plan), "judge", "accepted", "returned", "cost"}

`summary` has the keys of the route summary (evaluate_curve) plus "apgr", "cpt_50", "cpt_80",
"trials" (summarize_trials + "intervals"), "intervals", "verdict" and "budget_check"; `curve` is a
list of {"lambda", "cost", "quality"} (trial 0).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.evaluation.confidence import bootstrap_resamples
from catimage.evaluation.figures import EvalResult, evaluate_curve, fast_curve_figures
from catimage.evaluation.routellm import routellm_figures
from catimage.policy.plans import Plan, executed_attempts
from catimage.policy.routing import CurvePoint, deferral_curve_arrays, pareto_options, route
from catimage.tables.draws import Draws

log = logging.getLogger(__name__)

__all__ = [
    "CascadeTrial",
    "Realized",
    "attempt_trace",
    "evaluate_cascade_trial",
    "seed_slots",
    "simulate_plans",
    "usable_prompts",
]


@dataclass(frozen=True)
class Realized:
    """What each plan really earned on each prompt: judge quality and cost, (n, P)."""

    quality: np.ndarray
    cost: np.ndarray


def seed_slots(plan_attempts: np.ndarray, n_seeds: int) -> np.ndarray:
    """(P, K) seed slot of every attempt: j with several seeds per cell; with one, each candidate's
    one sample (a plan that repeats a candidate cannot be simulated there: an error)."""
    p, k = plan_attempts.shape
    if n_seeds > 1:
        if k > n_seeds:
            raise CatimageError(f"plans of {k} attempts need {k} seeds per cell; the table has {n_seeds}. Use "
                                f"max_attempts <= {n_seeds}")
        return np.broadcast_to(np.arange(k), (p, k)).copy()
    slots = np.zeros((p, k), dtype=np.int64)
    for j in range(k):
        slots[:, j] = ((plan_attempts[:, :j] == plan_attempts[:, j : j + 1]) & (plan_attempts[:, j : j + 1] >= 0)).sum(axis=1)
    if (slots > 0).any():
        raise CatimageError("a table with one sample per cell allows one attempt per candidate: use distinct plans")
    return slots


def usable_prompts(draws: Draws, max_attempts: int) -> np.ndarray:
    """(n,) bool: every candidate has the seed slots a plan of `max_attempts` may draw."""
    need = min(int(max_attempts), draws.n_seeds)
    return draws.present[:, :, :need].all(axis=(1, 2))


def simulate_plans(plans: Sequence[Plan], draws: Draws, costs: Any, score_cost: float) -> Realized:
    """Realised judge quality and cost of every plan on every prompt of `draws` (its own seed rows)."""
    costs = np.asarray(costs, dtype=np.float64)
    att = _attempt_matrix(plans, draws.candidates)
    thr = np.array([np.inf if p.threshold is None else p.threshold for p in plans])
    per_image = np.array([0.0 if p.is_route else float(score_cost) for p in plans])
    length = np.array([len(p.attempts) for p in plans])
    slots = seed_slots(att, draws.n_seeds)
    n, n_plans = draws.n_prompts, len(plans)
    done = np.zeros((n, n_plans), dtype=bool)
    best_d = np.full((n, n_plans), -np.inf)
    best_q, last_q, ret = (np.full((n, n_plans), np.nan) for _ in range(3))
    cost = np.zeros((n, n_plans))
    for j in range(att.shape[1]):
        act = (length > j)[None, :] & ~done
        cand = np.maximum(att[:, j], 0)
        d, q = draws.decision[:, cand, slots[:, j]], draws.judge[:, cand, slots[:, j]]
        cost += act * (costs[cand] + per_image)[None, :]
        last_q = np.where(act, q, last_q)
        better = act & (d > best_d)  # strictly: the earliest wins exact ties; NaN never wins
        best_q = np.where(better, q, best_q)
        best_d = np.where(better, d, best_d)
        passed = act & (d >= thr[None, :])
        ret = np.where(passed, q, ret)
        done |= passed
    # Not accepted: the best-scoring draw; when no draw has a score, the last one drawn (unscored).
    quality = np.where(done, ret, np.where(np.isfinite(best_d), best_q, last_q))
    return Realized(quality, cost)


def _attempt_matrix(plans: Sequence[Plan], candidates: Sequence[str]) -> np.ndarray:
    index = {c: j for j, c in enumerate(candidates)}
    k = max(len(p.attempts) for p in plans)
    att = np.full((len(plans), k), -1, dtype=np.int64)
    for i, p in enumerate(plans):
        try:
            att[i, : len(p.attempts)] = [index[a] for a in p.attempts]
        except KeyError as err:
            raise CatimageError(f"plan {p.label()!r} names {err.args[0]!r}, not a candidate of {list(candidates)}") from None
    return att


def attempt_trace(plan: Plan, draws: Draws, i: int, costs: Mapping[str, float] | None = None,
                  score_cost: float = 0.0) -> list[dict[str, Any]]:
    """Every attempt `plan` draws on prompt `i` of `draws`: candidate, seed (the table's value),
    decision score, judge score, accepted, returned (and cost, when `costs` are given)."""
    att = _attempt_matrix([plan], draws.candidates)
    slots = seed_slots(att, draws.n_seeds)[0]
    cols = att[0]
    scores = [float(draws.decision[i, c, s]) for c, s in zip(cols, slots)]
    drawn, returned = executed_attempts(plan, scores)
    rows = []
    for j in range(drawn):
        c, s = int(cols[j]), int(slots[j])
        row = {
            "candidate": draws.candidates[c], "seed": int(draws.seed[i, c, s]),
            "decision": None if plan.is_route else scores[j], "judge": float(draws.judge[i, c, s]),
            "accepted": bool(plan.threshold is not None and scores[j] >= plan.threshold),
            "returned": j == returned,
        }
        if costs is not None:
            row["cost"] = float(costs[draws.candidates[c]]) + (0.0 if plan.is_route else float(score_cost))
        rows.append(row)
    return rows


# --- one trial ----------------------------------------------------------------------------------


@dataclass
class CascadeTrial:
    """One trial of the cascade on its test prompts: figures, curve, bootstrap, RouteLLM, checks."""

    result: EvalResult
    routellm: dict[str, Any]
    boot: np.ndarray | None
    budget_check: list[dict[str, Any]]
    traces: list[dict[str, Any]]


def evaluate_cascade_trial(
    model: Any, draws: Draws, X: np.ndarray, costs: np.ndarray, *, bootstrap: int, seed: int, n_traces: int = 6,
    means: np.ndarray | None = None,
) -> CascadeTrial:
    """Figures of a fitted `CascadeModel` on test prompts (`draws`, their pooled features `X`, the
    router's predictions `means` when already computed)."""
    value, expected = model.plan_values(model.predict_stats(draws.prompts, X, means))
    real = simulate_plans(model.plans, draws, costs, model.score_cost)
    true = draws.judge_mean()
    lam, c, q = deferral_curve_arrays(value, expected, real.quality, realized_cost=real.cost)
    curve = [CurvePoint(float(a), float(b), float(d)) for a, b, d in zip(lam, c, q)]
    result = evaluate_curve(curve, true, costs, draws.candidates)
    extra = routellm_figures(curve, true.mean(axis=0), costs)
    boot = None
    if bootstrap > 0:
        boot = _bootstrap(value, expected, real, true, costs, bootstrap, seed)
    checks = _budget_check(model, value, expected, real, costs)
    traces = _traces(model, draws, value, expected, costs, result.summary, n_traces)
    return CascadeTrial(result, extra, boot, checks, traces)


def _bootstrap(value, expected, real: Realized, true, costs, n_boot: int, seed: int) -> np.ndarray:
    """Resample test prompts; the per-prompt Pareto options are fixed, so each resample sweeps fast."""
    v, e, cols = pareto_options(value, expected)
    rows = np.arange(v.shape[0])[:, None]
    rq, rc = real.quality[rows, cols], real.cost[rows, cols]

    def figures_of(idx: np.ndarray) -> np.ndarray:
        _, cc, qq = deferral_curve_arrays(v[idx], e[idx], rq[idx], realized_cost=rc[idx])
        return fast_curve_figures(cc, qq, true[idx], costs)

    return bootstrap_resamples(v.shape[0], n_boot, seed, figures_of)


def _budget_check(model, value, expected, real: Realized, costs) -> list[dict[str, Any]]:
    """Budgets = each fixed candidate's cost: lambda from the calibration prompts (expected plan
    costs), then the realised mean cost and judge quality that lambda gives on the test prompts."""
    out, rows = [], np.arange(value.shape[0])
    for budget in sorted({float(c) for c in costs}):
        lam = model.lambda_for_budget(budget)
        chosen = route(value, expected, lam)
        out.append({"budget": budget, "lambda": lam, "expected_cost": float(expected[rows, chosen].mean()),
                    "test_cost": float(real.cost[rows, chosen].mean()),
                    "test_quality": float(real.quality[rows, chosen].mean())})
    return out


def _traces(model, draws: Draws, value, expected, costs, summary, n_traces: int) -> list[dict[str, Any]]:
    """A few test prompts' plans at half the best fixed candidate's cost (at least the cheapest), every
    attempt with its decision and judge scores: multi-attempt plans first, for the report's gallery."""
    if n_traces <= 0:
        return []
    budget = max(float(summary["best_fixed_cost"]) / 2.0, float(np.min(costs)))
    try:
        lam = model.lambda_for_budget(budget)
    except CatimageError:
        return []
    chosen = route(value, expected, lam)
    order = sorted(range(draws.n_prompts), key=lambda i: (-len(model.plans[chosen[i]].attempts), i))
    price = dict(zip(draws.candidates, np.asarray(costs, dtype=float).tolist()))
    out = []
    for i in order[:n_traces]:
        plan = model.plans[int(chosen[i])]
        out.append({"prompt_id": draws.prompt_ids[i], "prompt": draws.prompts[i], "budget": budget, "lambda": lam,
                    "plan": plan.to_dict(), "label": plan.label(),
                    "attempts": attempt_trace(plan, draws, i, price, model.score_cost)})
    return out
