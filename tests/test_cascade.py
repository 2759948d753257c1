"""Cascade math: plan values and costs by hand on a 3-candidate table, against brute-force enumeration
of every joint draw, on planted always-pass / never-pass candidates, and the choice under lambda."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.policy.cascade import DrawStats, choose_plans, enumerate_plans, plan_values
from catimage.policy.plans import Plan, executed_attempts

# Hand table, one prompt, three candidates. Each draw is an atom (decision D, judge J):
#   a (cost 1): (0.9, 1.0) or (0.2, 0.2), each w.p. 1/2
#   b (cost 2): (0.95, 0.8) w.p. 4/5 or (0.3, 0.4) w.p. 1/5
#   c (cost 4): (0.9, 0.7) always
# Scorer cost .5, plan threshold .5. The grid .25/.5/.92 puts every atom of a different decision
# value in its own bin, so the formula's one approximation (ties inside a bin) does not arise.
GRID = [0.25, 0.5, 0.92]
COSTS = np.array([1.0, 2.0, 4.0])
S_COST = 0.5
NAN = np.nan
DEC = np.array([[[0.9, 0.2, NAN, NAN, NAN], [0.95, 0.95, 0.95, 0.95, 0.3], [0.9, NAN, NAN, NAN, NAN]]])
JUD = np.array([[[1.0, 0.2, NAN, NAN, NAN], [0.8, 0.8, 0.8, 0.8, 0.4], [0.7, NAN, NAN, NAN, NAN]]])

HAND = {  # plan -> (value, cost), worked out by hand
    Plan.route("a"): (0.6, 1.0),
    Plan.route("b"): (0.72, 2.0),  # .8 * .8 + .2 * .4
    Plan.route("c"): (0.7, 4.0),
    # a passes (1/2) -> 1.0; else b passes (4/5) -> .8; else both failed: b's .3 beats a's .2 -> .4
    Plan(("a", "b"), 0.5): (0.5 * 1.0 + 0.5 * (0.8 * 0.8 + 0.2 * 0.4), 1.5 + 0.5 * 2.5),
    Plan(("b", "a"), 0.5): (0.8 * 0.8 + 0.2 * (0.5 * 1.0 + 0.5 * 0.4), 2.5 + 0.2 * 1.5),
    Plan(("a", "a"), 0.5): (0.5 + 0.5 * (0.5 + 0.5 * 0.2), 1.5 + 0.5 * 1.5),
    Plan(("a", "c"), 0.5): (0.5 + 0.5 * 0.7, 1.5 + 0.5 * 4.5),
    Plan(("c", "a"), 0.5): (0.7, 4.5),  # c always passes: a is never drawn
    # best of (a, b): both drawn; the higher decision wins: (hi,hi) b .8, (hi,lo) a 1, (lo,hi) b .8, (lo,lo) b .4
    Plan(("a", "b"), None): (0.4 * 0.8 + 0.1 * 1.0 + 0.4 * 0.8 + 0.1 * 0.4, 4.0),
}


def _stats() -> DrawStats:
    return DrawStats.from_samples(["a", "b", "c"], DEC, JUD, GRID)


def test_enumerate_counts_every_plan_by_hand():
    plans = enumerate_plans(["a", "b", "c"], 2, [0.5])
    assert plans[:3] == [Plan.route("a"), Plan.route("b"), Plan.route("c")]
    assert len(plans) == 3 + 9  # 3 route plans + 3 x 3 ordered pairs (repeats allowed)
    assert len(enumerate_plans(["a", "b", "c"], 2, [0.5], distinct=True)) == 3 + 6
    assert len(enumerate_plans(["a", "b", "c"], 3, [0.5, 0.8, None])) == 3 + 9 * 3 + 27 * 3
    assert len(enumerate_plans(["a", "b", "c"], 3, [0.5], distinct=True)) == 3 + 6 + 6
    assert all(len(p.attempts) > 1 for p in plans[3:])  # no one-attempt plan with a threshold
    with pytest.raises(CatimageError):
        enumerate_plans([], 2, [0.5])


def test_plan_values_equal_the_hand_computation():
    plans = list(HAND)
    value, cost = plan_values(_stats(), plans, COSTS, S_COST)
    assert value.shape == cost.shape == (1, len(plans))
    for k, plan in enumerate(plans):
        assert (value[0, k], cost[0, k]) == pytest.approx(HAND[plan]), plan.label()


def test_choice_at_lambda_by_hand():
    plans = enumerate_plans(["a", "b", "c"], 2, [0.5])
    value, cost = plan_values(_stats(), plans, COSTS, S_COST)
    # utilities at lambda .1 (by hand): route a .5, route b .52, a>b .585, a>a .575, b>a .5, b>b .484, a>c .475
    assert plans[int(choose_plans(value, cost, 0.1)[0])] == Plan(("a", "b"), 0.5)
    # lambda 0: the best value, a > b (.86); lambda large: the cheapest plan, route a
    assert plans[int(choose_plans(value, cost, 0.0)[0])] == Plan(("a", "b"), 0.5)
    assert plans[int(choose_plans(value, cost, 100.0)[0])] == Plan.route("a")


def _brute_force(plan: Plan, atoms: dict[str, list[tuple[float, float, float]]], costs: dict[str, float]) -> tuple[float, float]:
    """Exact expectation over every joint draw (atoms: (probability, decision, judge))."""
    value = cost = 0.0
    for combo in itertools.product(*(atoms[a] for a in plan.attempts)):
        prob = float(np.prod([c[0] for c in combo]))
        drawn, ret = executed_attempts(plan, [c[1] for c in combo])
        value += prob * combo[ret][2]
        cost += prob * sum(costs[a] + (0 if plan.is_route else S_COST) for a in plan.attempts[:drawn])
    return value, cost


def test_plan_values_equal_brute_force_enumeration_on_random_tables():
    """With a grid at every decision value each bin holds one value, so the formula is exact: it must
    agree with enumerating every joint draw through the reference stop rule, for every plan of up to
    three attempts, best-of plans included."""
    rng = np.random.default_rng(7)
    names = ["a", "b", "c"]
    for _ in range(3):
        n_atoms = 3
        dec = rng.permutation(np.linspace(0.05, 0.95, 3 * n_atoms)).reshape(3, n_atoms)  # distinct values
        jud = rng.random((3, n_atoms))
        reps = rng.integers(1, 4, (3, n_atoms))  # atom multiplicities -> probabilities
        d = np.full((1, 3, reps.sum(axis=1).max()), np.nan)
        j = d.copy()
        atoms = {}
        for m in range(3):
            dd, jj = np.repeat(dec[m], reps[m]), np.repeat(jud[m], reps[m])
            d[0, m, : dd.size], j[0, m, : jj.size] = dd, jj
            atoms[names[m]] = [(r / reps[m].sum(), dv, jv) for r, dv, jv in zip(reps[m], dec[m], jud[m])]
        grid = np.sort(dec.ravel())
        plans = enumerate_plans(names, 3, [grid[3], grid[6], None])
        costs = rng.random(3) * 3
        value, cost = plan_values(DrawStats.from_samples(names, d, j, grid), plans, costs, S_COST)
        price = dict(zip(names, costs))
        for k, plan in enumerate(plans):
            assert (value[0, k], cost[0, k]) == pytest.approx(_brute_force(plan, atoms, price), abs=1e-12), plan.label()


def test_planted_always_pass_and_never_pass_candidates():
    # "never" always scores .1 (judge .3), "always" always .9 (judge .8); threshold .5
    dec = np.array([[[0.1, 0.1], [0.9, 0.9]]])
    jud = np.array([[[0.3, 0.3], [0.8, 0.8]]])
    stats = DrawStats.from_samples(["never", "always"], dec, jud, [0.5])
    plans = [Plan(("never", "always"), 0.5), Plan(("always", "never"), 0.5), Plan(("never", "never", "never"), 0.5)]
    value, cost = plan_values(stats, plans, np.array([1.0, 5.0]), 0.25)
    # never > always: both drawn, always accepted; always > never: accepted at once; never x 3: all fail, .3
    assert value[0] == pytest.approx([0.8, 0.8, 0.3])
    assert cost[0] == pytest.approx([1.25 + 5.25, 5.25, 3 * 1.25])


def test_plan_thresholds_must_be_on_the_grid_and_names_known():
    with pytest.raises(CatimageError, match="grid"):
        plan_values(_stats(), [Plan(("a", "b"), 0.6)], COSTS, S_COST)
    with pytest.raises(CatimageError, match="outside"):
        plan_values(_stats(), [Plan(("a", "z"), 0.5)], COSTS, S_COST)
    with pytest.raises(CatimageError, match="scorer"):
        plan_values(_stats(), [Plan.route("a")], COSTS, -1.0)


def test_stats_from_samples_by_hand_and_bins_partition_the_mean():
    st = _stats()
    # b: its .3 draw passes .25 only, its .95 draws (4 of 5) pass all three
    assert st.p_pass[0, 1] == pytest.approx([1.0, 0.8, 0.8])
    assert st.q_pass[0, 0, 1] == pytest.approx(1.0) and st.q_fail[0, 0, 1] == pytest.approx(0.2)
    pi, e = st.bins()
    assert pi.sum(axis=2) == pytest.approx(np.ones((1, 3)))
    assert e.sum(axis=2) == pytest.approx(st.q_mean)
    assert st.subset([0]).q_mean == pytest.approx(st.q_mean)


def test_moving_the_means_keeps_each_draws_shape():
    st = _stats()
    moved = st.with_means(st.q_mean + np.array([[0.1, -0.2, 0.0]]))
    assert moved.p_pass == pytest.approx(st.p_pass)
    assert moved.q_pass[0, 0] == pytest.approx(st.q_pass[0, 0] + 0.1) and moved.q_fail[0, 1] == pytest.approx(st.q_fail[0, 1] - 0.2)
    _pi, e = moved.bins()
    assert e.sum(axis=2) == pytest.approx(moved.q_mean)  # the bins still add up to the new mean
    # every plan's value moves by the returned draw's candidate shift: a > b @.5 returns a w.p. 1/2, else b
    value, _ = plan_values(moved, [Plan(("a", "b"), 0.5)], COSTS, S_COST)
    assert value[0, 0] == pytest.approx(HAND[Plan(("a", "b"), 0.5)][0] + 0.5 * 0.1 + 0.5 * -0.2)
