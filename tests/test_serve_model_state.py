"""What a Router replica decides with (serve/model_state.py), in-process on planted bundles: which
policy and lambda a request gets, which budget controller its cost feeds, and the choice with
exploration. Expected values come from the planted tables (tests/serve_planted.py) by hand."""

from __future__ import annotations

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.policy.choice import RequestLimits
from catimage.policy.explore import ExplorationConfig
from catimage.policy.plans import Plan
from serve.model_state import (
    ModelState,
    cascade_choice,
    controller_key,
    explore_config,
    route_choice,
    split_controlled,
)
from serve.schemas import ExplorationArgs


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from serve_planted import fit_planted_model

    from serve.serving_model import load_serving_model

    root = tmp_path_factory.mktemp("state")
    cascade = fit_planted_model(root / "cascade", blank_pass=0.7, blank_judge=0.95, cascade=True)
    router = fit_planted_model(root / "router", blank_pass=0.0, blank_judge=0.95, cascade=False)
    return {"cascade": load_serving_model(cascade, {}, 0), "router": load_serving_model(router, {}, 0)}


def test_controller_keys_of_the_two_policies():
    assert controller_key("route", "*") == "*" and controller_key("cascade", "ops") == "cascade:ops"
    assert split_controlled({"*": 0.1, "ops": 0.2, "cascade:*": 0.3}) == ({"*": 0.1, "ops": 0.2}, {"*": 0.3})


def test_policies_and_lambdas_per_model(bundles):
    budgets = {"*": 3.0, "ops": 2.0}
    state = ModelState.build(bundles["cascade"], 3.0, None, None, budgets)
    assert state.default_policy == "cascade" and state.policies == ["route", "cascade"]
    # Controlled requests: each policy's own key, from its own offline lambda; the budget in force is the key's.
    lam, key, budget = state.resolve("cascade", None, None, "ops", controlled=True)
    assert key == "cascade:ops" and budget == 2.0
    assert lam == pytest.approx(bundles["cascade"].cascade.lambda_for_budget(2.0))
    lam, key, budget = state.resolve("route", None, None, "someone", controlled=True)
    assert key == "*" and budget == 3.0 and lam == pytest.approx(bundles["cascade"].router.lambda_for_budget(3.0))
    # Own lambda or pinned: no controller.
    assert state.resolve("cascade", None, 0.5, "ops", controlled=True)[1] is None
    assert state.resolve("route", None, None, "ops", controlled=False)[1] is None
    state.update_controlled({"cascade:*": 0.7, "*": 0.4, "unknown": 9.0})
    assert state.cascade_lambdas.controlled["*"] == 0.7 and state.route_lambdas.controlled["*"] == 0.4
    routing = ModelState.build(bundles["router"], None, None, None, None)
    assert routing.default_policy == "route" and routing.policies == ["route"]
    with pytest.raises(CatimageError, match="needs a cascade bundle"):
        routing.policy_for("cascade")
    with pytest.raises(CatimageError, match="needs a cascade bundle"):
        ModelState.build(bundles["router"], None, None, "cascade", None)


def test_the_choices_the_planted_bundles_make(bundles):
    """Router (blank never passes): blank 0.1 vs render 0.9 -> render at lambda 0. Cascade: blank then
    render (0.935 at cost ~1.8) beats render alone (0.9 at 2.0) at lambda 0 (module docstring of
    tests/test_serve_policy.py)."""
    greedy, rng = ExplorationConfig(epsilon=0.0), np.random.default_rng(0)
    prompt = ["two blue squares"]
    state = ModelState.build(bundles["router"], None, None, None, None)
    pred = state.predict(prompt)[0]
    costs = np.array([1.0, 2.0])
    assert route_choice(pred, costs, ["blank", "render"], 0.0, greedy, rng, None, None, None).plan == Plan.route("render")
    assert route_choice(pred, costs, ["blank", "render"], 0.0, greedy, rng, None, ["blank"], None).plan == Plan.route("blank")
    pinned = route_choice(pred, costs, ["blank", "render"], 0.0, greedy, rng, None, None, "blank")
    assert pinned.plan == Plan.route("blank") and pinned.propensity == 1.0
    cascade = ModelState.build(bundles["cascade"], None, None, None, None)
    value, cost = cascade.plan_values(prompt)
    plans = bundles["cascade"].cascade.plans
    choice = cascade_choice(value[0], cost[0], plans, 0.0, RequestLimits(), greedy, rng, None)
    assert choice.plan == Plan(("blank", "render"), 0.5)
    only_render = cascade_choice(value[0], cost[0], plans, 0.0, RequestLimits(), greedy, rng, ["render"])
    assert set(only_render.plan.attempts) == {"render"}


def test_exploration_cost_cap_comes_from_the_budget_in_force():
    args = ExplorationArgs(epsilon=0.1, max_cost_factor=2.0)
    assert explore_config(args, 3.0) == ExplorationConfig(epsilon=0.1, temperature=None, max_cost=6.0)
    assert explore_config(args, None).max_cost is None
    assert explore_config(ExplorationArgs(max_cost_factor=None), 3.0).max_cost is None
