"""The routing math on hand-computed cases and invariants on random data."""

from __future__ import annotations

import numpy as np
import pytest

from catimage.errors import BudgetError, CatimageError
from catimage.policy.routing import (
    calibrate_lambda,
    cost_to_reach,
    deferral_curve,
    deferral_curve_arrays,
    interpolate_curve,
    mixture_hull,
    route,
)

# Hand example used across tests: 2 prompts, 3 candidates with costs 1, 2, 4.
#   prompt A: pred (1,.2) (2,.5) (4,.6) -> concave; switches 2->1 at lam .05, 1->0 at lam .3
#   prompt B: pred (1,.1) (2,.15) (4,.9) -> the middle point lies under the hull; switches 2->0 at .8/3
COSTS = np.array([1.0, 2.0, 4.0])
PRED = np.array([[0.2, 0.5, 0.6], [0.1, 0.15, 0.9]])
TRUE = np.array([[0.3, 0.4, 0.7], [0.2, 0.6, 1.0]])


def _mean_cost(choice: np.ndarray, costs: np.ndarray) -> float:
    return float(costs[choice].mean())


# --- route --------------------------------------------------------------------------------------


def test_route_rule_on_hand_example():
    assert route(PRED, COSTS, 0.0).tolist() == [2, 2]
    assert route(PRED, COSTS, 0.1).tolist() == [1, 2]  # A: .5-.2=.3 beats .6-.4=.2 and .2-.1=.1
    assert route(PRED, COSTS, 0.28).tolist() == [1, 0]  # B: .1-.28=-.18 beats .9-1.12=-.22
    assert route(PRED, COSTS, 10.0).tolist() == [0, 0]
    assert route(PRED, COSTS, np.inf).tolist() == [0, 0]


def test_route_ties_go_to_cheaper_then_lower_index():
    # equal predictions, the cheaper one (index 1) wins
    assert route([[1.0, 1.0]], [2.0, 1.0], 0.0).tolist() == [1]
    # equal predictions and equal cost: lower index
    assert route([[1.0, 1.0, 1.0]], [1.0, 1.0, 2.0], 0.0).tolist() == [0]
    # exact utility tie at lam = .5: .5 - .5*1 == 1.0 - .5*2 == 0
    assert route([[0.5, 1.0]], [1.0, 2.0], 0.5).tolist() == [0]
    assert route([[0.5, 1.0]], [1.0, 2.0], 0.25).tolist() == [1]
    # lam = inf among equally cheap candidates: the better predicted one
    assert route([[0.1, 0.3, 0.9]], [1.0, 1.0, 5.0], np.inf).tolist() == [1]


def test_route_at_zero_is_argmax():
    rng = np.random.default_rng(1)
    pred = rng.random((300, 7))
    costs = rng.random(7) * 5
    assert np.array_equal(route(pred, costs, 0.0), pred.argmax(axis=1))


@pytest.mark.parametrize(
    ("pred", "costs", "lam", "match"),
    [
        (np.zeros((3, 2)), [1.0, 2.0, 3.0], 0.0, "2 candidate column"),
        (np.array([[0.1, np.nan]]), [1.0, 2.0], 0.0, "NaN"),
        (np.zeros((2, 2)), [1.0, -2.0], 0.0, ">= 0"),
        (np.zeros((2, 2)), [1.0, np.inf], 0.0, "finite"),
        (np.zeros(3), [1.0, 2.0, 3.0], 0.0, "2-D"),
    ],
)
def test_route_bad_input(pred, costs, lam, match):
    with pytest.raises(CatimageError, match=match):
        route(pred, costs, lam)


def test_route_bad_lambda():
    with pytest.raises(BudgetError, match=">= 0"):
        route(PRED, COSTS, -0.1)
    with pytest.raises(BudgetError):
        route(PRED, COSTS, float("nan"))


