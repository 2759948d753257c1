"""Off-policy estimators: a hand-computed example, a planted bandit whose answer is known (unbiasedness,
a huge sample, interval coverage), paired comparisons, and requests read back from a real served log."""

from datetime import UTC, datetime

import numpy as np
import pytest

from catimage.errors import CatimageError, TableError
from catimage.evaluation.offpolicy import (
    LoggedRequests,
    TargetPolicy,
    compare_policies,
    evaluate_policy,
    logged_requests,
)
from catimage.tables.served_log import LogConfig, ServedLogWriter, ServedRow, read_served_log


def _logged(actions, propensity, reward, cost) -> LoggedRequests:
    n = len(actions)
    ids = [f"r{i}" for i in range(n)]
    return LoggedRequests(ids, ids, [f"prompt {i}" for i in range(n)], list(actions), np.asarray(propensity, float),
                          np.asarray(reward, float), np.asarray(cost, float), np.full(n, np.nan), ["v1"] * n, "decider")


HAND = _logged(["A", "B", "A", "B"], [0.8, 0.2, 0.5, 0.5], [1.0, 0.0, 0.5, 1.0], [1.0, 3.0, 1.0, 3.0])
ALWAYS_A = TargetPolicy("always A", ["A", "B"], np.tile([1.0, 0.0], (4, 1)), np.tile([0.6, 0.4], (4, 1)),
                        np.tile([1.0, 3.0], (4, 1)))


def test_estimators_by_hand():
    r = evaluate_policy(HAND, ALWAYS_A, lam=0.1, n_boot=50)
    # w = [1/0.8, 0, 1/0.5, 0]
    assert r.figures["ips"]["quality"].value == pytest.approx((1.25 * 1.0 + 2 * 0.5) / 4)
    assert r.figures["ips"]["cost"].value == pytest.approx((1.25 + 2.0) / 4)
    assert r.figures["snips"]["quality"].value == pytest.approx(2.25 / 3.25)
    assert r.figures["snips"]["cost"].value == pytest.approx(1.0)
    assert r.figures["dm"]["quality"].value == pytest.approx(0.6)
    # DR: 0.6 + w (r - 0.6) on the A rows, 0.6 on the B rows
    assert r.figures["dr"]["quality"].value == pytest.approx((1.1 + 0.6 + 0.4 + 0.6) / 4)
    assert r.figures["dr"]["cost"].value == pytest.approx(1.0)
    assert r.figures["dr"]["utility"].value == pytest.approx(0.675 - 0.1)
    assert r.figures["ips"]["utility"].value == pytest.approx(0.5625 - 0.1 * 0.8125)
    assert r.logging["quality"].value == pytest.approx(0.625) and r.logging["cost"].value == pytest.approx(2.0)
    assert r.match_rate == pytest.approx(0.5)
    assert r.effective_sample_size == pytest.approx(3.25**2 / (1.25**2 + 2**2))


# --- a planted bandit ----------------------------------------------------------------------------

MU = np.array([[0.2, 0.5, 0.9], [0.6, 0.4, 0.3], [0.5, 0.8, 0.7]])  # mean reward of action a in context x
COSTS = np.array([1.0, 2.0, 4.0])
LOGGING_PICK = np.array([0, 0, 1])
TARGET_PICK = np.array([2, 0, 1])
EPS = 0.3
TRUE_QUALITY = float(np.mean(MU[np.arange(3), TARGET_PICK]))  # (0.9 + 0.6 + 0.8) / 3
TRUE_COST = float(np.mean(COSTS[TARGET_PICK]))  # (4 + 1 + 2) / 3


def _bandit(n: int, rng: np.random.Generator, model_bias: float = 0.3) -> tuple[LoggedRequests, TargetPolicy]:
    x = rng.integers(0, 3, n)
    probs_log = np.full((n, 3), EPS / 3)
    probs_log[np.arange(n), LOGGING_PICK[x]] += 1 - EPS
    a = (probs_log.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1)
    reward = MU[x, a] + rng.normal(0, 0.2, n)
    logged = _logged([str(k) for k in a], probs_log[np.arange(n), a], reward, COSTS[a])
    target = np.zeros((n, 3))
    target[np.arange(n), TARGET_PICK[x]] = 1.0
    wrong_model = MU[x] + model_bias  # DR must stay unbiased with a reward model that is off
    return logged, TargetPolicy("target", ["0", "1", "2"], target, wrong_model, np.tile(COSTS, (n, 1)))


