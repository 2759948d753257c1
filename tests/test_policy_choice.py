"""Per-request choice of a plan or candidate (catimage/policy/choice.py), on a hand-made plan set.

    plan          value  cost
    a             0.50   1.0
    b             0.70   3.0    beaten by a>b (0.72 at 2.5): never an option
    a>a @0.6      0.65   1.8
    a>b @0.6      0.72   2.5
    b>b @0.8      0.71   5.0    beaten by a>b: never an option
"""

from __future__ import annotations

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.policy.choice import RequestLimits, choose_plan, choose_route
from catimage.policy.explore import ExplorationConfig
from catimage.policy.plans import Plan

PLANS = [Plan.route("a"), Plan.route("b"), Plan(("a", "a"), 0.6), Plan(("a", "b"), 0.6), Plan(("b", "b"), 0.8)]
VALUE = [0.50, 0.70, 0.65, 0.72, 0.71]
COST = [1.0, 3.0, 1.8, 2.5, 5.0]
GREEDY = ExplorationConfig(epsilon=0.0)


NO_LIMITS = RequestLimits()


def _choose(lam=0.0, limits=NO_LIMITS, config=GREEDY, seed=0):
    return choose_plan(VALUE, COST, PLANS, lam, limits, config, np.random.default_rng(seed))


def test_greedy_choice_is_the_best_utility_among_the_pareto_plans():
    c = _choose(lam=0.0)
    assert c.plan == Plan(("a", "b"), 0.6) and c.propensity == 1.0 and c.options == 3 and not c.explored
    # lam 0.2: a 0.30, a>a 0.29, a>b 0.22 -> a
    assert _choose(lam=0.2).plan == Plan.route("a")


def test_exploration_is_uniform_over_the_pareto_plans_with_its_probability():
    config = ExplorationConfig(epsilon=1.0)
    seen = {}
    for seed in range(60):
        c = _choose(lam=0.0, config=config, seed=seed)
        seen[c.plan] = c.propensity
    assert seen == {PLANS[0]: pytest.approx(1 / 3), PLANS[2]: pytest.approx(1 / 3), PLANS[3]: pytest.approx(1 / 3)}
    # epsilon 0.3: the greedy plan 0.7 + 0.1, each other 0.1
    c = _choose(lam=0.0, config=ExplorationConfig(epsilon=0.3))
    assert c.propensity == pytest.approx(0.8 if c.plan == PLANS[3] else 0.1)


def test_limits_restrict_the_plans():
    assert _choose(limits=RequestLimits(max_attempts=1)).plan == Plan.route("b")
    assert _choose(limits=RequestLimits(min_quality=0.7)).plan == Plan(("b", "b"), 0.8)
    assert _choose(limits=RequestLimits(pinned="a")).plan == Plan(("a", "a"), 0.6)
    # no plan accepts at >= 0.9: the best plan, its threshold raised to 0.9
    assert _choose(limits=RequestLimits(min_quality=0.9)).plan == Plan(("a", "b"), 0.9)
    # the model never plans candidate c: one draw of it
    assert _choose(limits=RequestLimits(pinned="c", min_quality=0.5)).plan == Plan(("c",), 0.5)
    with pytest.raises(CatimageError, match="max_attempts must be >= 1"):
        RequestLimits(max_attempts=0)


def test_route_choice_and_its_propensity():
    pred, costs = [0.5, 0.8, 0.9], [1.0, 2.0, 6.0]
    # lam 0.1: utilities 0.4, 0.6, 0.3 -> b
    c = choose_route(pred, costs, ["a", "b", "c"], 0.1, GREEDY, np.random.default_rng(0))
    assert c.plan == Plan.route("b") and c.propensity == 1.0 and c.expected_cost == 2.0
    # epsilon 0.3 with a cost cap of 3: c is never explored; b 0.7 + 0.15, a 0.15
    capped = ExplorationConfig(epsilon=0.3, max_cost=3.0)
    got = {choose_route(pred, costs, ["a", "b", "c"], 0.1, capped, np.random.default_rng(s)).plan.attempts[0]
           for s in range(50)}
    assert got == {"a", "b"}
