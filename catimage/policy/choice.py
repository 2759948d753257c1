"""What one served request draws: the policy's choice under the request's limits, with exploration.

Serving asks, per request, for a plan (catimage.policy.plans): with the `route` policy the
one-attempt plan of a candidate, with the `cascade` policy one of the fitted cascade's plans. The
request may limit the plans (`RequestLimits`): at most `max_attempts` attempts, accept no image
below `min_quality` (the decision metric's units), or draw only a `pinned` candidate. The choice is
the policy's own (argmax of expected value - lam * expected cost, ties to the cheaper), except that
a share of traffic explores (catimage.policy.explore): the probability of what was drawn is
returned, for the served log's `propensity`.

What exploration draws from:

* routing: every candidate (the cost cap of `ExplorationConfig.max_cost` applies);
* cascades: the request's feasible plans that no other feasible plan beats on both expected value
  and expected cost (the per-prompt Pareto set, `catimage.policy.routing.pareto_options`, usually a
  few dozen of the thousands enumerated). The policy's own pick is always among them, and a plan
  off that set is one no lambda would ever choose: exploring it would teach nothing a Pareto plan
  does not. The propensity is exact for this distribution.

`min_quality`: the feasible plans are those whose threshold is at least `min_quality` (so every
accepted image meets it). When no plan of at most `max_attempts` attempts has such a threshold
(the model's plans stop at lower thresholds, or one attempt is asked for), the choice is made
among all plans of at most `max_attempts` attempts and the chosen plan's threshold is raised to
`min_quality`; its expected value and cost were predicted at its own threshold and then understate
the cost (more escalations). Pure numpy; no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from catimage.errors import CatimageError
from catimage.policy.explore import ExplorationConfig, explore
from catimage.policy.plans import Plan
from catimage.policy.routing import pareto_options

__all__ = ["Choice", "RequestLimits", "choose_plan", "choose_route"]


@dataclass(frozen=True)
class RequestLimits:
    """What a request allows the policy to draw."""

    max_attempts: int | None = None
    min_quality: float | None = None
    pinned: str | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None and int(self.max_attempts) < 1:
            raise CatimageError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.min_quality is not None and not math.isfinite(self.min_quality):
            raise CatimageError(f"min_quality must be a finite number, got {self.min_quality}")


@dataclass(frozen=True)
class Choice:
    """The drawn plan, the probability it was drawn with, and what the policy alone would pick."""

    plan: Plan
    propensity: float
    greedy: Plan
    expected_value: float
    expected_cost: float
    options: int
    """How many plans (or candidates) the draw was made among."""

    @property
    def explored(self) -> bool:
        return self.plan != self.greedy


def _draw(utility: np.ndarray, cost: np.ndarray, config: ExplorationConfig,
          rng: np.random.Generator) -> tuple[int, float, int]:
    """(drawn index, its probability, greedy index) over one request's options."""
    ex = explore(utility[None, :], cost[None, :], config, rng)
    return int(ex.choice[0]), float(ex.propensity[0]), int(ex.greedy[0])


def choose_route(
    pred: Sequence[float], costs: Sequence[float], candidates: Sequence[str], lam: float,
    config: ExplorationConfig, rng: np.random.Generator, penalty: Sequence[float] | None = None,
) -> Choice:
    """Routing: the one-attempt plan of argmax pred - lam * cost [- penalty], or an explored candidate."""
    pred = np.asarray(pred, dtype=np.float64)
    cost = np.asarray(costs, dtype=np.float64)
    utility = pred - float(lam) * cost - (0.0 if penalty is None else np.asarray(penalty, dtype=np.float64))
    k, p, g = _draw(utility, cost, config, rng)
    return Choice(Plan.route(candidates[k]), p, Plan.route(candidates[g]), float(pred[k]), float(cost[k]), len(cost))


def feasible_plans(plans: Sequence[Plan], limits: RequestLimits) -> tuple[np.ndarray, bool]:
    """(indices of the plans the limits allow, whether the chosen plan's threshold must be raised)."""
    length = np.array([len(p.attempts) for p in plans])
    ok = np.ones(len(plans), dtype=bool)
    if limits.max_attempts is not None:
        ok &= length <= int(limits.max_attempts)
    if limits.pinned is not None:
        ok &= np.array([all(a == limits.pinned for a in p.attempts) for p in plans], dtype=bool)
    if limits.min_quality is None:
        return np.flatnonzero(ok), False
    strict = ok & np.array([p.threshold is not None and p.threshold >= limits.min_quality for p in plans], dtype=bool)
    if strict.any():
        return np.flatnonzero(strict), False
    return np.flatnonzero(ok), True


def choose_plan(
    value: Sequence[float], cost: Sequence[float], plans: Sequence[Plan], lam: float, limits: RequestLimits,
    config: ExplorationConfig, rng: np.random.Generator,
) -> Choice:
    """A cascade plan for one request, from its plans' expected value and cost (`CascadeModel.plan_values`)."""
    value = np.asarray(value, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if value.shape != (len(plans),) or cost.shape != value.shape:
        raise CatimageError(f"{len(plans)} plans but values {value.shape} and costs {cost.shape}")
    idx, raise_threshold = feasible_plans(plans, limits)
    if idx.size == 0:
        if limits.pinned is None:
            raise CatimageError(f"no plan of the model fits max_attempts={limits.max_attempts}")
        plan = Plan.route(limits.pinned)  # the model plans no redraw of this candidate: draw it once
        return Choice(_raised(plan, limits.min_quality), 1.0, plan, math.nan, math.nan, 1)
    _, _, cols = pareto_options(value[idx][None, :], cost[idx][None, :])
    options = idx[np.unique(cols[0])]
    k, p, g = _draw(value[options] - float(lam) * cost[options], cost[options], config, rng)
    plan, greedy = plans[int(options[k])], plans[int(options[g])]
    if raise_threshold:
        plan, greedy = _raised(plan, limits.min_quality), _raised(greedy, limits.min_quality)
    return Choice(plan, p, greedy, float(value[options[k]]), float(cost[options[k]]), int(options.size))


def _raised(plan: Plan, min_quality: float | None) -> Plan:
    """`plan` accepting nothing below `min_quality` (its threshold raised to it)."""
    if min_quality is None or (plan.threshold is not None and plan.threshold >= min_quality):
        return plan
    return Plan(plan.attempts, float(min_quality))