# --- calibration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "lam"),
    [(4.0, 0.0), (5.0, 0.0), (3.5, 0.05), (3.0, 0.05), (2.0, 0.8 / 3), (1.5, 0.8 / 3), (1.2, 0.3), (1.0, 0.3)],
)
def test_calibrate_hand_example(budget, lam):
    got = calibrate_lambda(PRED, COSTS, budget)
    assert got == pytest.approx(lam, rel=1e-9, abs=1e-12)
    assert _mean_cost(route(PRED, COSTS, got), COSTS) <= budget
    if got > 0:  # the smallest such lambda: a hair less overspends
        assert _mean_cost(route(PRED, COSTS, got * (1 - 1e-9)), COSTS) > budget


def test_calibrate_budget_below_cheapest():
    with pytest.raises(BudgetError, match=r"cheapest candidate's cost 1"):
        calibrate_lambda(PRED, COSTS, 0.99)
    with pytest.raises(BudgetError, match="number"):
        calibrate_lambda(PRED, COSTS, "lots")


def test_calibrate_random_budgets_are_met_minimally():
    rng = np.random.default_rng(7)
    n, m = 400, 6
    costs = np.array([0.0026, 0.35, 1.0, 1.5, 2.0, 3.0])
    pred = 3 + rng.normal(size=(n, m)) * 0.5 + np.log1p(costs)  # dearer is better on average
    for budget in [0.0026, 0.01, 0.1, 0.5, 1.0, 1.7, 2.5, 3.0]:
        lam = calibrate_lambda(pred, costs, budget)
        assert _mean_cost(route(pred, costs, lam), costs) <= budget + 1e-12
        if lam > 0:
            assert _mean_cost(route(pred, costs, lam * (1 - 1e-9)), costs) > budget


def test_calibrate_exactly_at_cheapest_with_ties_in_cost():
    pred = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1]])
    costs = np.array([2.0, 0.5, 0.5])
    lam = calibrate_lambda(pred, costs, 0.5)
    assert np.isfinite(lam)
    assert set(route(pred, costs, lam).tolist()) <= {1, 2}


# --- the exact deferral curve -------------------------------------------------------------------


def test_curve_breakpoints_by_hand():
    curve = deferral_curve(PRED, COSTS, TRUE)
    assert [p.lam for p in curve] == pytest.approx([0.0, 0.05, 0.8 / 3, 0.3])
    assert [p.cost for p in curve] == pytest.approx([4.0, 3.0, 1.5, 1.0])
    # A: 2,1,1,0  B: 2,2,0,0 -> true quality (.7+1)/2, (.4+1)/2, (.4+.2)/2, (.3+.2)/2
    assert [p.quality for p in curve] == pytest.approx([0.85, 0.7, 0.3, 0.25])


def test_oracle_curve_by_hand():
    # A (1,.3) (2,.4) (4,.7): middle under the hull, 2->0 at .4/3; B concave: 2->1 at .2, 1->0 at .4
    curve = deferral_curve(TRUE, COSTS, TRUE)
    assert [p.lam for p in curve] == pytest.approx([0.0, 0.4 / 3, 0.2, 0.4])
    assert [p.cost for p in curve] == pytest.approx([4.0, 2.5, 1.5, 1.0])
    assert [p.quality for p in curve] == pytest.approx([0.85, 0.65, 0.45, 0.25])


def test_simultaneous_switches_share_one_point():
    pred = np.array([[0.0, 1.0], [0.0, 1.0]])
    curve = deferral_curve(pred, [1.0, 2.0], pred)
    assert [(p.lam, p.cost, p.quality) for p in curve] == [(0.0, 2.0, 1.0), (1.0, 1.0, 0.0)]


def test_collinear_points_switch_straight_to_cheapest():
    # (1,0) (2,.5) (3,1): all on one line of slope .5; at lam .5 all tie and the cheapest wins
    curve = deferral_curve([[0.0, 0.5, 1.0]], [1.0, 2.0, 3.0], [[0.0, 0.5, 1.0]])
    assert [(p.lam, p.cost) for p in curve] == [(0.0, 3.0), (0.5, 1.0)]