def test_a_huge_sample_recovers_the_planted_value():
    logged, target = _bandit(200_000, np.random.default_rng(0))
    r = evaluate_policy(logged, target, lam=0.0, n_boot=20)
    for est in ("ips", "snips", "dr"):
        assert r.figures[est]["quality"].value == pytest.approx(TRUE_QUALITY, abs=0.01), est
        assert r.figures[est]["cost"].value == pytest.approx(TRUE_COST, abs=0.03), est
    assert r.figures["dm"]["quality"].value == pytest.approx(TRUE_QUALITY + 0.3, abs=0.01)  # DM inherits the bias


def test_ips_and_dr_are_unbiased_and_their_intervals_cover():
    rng = np.random.default_rng(1)
    reps, est, cover = 300, {"ips": [], "dr": []}, {"ips": 0, "dr": 0}
    for _ in range(reps):
        logged, target = _bandit(300, rng)
        r = evaluate_policy(logged, target, lam=0.0, n_boot=300, seed=int(rng.integers(1 << 30)))
        for name, values in est.items():
            f = r.figures[name]["quality"]
            values.append(f.value)
            cover[name] += f.low <= TRUE_QUALITY <= f.high
    for name, values in est.items():
        values = np.asarray(values)
        assert abs(values.mean() - TRUE_QUALITY) < 3 * values.std(ddof=1) / np.sqrt(reps), name
        assert 0.89 <= cover[name] / reps <= 0.99, (name, cover[name] / reps)


def test_a_policy_compared_with_itself_gains_exactly_nothing():
    logged, target = _bandit(500, np.random.default_rng(2))
    ev = compare_policies(logged, target, target, lam=0.05, n_boot=100)
    for q in ("quality", "cost", "utility"):
        assert ev.gain[q].value == 0.0 and ev.gain[q].low == 0.0 and ev.gain[q].high == 0.0


def test_a_bad_target_is_refused():
    with pytest.raises(CatimageError, match="probability distribution"):
        TargetPolicy("t", ["A", "B"], [[0.5, 0.6]])
    with pytest.raises(CatimageError, match="rows"):
        evaluate_policy(HAND, TargetPolicy("t", ["A", "B"], [[1.0, 0.0]]))


def test_requests_from_a_served_log_of_cascades(tmp_path):
    t = datetime(2026, 12, 5, 10, tzinfo=UTC)
    plan = '{"attempts":["small","big"],"threshold":0.8}'

    def row(rid, attempt, cand, score, returned, prop=0.5, plan=plan):
        return ServedRow(prompt_id="p" + rid, prompt=f"prompt {rid}", candidate=cand, seed=attempt, request_id=rid,
                         pool_cost={"small": 1.0, "big": 4.0}[cand], decision_cost=0.1, attempt=attempt,
                         returned=returned, propensity=prop, plan=plan, policy="cascade", scores={"decider": score},
                         time=t)

    with ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider",))) as writer:
        writer.append([
            row("a", 0, "small", 0.5, False), row("a", 1, "big", 0.9, True),  # escalated
            row("b", 0, "small", 0.85, True),  # accepted at once
            row("c", 0, "small", None, True, prop=0.9, plan="small"),  # unscored: left out
        ])
    logged = logged_requests(read_served_log(str(tmp_path)), "decider")
    assert logged.request_ids == ["a", "b"]
    np.testing.assert_allclose(logged.reward, [0.9, 0.85])
    np.testing.assert_allclose(logged.cost, [1.0 + 4.0 + 0.2, 1.1])
    assert logged.actions == [plan, plan] and list(logged.propensity) == [0.5, 0.5]
    with pytest.raises(TableError, match="lacks column"):
        logged_requests(read_served_log(str(tmp_path)), "judge")
