"""Promotion: a planted better model is promoted, a planted worse one (or an equal one, or one judged on
too little traffic) is refused, each with its reasons; the decision is written beside the model."""

import json

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.evaluation.offpolicy import LoggedRequests, TargetPolicy, compare_policies
from catimage.model.promotion import Figure, PromotionEvidence, PromotionRule, decide_promotion, write_promotion

# Planted world: 4 prompt kinds x 3 candidates; mean decision score of each candidate per kind.
MU = np.array([[0.3, 0.6, 0.9], [0.7, 0.5, 0.4], [0.6, 0.8, 0.5], [0.2, 0.3, 0.8]])
COSTS = np.array([1.0, 1.5, 2.0])
LAM = 0.05
BEST = np.argmax(MU - LAM * COSTS, axis=1)  # [2, 0, 1, 2]
WORST = np.argmin(MU - LAM * COSTS, axis=1)
SERVING = np.array([1, 1, 1, 1])  # the model being served: always the middle candidate
EPS = 0.2


def _traffic(n: int, seed: int) -> tuple[LoggedRequests, np.ndarray]:
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, n)
    probs = np.full((n, 3), EPS / 3)
    probs[np.arange(n), SERVING[kind]] += 1 - EPS
    a = (probs.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1)
    ids = [f"r{i}" for i in range(n)]
    logged = LoggedRequests(ids, ids, ids, [str(k) for k in a], probs[np.arange(n), a],
                            MU[kind, a] + rng.normal(0, 0.15, n), COSTS[a], np.full(n, LAM), ["v1"] * n, "decider")
    return logged, kind


def _policy(name: str, picks: np.ndarray, kind: np.ndarray, model_noise: float = 0.1) -> TargetPolicy:
    n = kind.size
    probs = np.zeros((n, 3))
    probs[np.arange(n), picks[kind]] = 1.0
    model = MU[kind] + np.random.default_rng(9).normal(0, model_noise, (n, 3))  # an imperfect reward model
    return TargetPolicy(name, ["0", "1", "2"], probs, model, np.tile(COSTS, (n, 1)))


def _decide(picks: np.ndarray, n: int = 2000, **rule) -> tuple:
    logged, kind = _traffic(n, seed=4)
    ev = compare_policies(logged, _policy("candidate", picks, kind), _policy("serving", SERVING, kind), LAM, n_boot=400)
    return decide_promotion(ev, PromotionRule(**rule)), ev


def test_a_planted_better_model_is_promoted():
    decision, ev = _decide(BEST)
    truth = np.mean([MU[k, BEST[k]] - LAM * COSTS[BEST[k]] - MU[k, 1] + LAM * COSTS[1] for k in range(4)])
    assert ev.gain["utility"].low <= truth <= ev.gain["utility"].high  # the planted gain, 0.975 / 4
    assert decision.promote, decision.reasons
    assert all(r.startswith("ok:") for r in decision.reasons)


def test_a_planted_worse_model_is_refused_with_its_reason():
    decision, ev = _decide(WORST)
    assert ev.gain["utility"].high < 0
    assert not decision.promote
    assert any(r.startswith("failed: utility gain") for r in decision.reasons)


def test_the_same_model_is_refused_no_win_no_swap():
    decision, _ = _decide(SERVING)
    assert not decision.promote


def test_too_little_traffic_is_refused_even_when_better():
    decision, _ = _decide(BEST, n=2000, min_requests=5000)
    assert not decision.promote
    assert any("held-out requests (need >= 5000)" in r for r in decision.reasons)


def test_a_model_that_wins_by_overspending_is_refused():
    decision, ev = _decide(BEST, budget=1.2)  # BEST spends ~1.6 on average
    assert ev.candidate["cost"].value > 1.5
    assert not decision.promote and any("budget" in r and r.startswith("failed") for r in decision.reasons)


def test_concentrated_weights_are_refused():
    f = Figure(0.5, 0.4, 0.6)
    ev = PromotionEvidence(1000, LAM, "dr", 0.95, {"quality": f, "cost": f, "utility": f},
                           {"quality": f, "cost": f, "utility": f}, {"quality": f, "cost": f, "utility": f}, 10.0)
    decision = decide_promotion(ev)
    assert not decision.promote and any("effective sample size" in r for r in decision.reasons)


def test_the_decision_is_written_beside_the_model(tmp_path):
    decision, _ = _decide(BEST)
    path = write_promotion(decision, tmp_path / "model", model_version="v2")
    doc = json.loads(path.read_text())
    assert doc["decision"] == "promote" and doc["model_version"] == "v2"
    assert doc["evidence"]["gain"]["utility"]["low"] == pytest.approx(decision.evidence.gain["utility"].low)


def test_bad_rules_are_refused():
    with pytest.raises(CatimageError, match="min_requests"):
        PromotionRule(min_requests=0)
    with pytest.raises(CatimageError, match="budget"):
        PromotionRule(budget=-1.0)
