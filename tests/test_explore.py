"""Exploration with known propensities: probabilities by hand, draws that follow them, the cost cap,
determinism, and the budget held by the controller that sees realised costs."""

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.policy.budget import BudgetController, ControllerConfig, lambda_scale
from catimage.policy.explore import (
    ExplorationConfig,
    action_key,
    choice_probabilities,
    exploration_overhead,
    explore,
    greedy_choice,
)

U = np.array([[0.5, 0.7, 0.6], [0.2, 0.2, 0.1]])
C = np.array([1.0, 3.0, 2.0])


def test_epsilon_greedy_probabilities_by_hand():
    probs, greedy = choice_probabilities(U, C, ExplorationConfig(epsilon=0.3))
    # row 0: argmax is choice 1; row 1: choices 0 and 1 tie, the cheaper (0) wins.
    np.testing.assert_array_equal(greedy, [1, 0])
    np.testing.assert_allclose(probs, [[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])


def test_cost_cap_limits_what_exploration_draws_but_never_the_policys_own_pick():
    probs, _ = choice_probabilities(U, C, ExplorationConfig(epsilon=0.3, max_cost=2.0))
    # row 0: the pick (cost 3) stays allowed, so all three are; row 1: choice 1 (cost 3) is out.
    np.testing.assert_allclose(probs, [[0.1, 0.8, 0.1], [0.7 + 0.15, 0.0, 0.15]])


def test_softmax_probabilities_by_hand():
    probs, _ = choice_probabilities(U[:1], C, ExplorationConfig(epsilon=0.0, temperature=0.1))
    e = np.exp(np.array([5.0, 7.0, 6.0]))
    np.testing.assert_allclose(probs[0], e / e.sum())
    mixed, _ = choice_probabilities(U[:1], C, ExplorationConfig(epsilon=0.5, temperature=0.1))
    np.testing.assert_allclose(mixed[0], 0.5 * e / e.sum() + 0.5 / 3)


def test_draws_follow_the_probabilities_and_report_them():
    utility = np.tile(U, (20000, 1))
    ex = explore(utility, C, ExplorationConfig(epsilon=0.3), np.random.default_rng(1))
    for row, expected in ((0, [0.1, 0.8, 0.1]), (1, [0.8, 0.1, 0.1])):
        freq = np.bincount(ex.choice[row::2], minlength=3) / 20000
        se = np.sqrt(np.asarray(expected) * (1 - np.asarray(expected)) / 20000)
        assert (np.abs(freq - expected) < 4 * se).all()
    np.testing.assert_allclose(ex.propensity[0::2], np.where(ex.choice[0::2] == 1, 0.8, 0.1))
    assert ex.explored.mean() == pytest.approx(0.2, abs=0.01)  # 2/3 of epsilon lands off the pick


def test_same_seed_same_draws():
    utility = np.random.default_rng(0).normal(size=(500, 4))
    cfg = ExplorationConfig(epsilon=0.2)
    a = explore(utility, np.arange(4.0), cfg, np.random.default_rng(7))
    b = explore(utility, np.arange(4.0), cfg, np.random.default_rng(7))
    c = explore(utility, np.arange(4.0), cfg, np.random.default_rng(8))
    np.testing.assert_array_equal(a.choice, b.choice)
    assert (a.choice != c.choice).any()


def test_no_exploration_is_the_policy_with_propensity_one():
    ex = explore(U, C, ExplorationConfig(epsilon=0.0), np.random.default_rng(0))
    np.testing.assert_array_equal(ex.choice, greedy_choice(U, C))
    np.testing.assert_array_equal(ex.propensity, [1.0, 1.0])


def test_overhead_by_hand():
    probs, greedy = choice_probabilities(U, C, ExplorationConfig(epsilon=0.3))
    # row 0: 0.1*1 + 0.8*3 + 0.1*2 - 3 = -0.3; row 1: 0.8*1 + 0.1*3 + 0.1*2 - 1 = 0.3
    assert exploration_overhead(probs, greedy, C) == pytest.approx(0.0)
    assert exploration_overhead(probs[1:], greedy[1:], C) == pytest.approx(0.3)


def test_bad_settings_are_refused():
    with pytest.raises(CatimageError, match="epsilon"):
        ExplorationConfig(epsilon=1.5)
    with pytest.raises(CatimageError, match="temperature"):
        ExplorationConfig(temperature=0.0)
    with pytest.raises(CatimageError, match="finite"):
        choice_probabilities(np.array([[np.nan, 1.0]]), [1.0, 2.0], ExplorationConfig())


def test_the_controller_holds_the_budget_with_exploration_paid_from_realised_costs():
    """Exploration adds cost at a fixed lambda; the controller, fed every realised cost, raises lambda
    until the long-run mean is the budget again."""
    rng = np.random.default_rng(3)
    costs = np.array([1.0, 2.0, 4.0, 8.0])
    quality = rng.uniform(0.3, 1.0, size=(40000, 4)) + np.log(costs)[None, :] * 0.15
    budget = 2.5
    controller = BudgetController(ControllerConfig(budget=budget, window=500), lam_offline=0.0,
                                  scale=lambda_scale(quality, costs))
    cfg = ExplorationConfig(epsilon=0.2, max_cost=2 * budget)
    spent, explored, capped = [], 0, 0
    for i in range(quality.shape[0]):
        ex = explore(quality[i : i + 1] - controller.lam * costs, costs, cfg, rng)
        spent.append(costs[ex.choice[0]])
        explored += int(ex.explored[0])
        capped += int(ex.explored[0] and costs[ex.choice[0]] > cfg.max_cost)
        controller.observe([spent[-1]])
    spent = np.asarray(spent)
    assert explored > 0.1 * len(spent) and capped == 0
    assert abs(spent[10000:].mean() / budget - 1) < 0.05
    for window in np.split(spent[10000:], 6):  # and per window of 5,000 requests
        assert abs(window.mean() / budget - 1) < 0.05


def test_action_key_names_candidates_as_themselves():
    assert action_key("small-4") == "small-4"
    with pytest.raises(CatimageError, match="cannot name"):
        action_key(3)


def test_action_key_names_a_plan_exactly_and_a_route_plan_as_its_candidate():
    import json

    from catimage.policy.plans import Plan

    plan = Plan(("small-4", "small-4", "small-16-g3"), 0.8123456789)
    key = action_key(plan)
    assert Plan.from_dict(json.loads(key)) == plan  # exact to the threshold: no rounding in the name
    assert action_key(Plan.route("mini-8")) == "mini-8"
    assert action_key(Plan(("mini-8", "small-4"), 0.5)) != action_key(Plan(("small-4", "mini-8"), 0.5))
