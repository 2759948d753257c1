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
    lam, c, q = deferral_curve_arrays(pred, costs, pred)
    slopes = np.diff(q[::-1]) / np.diff(c[::-1])
    assert np.all(np.diff(slopes) <= 1e-9)


def test_curve_is_fast_at_paper_scale():
    import time

    rng = np.random.default_rng(0)
    pred = rng.random((5000, 12))
    t0 = time.perf_counter()
    curve = deferral_curve(pred, rng.random(12) * 3, pred)
    assert time.perf_counter() - t0 < 2.0
    assert len(curve) > 1000


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
