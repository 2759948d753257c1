"""The online budget controller (catimage.policy.budget) on planted streams, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from catimage.errors import BudgetError
from catimage.policy.budget import BudgetController, ControllerConfig, lambda_scale
from catimage.policy.routing import calibrate_lambda, route


def _planted(n: int, rng: np.random.Generator, hard_share: float) -> np.ndarray:
    """Two candidates, costs 1 and 3. Easy prompts gain little from the dear one (gain ~U(0, 0.2)),
    hard prompts a lot (~U(0.3, 0.7)): at lambda, a prompt goes dear iff its gain > 2 * lambda."""
    hard = rng.random(n) < hard_share
    gain = np.where(hard, rng.uniform(0.3, 0.7, n), rng.uniform(0.0, 0.2, n))
    return np.stack([np.full(n, 0.5), 0.5 + gain], axis=1)


COSTS = np.array([1.0, 3.0])


def _run(ctrl: BudgetController, pred: np.ndarray) -> np.ndarray:
    chosen = np.empty(pred.shape[0], dtype=np.int64)
    for i in range(pred.shape[0]):
        chosen[i] = route(pred[i : i + 1], COSTS, ctrl.lam)[0]
        ctrl.observe([COSTS[chosen[i]]])
    return chosen


def test_controller_holds_the_budget_after_a_shift_where_fixed_lambda_overshoots():
    rng = np.random.default_rng(0)
    budget = 1.6  # 30 % of requests on the dear candidate
    calib = _planted(4000, rng, hard_share=0.2)
    lam_offline = calibrate_lambda(calib, COSTS, budget)
    stream = np.concatenate([_planted(2000, rng, 0.2), _planted(3000, rng, 0.6)])
    fixed_cost = COSTS[route(stream[2000:], COSTS, lam_offline)].mean()
    # Hand computation: at lam_offline (between the easy gains' 2*lam range and the hard ones), 60 % hard
    # prompts all go dear -> mean cost >= 1 + 2 * 0.6 = 2.2, far above 1.6.
    assert fixed_cost > 2.1
    ctrl = BudgetController(ControllerConfig(budget=budget, window=200), lam_offline=lam_offline, scale=lambda_scale(calib, COSTS))
    chosen = _run(ctrl, stream)
    costs = COSTS[chosen]
    late = costs[2400:]  # two windows after the shift
    assert abs(late.mean() / budget - 1) < 0.03
    # The fixed point by hand: 30 % of all requests dear with 60 % hard ones means half the hard
    # prompts (gain ~U(0.3, 0.7)) go dear: 2 * lam = 0.5 -> lam = 0.25 (easy gains never exceed 0.4).
    assert ctrl.lam == pytest.approx(0.25, abs=0.04)
    state = ctrl.state()
    assert state["window_requests"] == 200 and state["observed"] == 5000
    assert state["window_mean_cost"] == pytest.approx(costs[-200:].mean())


def test_commit_then_observe_ends_where_observing_alone_does():
    """By hand (ki 0.5, kp 0, scale 1, budget 2, lambda 1): committing an expected cost 4 steps the
    integral by 0.5 x (4 - 2) / 2 = 0.5 at once; its realised 3 then steps by 0.5 x (3 - 4) / 2 =
    -0.25: 1.25, what observing 3 alone gives (1 + 0.5 x (3 - 2) / 2)."""
    cfg = ControllerConfig(budget=2.0, window=10, ki=0.5, kp=0.0, max_step=10.0)
    ff = BudgetController(cfg, lam_offline=1.0, scale=1.0)
    assert ff.commit([4.0]) == pytest.approx(1.5) and ff.state()["in_flight"] == 1
    assert ff.observe([3.0], expected=[4.0]) == pytest.approx(1.25)
    assert BudgetController(cfg, lam_offline=1.0, scale=1.0).observe([3.0]) == pytest.approx(1.25)
    assert ff.state()["in_flight"] == 0 and ff.state()["window_mean_cost"] == 3.0


def test_commitments_count_in_the_proportional_term_and_are_withdrawn():
    """By hand (ki 0, kp 1, scale 1, budget 2, lambda 1): realised 1 and 1 leave the window mean 1:
    lambda 1 + (1/2 - 1) = 0.5; committing 5 makes it (1 + 1 + 5) / 3 = 7/3: 1 + (7/6 - 1) = 7/6. A
    request whose cost cannot be measured withdraws its commitment: back to 0.5."""
    cfg = ControllerConfig(budget=2.0, window=10, ki=0.0, kp=1.0, max_step=10.0)
    ctrl = BudgetController(cfg, lam_offline=1.0, scale=1.0)
    assert ctrl.observe([1.0, 1.0]) == pytest.approx(0.5)
    assert ctrl.commit([5.0]) == pytest.approx(7 / 6)
    ctrl.observe([float("nan")], expected=[5.0])
    assert ctrl.lam == pytest.approx(0.5) and ctrl.in_flight == 0 and ctrl.observed == 2
    with pytest.raises(BudgetError, match="never committed"):
        ctrl.observe([1.0], expected=[1.0])
    with pytest.raises(BudgetError, match="one per request"):
        ctrl.observe([1.0, 2.0], expected=[1.0])
    with pytest.raises(BudgetError, match="expected cost"):
        ctrl.commit([float("inf")])


def _run_lagged(ctrl: BudgetController, pred: np.ndarray, lag: int, rng, feed_forward: bool) -> np.ndarray:
    """Each request's realised cost (its candidate's cost x U(0.5, 1.5)) reaches the controller `lag`
    requests after its decision; with feed-forward its expected cost is committed at decision time."""
    chosen, paid, spent = np.empty(pred.shape[0], dtype=np.int64), [], np.empty(pred.shape[0])
    for i in range(pred.shape[0]):
        chosen[i] = route(pred[i : i + 1], COSTS, ctrl.lam)[0]
        expected = float(COSTS[chosen[i]])
        spent[i] = expected * rng.uniform(0.5, 1.5)
        if feed_forward:
            ctrl.commit([expected])
        paid.append((spent[i], expected))
        if len(paid) > lag:
            c, e = paid.pop(0)
            ctrl.observe([c], expected=[e] if feed_forward else None)
    return spent


def test_feed_forward_holds_the_budget_when_costs_arrive_late():
    """The shifted stream of the first test, with costs reported 100 requests late: committed
    expected costs bring the controller to the same hand-computed fixed point (lambda 0.25), the
    late stream's mean cost within 3 % of the budget and every late window of 200 within 10 % (fed
    only the late realised costs, the same controller swings: windows up to 42 % off)."""
    rng = np.random.default_rng(1)
    budget = 1.6
    calib = _planted(4000, rng, hard_share=0.2)
    lam_offline = calibrate_lambda(calib, COSTS, budget)
    stream = np.concatenate([_planted(2000, rng, 0.2), _planted(3000, rng, 0.6)])
    cfg = ControllerConfig(budget=budget, window=200)
    ctrl = BudgetController(cfg, lam_offline=lam_offline, scale=lambda_scale(calib, COSTS))
    spent = _run_lagged(ctrl, stream, lag=100, rng=rng, feed_forward=True)
    assert abs(spent[2400:].mean() / budget - 1) < 0.03
    assert max(abs(spent[s : s + 200].mean() / budget - 1) for s in range(2400, 5000, 200)) < 0.10
    assert ctrl.lam == pytest.approx(0.25, abs=0.04)
    assert ctrl.in_flight == 100


def test_shift_moves_lambda_and_integral_and_keeps_the_window():
    """By hand (ki 0.5, kp 0, scale 1, budget 2, lambda 1): observing 3 gives 1.25; shifting by -0.5
    gives 0.75, and the integral moved with it: observing 2 (on budget) leaves 0.75. The window and
    counts are kept; a shift below 0 stops at 0."""
    cfg = ControllerConfig(budget=2.0, window=10, ki=0.5, kp=0.0, max_step=10.0)
    ctrl = BudgetController(cfg, lam_offline=1.0, scale=1.0)
    ctrl.observe([3.0])
    assert ctrl.shift(-0.5) == pytest.approx(0.75) and ctrl.lam_offline == pytest.approx(0.5)
    assert ctrl.observe([2.0]) == pytest.approx(0.75)
    assert ctrl.observed == 2 and ctrl.state()["window_mean_cost"] == pytest.approx(2.5)
    assert ctrl.shift(-5.0) == 0.0
    with pytest.raises(BudgetError, match="finite"):
        ctrl.shift(float("nan"))


def test_step_is_bounded_and_lambda_stays_in_range():
    cfg = ControllerConfig(budget=1.0, window=10, ki=5.0, kp=5.0, max_step=0.01, lam_cap_scales=3.0)
    ctrl = BudgetController(cfg, lam_offline=0.5, scale=2.0)
    previous = ctrl.lam
    for c in [100.0] * 50 + [0.0] * 500:
        lam = ctrl.observe([c])
        assert abs(lam - previous) <= 0.01 * 2.0 + 1e-12
        assert 0.0 <= lam <= 3.0 * 2.0
        previous = lam
    assert ctrl.lam == 0.0  # a long run of free requests walks lambda down to 0, never below


def test_unmeasurable_costs_are_ignored():
    ctrl = BudgetController(ControllerConfig(budget=2.0, window=5), lam_offline=0.1, scale=1.0)
    ctrl.observe([float("nan"), -1.0, float("inf")])
    assert ctrl.observed == 0 and ctrl.lam == 0.1 and ctrl.state()["window_mean_cost"] is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"budget": 0.0}, "positive"),
        ({"budget": float("nan")}, "positive"),
        ({"budget": 1.0, "window": 0}, "window"),
        ({"budget": 1.0, "ki": -1.0}, "ki"),
    ],
)
def test_bad_config_is_a_budget_error(kwargs, needle):
    with pytest.raises(BudgetError, match=needle):
        ControllerConfig(**kwargs)


def test_lambda_scale_is_quality_spread_over_cost_spread():
    pred = np.array([[0.0, 1.0]] * 50 + [[0.0, 0.0]] * 50)
    # 5th..95th percentile of all predictions: 0 .. 1; costs 1 .. 3 -> 0.5.
    assert lambda_scale(pred, COSTS) == pytest.approx(0.5)
    assert lambda_scale(np.zeros((3, 2)), COSTS) == 1.0  # no spread: a neutral scale, not 0