def test_single_candidate_curve_is_one_point():
    curve = deferral_curve([[0.3], [0.5]], [2.0], [[1.0], [0.0]])
    assert len(curve) == 1
    assert (curve[0].lam, curve[0].cost, curve[0].quality) == (0.0, 2.0, 0.5)


def test_curve_matches_brute_force_route_everywhere():
    """Every change of any prompt's choice happens at a pairwise crossing; check just after each."""
    rng = np.random.default_rng(3)
    n, m = 30, 5
    costs = rng.random(m) * 4 + 0.1
    pred = rng.random((n, m)) + 0.3 * costs
    true = pred + rng.normal(0, 0.2, (n, m))
    lam, cost, qual = deferral_curve_arrays(pred, costs, true)
    assert np.all(np.diff(lam) > 0) and np.all(np.diff(cost) < 0)
    dp = pred[:, :, None] - pred[:, None, :]
    dc = costs[:, None] - costs[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = (dp / dc).ravel()
    probes = np.concatenate([[0.0], cross[np.isfinite(cross) & (cross > 0)] * (1 + 1e-9), [1e6]])
    for probe in probes:
        k = np.searchsorted(lam, probe, side="right") - 1
        choice = route(pred, costs, probe)
        assert cost[k] == pytest.approx(costs[choice].mean(), rel=1e-12)
        assert qual[k] == pytest.approx(true[np.arange(n), choice].mean(), rel=1e-9)


def test_curve_invariants_random():
    rng = np.random.default_rng(11)
    n, m = 500, 8
    costs = np.sort(rng.random(m) * 3 + 0.01)
    true = rng.random((n, m)) + np.linspace(0, 0.4, m)
    pred = true + rng.normal(0, 0.4, (n, m))
    router = deferral_curve(pred, costs, true)
    oracle = deferral_curve(true, costs, true)
    rows = np.arange(n)
    best_pred, cheapest = route(pred, costs, 0.0), route(pred, costs, np.inf)
    assert router[0].cost == pytest.approx(costs[best_pred].mean())
    assert router[0].quality == pytest.approx(true[rows, best_pred].mean())
    assert router[-1].cost == pytest.approx(costs.min())
    assert router[-1].quality == true[rows, cheapest].mean()  # recomputed directly: exact
    grid = np.linspace(costs.min(), costs.max() * 1.2, 400)
    q_router, q_oracle = interpolate_curve(router, grid), interpolate_curve(oracle, grid)
    assert np.all(q_oracle >= q_router - 1e-9)
    hull = mixture_hull(costs, true.mean(axis=0))
    assert np.all(q_oracle >= interpolate_curve(hull, grid) - 1e-9)
    # the router's own predicted curve is concave in cost (it is the Lagrangian frontier)
    _lam, c, q = deferral_curve_arrays(pred, costs, pred)
    slopes = np.diff(q[::-1]) / np.diff(c[::-1])
    assert np.all(np.diff(slopes) <= 1e-9)


def test_curve_at_paper_scale_is_exact_and_linear_in_switches():
    """Scale/complexity instead of a wall clock (timings: benchmarks/policy_speed.py): on 5,000 prompts x
    12 candidates the sweep produces at most one point per (prompt, hull edge) plus the start, and every
    point equals routing at its lambda, computed independently by brute force."""
    rng = np.random.default_rng(0)
    n, m = 5000, 12
    pred, costs = rng.random((n, m)), rng.random(m) * 3
    lam, cost, qual = deferral_curve_arrays(pred, costs, pred)
    assert 1000 < lam.size <= n * (m - 1) + 1
    rows = np.arange(n)
    for k in rng.choice(lam.size - 1, 6, replace=False):
        # the router at lambda_k holds on [lambda_k, lambda_k+1): read it in the middle, where no float
        # rounding of an exact tie can matter
        util = pred - (lam[k] + lam[k + 1]) / 2 * costs
        pick = np.array([min(range(m), key=lambda j: (-util[i, j], costs[j], j)) for i in range(n)])
        assert cost[k] == pytest.approx(costs[pick].mean(), rel=1e-9)
        assert qual[k] == pytest.approx(pred[rows, pick].mean(), rel=1e-9)


# --- per-prompt costs (the cascade's plans) -------------------------------------------------------


def _brute_route(pred: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """argmax of pred - lam * cost per prompt, ties to the cheaper then the lower index, one by one."""
    return np.array([min(range(pred.shape[1]), key=lambda j: (-(pred[i, j] - lam * costs[i, j]), costs[i, j], j))
                     for i in range(pred.shape[0])])


def test_route_with_per_prompt_costs_matches_brute_force():
    rng = np.random.default_rng(3)
    pred = np.round(rng.random((60, 9)), 1)  # rounded: many exact ties
    costs = np.round(rng.random((60, 9)) * 4, 1)
    for lam in (0.0, 0.05, 0.25, 1.0, 7.0):
        assert np.array_equal(route(pred, costs, lam), _brute_route(pred, costs, lam))
    cheapest = route(pred, costs, np.inf)
    assert np.array_equal(costs[np.arange(60), cheapest], costs.min(axis=1))


def test_per_prompt_cost_sweep_equals_brute_force_over_a_lambda_grid():
    rng = np.random.default_rng(4)
    n, m = 40, 30
    pred, costs = rng.random((n, m)), rng.random((n, m)) * 5
    quality, paid = rng.random((n, m)), rng.random((n, m)) * 5  # what a plan realises differs from the prediction
    lam, cost, qual = deferral_curve_arrays(pred, costs, quality, realized_cost=paid)
    assert np.all(np.diff(lam) > 0) and lam[0] == 0.0
    rows = np.arange(n)
    # every point is the rule on [lambda_k, lambda_k+1) (read in the middle: no rounding at exact ties)
    for k in range(lam.size):
        at = (lam[k] + lam[k + 1]) / 2 if k + 1 < lam.size else lam[k] * 2 + 1
        pick = _brute_route(pred, costs, at)
        assert cost[k] == pytest.approx(paid[rows, pick].mean(), abs=1e-9)
        assert qual[k] == pytest.approx(quality[rows, pick].mean(), abs=1e-9)
    # a grid of lambdas finds no average cost the curve lacks
    seen = {round(c, 9) for c in cost}
    for at in np.geomspace(1e-4, 1e3, 300):
        assert round(float(paid[rows, _brute_route(pred, costs, at)].mean()), 9) in seen


def test_per_prompt_costs_equal_to_one_vector_give_routing_curve():
    rng = np.random.default_rng(5)
    pred, true, costs = rng.random((50, 6)), rng.random((50, 6)), rng.random(6) * 2
    one = deferral_curve_arrays(pred, costs, true)
    many = deferral_curve_arrays(pred, np.tile(costs, (50, 1)), true)
    for a, b in zip(one, many):
        assert a == pytest.approx(b, abs=1e-12)


def test_calibration_with_per_prompt_costs_meets_the_budget_and_is_the_smallest():
    rng = np.random.default_rng(6)
    pred, costs = rng.random((80, 25)), rng.random((80, 25)) * 4
    rows = np.arange(80)
    for budget in (costs.min(axis=1).mean(), 0.8, 1.3, 2.0, 10.0):
        lam = calibrate_lambda(pred, costs, budget)
        assert np.isfinite(lam)
        assert costs[rows, _brute_route(pred, costs, lam)].mean() <= budget + 1e-9
        if lam > 0:  # any smaller lambda overspends
            assert costs[rows, _brute_route(pred, costs, lam * (1 - 1e-6))].mean() > budget
    with pytest.raises(BudgetError, match="cheapest options"):
        calibrate_lambda(pred, costs, costs.min(axis=1).mean() * 0.99)


def test_calibration_is_finite_where_hull_slopes_overflow():
    """Issue 15: calibrate_lambda could return inf (and decide then made NaN utilities). Costs a
    subnormal apart make the hull slope overflow to inf, so the sweep never reaches the cheapest
    candidate; a budget at the cheapest cost must still give a finite lambda that meets it."""
    pred = np.array([[0.0, 0.5], [0.1, 0.9]])
    costs = np.array([0.0, 1e-320])
    lam = calibrate_lambda(pred, costs, 0.0)
    assert np.isfinite(lam) and lam >= 0
    assert costs[route(pred, costs, lam)].mean() <= 1e-12 * 1.0  # the budget, within its stated tolerance


def test_curve_rejects_nan_labels():
    with pytest.raises(CatimageError, match="NaN"):
        deferral_curve(PRED, COSTS, np.array([[0.3, np.nan, 0.7], [0.2, 0.6, 1.0]]))
    with pytest.raises(CatimageError, match="prompt row"):
        deferral_curve(PRED, COSTS, TRUE[:1])


# --- hull and curve reading ---------------------------------------------------------------------


def test_hull_by_hand_excludes_dominated_and_under_hull_points():
    costs = [1.0, 2.0, 3.0, 4.0, 2.5]
    qual = [0.5, 0.6, 0.9, 0.8, 0.55]
    hull = mixture_hull(costs, qual)
    # (2,.6) lies under the segment (1,.5)-(3,.9); (4,.8) and (2.5,.55) are dominated
    assert [(p.cost, p.quality, p.index) for p in hull] == [(1.0, 0.5, 0), (3.0, 0.9, 2)]


def test_hull_keeps_concave_vertices_and_picks_best_among_equal_costs():
    hull = mixture_hull([1.0, 1.0, 2.0, 4.0], [0.2, 0.3, 0.6, 0.7])
    assert [p.index for p in hull] == [1, 2, 3]
    # best quality tie: the cheaper one ends the hull
    assert [p.index for p in mixture_hull([1.0, 2.0, 3.0], [0.1, 0.5, 0.5])] == [0, 1]


def test_interpolate_linear_and_step():
    pts = [{"cost": 1.0, "quality": 0.2}, {"cost": 3.0, "quality": 0.6}]
    assert interpolate_curve(pts, 2.0) == pytest.approx(0.4)
    assert interpolate_curve(pts, 2.0, kind="step") == pytest.approx(0.2)
    assert np.isnan(interpolate_curve(pts, 0.5))
    assert interpolate_curve(pts, 10.0) == pytest.approx(0.6)
    assert interpolate_curve(pts, 3.0, kind="step") == pytest.approx(0.6)


def test_cost_to_reach():
    curve = deferral_curve(PRED, COSTS, TRUE)  # (1,.25) (1.5,.3) (3,.7) (4,.85)
    assert cost_to_reach(curve, 0.5) == pytest.approx(2.25)
    assert cost_to_reach(curve, 0.85) == pytest.approx(4.0)
    assert cost_to_reach(curve, 0.1) == pytest.approx(1.0)
    assert cost_to_reach(curve, 0.9) is None


def test_interpolation_at_the_cheapest_cost_ignores_summation_rounding():
    """The all-cheapest end of a curve is a mean of n equal costs, which may round an ulp upward."""
    from catimage.policy.routing import CurvePoint

    c = 0.0026
    mean_of_equal = float(np.mean(np.full(53, c)))
    points = [CurvePoint(lam=1.0, cost=max(mean_of_equal, np.nextafter(c, 1.0)), quality=2.0),
              CurvePoint(lam=0.0, cost=3.0, quality=4.0)]
    assert interpolate_curve(points, c) == pytest.approx(2.0)
    assert np.isnan(interpolate_curve(points, c * 0.5))
