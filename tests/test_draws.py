"""The per-draw view of a table and the k-NN draw estimator, on hand tables and planted signals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.base import clone

from catimage.errors import TableError
from catimage.estimators.base import EstimatorError
from catimage.estimators.draws import DrawEstimator, load_draw_estimator
from catimage.tables.draws import cascade_inputs, draws_from_table
from catimage.tables.pool import Pool


def _table() -> pa.Table:
    # prompt p1: cheap has seeds 1, 0 (out of order), dear seed 0 only; prompt p2: both seeds 0 and 1
    return pa.table({
        "prompt_id": ["p1", "p1", "p1", "p2", "p2", "p2", "p2", "p1"],
        "prompt": ["one", "one", "one", "two", "two", "two", "two", "one"],
        "candidate": ["cheap", "cheap", "dear", "cheap", "cheap", "dear", "dear", "other"],
        "seed": [1, 0, 0, 0, 1, 1, 0, 0],
        "score": [0.2, 0.1, 0.5, 0.3, 0.4, 0.8, 0.7, 0.9],
        "decider": [0.25, 0.15, 0.55, 0.35, 0.45, 0.85, 0.75, 0.95],
    })


def test_draws_by_hand():
    d = draws_from_table(_table(), ["cheap", "dear"], "decider", "score")
    assert d.prompt_ids == ["p1", "p2"] and d.prompts == ["one", "two"] and d.n_seeds == 2
    assert d.judge[0, 0].tolist() == [0.1, 0.2]  # seeds sorted: 0 then 1
    assert d.decision[0, 0].tolist() == [0.15, 0.25]
    assert d.seed[0, 1].tolist() == [0, -1] and np.isnan(d.judge[0, 1, 1])  # dear has one draw on p1
    assert d.judge[1, 1].tolist() == [0.7, 0.8]
    assert d.judge_mean() == pytest.approx(np.array([[0.15, 0.5], [0.35, 0.75]]))
    assert not d.upper_bound and draws_from_table(_table(), ["cheap"], "score", "score").upper_bound
    sub = d.subset([1])
    assert sub.prompt_ids == ["p2"] and sub.judge[0, 0].tolist() == [0.3, 0.4]


def test_draws_refuse_unknown_metrics_and_candidates():
    with pytest.raises(TableError, match=r"decision metric 'clip'.*\['score', 'decider'\]"):
        draws_from_table(_table(), ["cheap"], "clip", "score")
    with pytest.raises(TableError, match="judge metric 'q'"):
        draws_from_table(_table(), ["cheap"], "score", "q")
    with pytest.raises(TableError, match="no rows"):
        draws_from_table(_table(), ["cheap", "missing"], "score", "score")
    dup = _table().slice(0, 2).set_column(3, "seed", pa.array([0, 0], pa.int64()))
    with pytest.raises(TableError, match="twice"):
        draws_from_table(dup, ["cheap"], "score", "score")


def _planted(n: int = 120, s: int = 4, seed: int = 0):
    """Two kinds of prompt (embedding +e0 or +e1). Candidate 0 passes (decision 1) on kind A always
    and never on kind B; candidate 1 passes half the time on both."""
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 2
    X = np.zeros((n, 4), np.float32)
    X[np.arange(n), kind] = 1.0
    X += rng.normal(0, 0.05, X.shape).astype(np.float32)
    dec = np.empty((n, 2, s))
    dec[:, 0] = (kind == 0)[:, None]
    dec[:, 1] = rng.random((n, s)) < 0.5
    return X, dec, 0.2 + 0.6 * dec, kind


def test_selection_still_separates_k_when_the_judge_is_constant():
    """A judge that never varies (its global law is exact) leaves the pass events to choose k: the
    planted pass pattern still picks a small neighbourhood, and no score is NaN."""
    X, dec, _, _ = _planted()
    est = DrawEstimator().fit(X, dec, np.full(dec.shape, 0.5))
    scores = est.selection_["scores"]
    assert scores and all(np.isfinite(v) for v in scores.values())
    assert est.selection_["k"] < 80  # the kinds are 50/50: a k of 80 mixes them, smaller ones do not


def test_estimator_recovers_a_planted_pass_rate_and_judge():
    X, dec, jud, kind = _planted()
    est = DrawEstimator().fit(X[:100], dec[:100], jud[:100])
    st = est.predict(X[100:], [0.5], candidates=["c0", "c1"])
    a = kind[100:] == 0
    assert st.candidates == ("c0", "c1")
    # shrinkage toward the global 50 % moves a pass rate of 1 or 0 by a / (k S + a) at most (a <= 16, k S >= 20)
    assert np.all(st.p_pass[a, 0, 0] > 0.7) and np.all(st.p_pass[~a, 0, 0] < 0.3)
    assert np.all(np.abs(st.p_pass[:, 1, 0] - 0.5) < 0.2)
    assert st.q_pass[a, 0, 0] == pytest.approx(0.8) and st.q_fail[~a, 0, 0] == pytest.approx(0.2)
    assert est.selection_["k"] in (5, 10, 20, 40, 80)


def test_sparse_draws_take_neighbours_among_the_candidates_holders():
    """Served traffic holds a candidate's draw on few prompts. Candidate 0 is drawn once on 12 of 100
    training prompts (6 of each kind), candidate 1 on all. With k = 5 and a = 1 pseudo-draw, a kind-A
    prompt's 5 nearest HOLDERS of candidate 0 are kind A (all pass) and the global law is 6 of 12:
    p = (5 + 1 x 0.5) / (5 + 1) = 11/12, and 1/12 for kind B; the 5 nearest prompts overall hold no
    draw of candidate 0 at all and would leave 0.5."""
    X, dec, jud, kind = _planted()
    dec, jud = dec.copy(), jud.copy()
    dec[12:, 0], jud[12:, 0] = np.nan, np.nan
    dec[:12, 0, 1:], jud[:12, 0, 1:] = np.nan, np.nan
    est = DrawEstimator(k=5, prior_weight=1.0).fit(X[:100], dec[:100], jud[:100])
    st = est.predict(X[100:], [0.5])
    a = kind[100:] == 0
    assert st.p_pass[a, 0, 0] == pytest.approx(np.full(a.sum(), 11 / 12))
    assert st.p_pass[~a, 0, 0] == pytest.approx(np.full((~a).sum(), 1 / 12))


def test_estimator_contract_save_load_and_errors(tmp_path):
    X, dec, jud, _ = _planted(60)
    est = DrawEstimator(k=10, prior_weight=2.0)
    assert clone(est).get_params() == est.get_params() and est.set_params(k=5).k == 5
    with pytest.raises(EstimatorError, match="not fitted"):
        est.predict(X, [0.5])
    est.fit(X, dec, jud)
    loaded = load_draw_estimator(est.save(tmp_path / "draws"))
    a, b = est.predict(X[:7], [0.3, 0.6]), loaded.predict(X[:7], [0.3, 0.6])
    for name in ("p_pass", "q_pass", "q_fail", "q_mean"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    with pytest.raises(EstimatorError, match="width"):
        est.predict(X[:, :3], [0.5])
    nan = dec.copy()
    nan[:, 1] = np.nan
    with pytest.raises(EstimatorError, match=r"column\(s\) \[1\]"):
        DrawEstimator().fit(X, nan, jud)
    with pytest.raises(EstimatorError, match="draw_estimator.json"):
        load_draw_estimator(tmp_path)


def _pool(decision_metric: str | None, decider_cost: float | None) -> Pool:
    metrics = [{"name": "scene_score"}, {"name": "scene_decider", **({"cost": decider_cost} if decider_cost is not None else {})}]
    cands = [{"name": n, "cost": c, "generator": {"model": "world:mini", "steps": 2}} for n, c in (("cheap", 1.0), ("dear", 3.0))]
    return Pool.model_validate({"cost_unit": "gflops", "metrics": metrics, "candidates": cands,
                                **({"decision_metric": decision_metric} if decision_metric else {})})


def _scene_table() -> pa.Table:
    return _table().rename_columns(["prompt_id", "prompt", "candidate", "seed", "scene_score", "scene_decider"])


def test_cascade_inputs_take_the_pools_decider_and_its_cost():
    got = cascade_inputs(_scene_table(), _pool("scene_decider", 0.04), ["cheap", "dear"], "scene_score")
    assert got.draws.decision_metric == "scene_decider" and got.score_cost == 0.04 and got.notes == ()
    assert got.draws.decision[0, 0].tolist() == [0.15, 0.25]  # the decider's column, not the judge's


def test_cascade_inputs_say_when_the_judge_decides_or_the_scorer_is_free():
    no_column = _scene_table().drop_columns(["scene_decider"])
    got = cascade_inputs(no_column, _pool("scene_decider", 0.04), ["cheap", "dear"], "scene_score")
    assert got.draws.upper_bound and any("UPPER BOUNDS" in n for n in got.notes)
    assert any("not a column of this table" in n for n in got.notes)
    free = cascade_inputs(_scene_table(), _pool(None, None), ["cheap", "dear"], "scene_score", "scene_decider")
    assert free.score_cost == 0.0 and any("no cost for the decision scorer" in n for n in free.notes)
    asked = cascade_inputs(_scene_table(), _pool("scene_decider", 0.04), ["cheap", "dear"], "scene_score", None, 0.5)
    assert asked.score_cost == 0.5
    with pytest.raises(TableError, match=">= 0"):
        cascade_inputs(_scene_table(), _pool("scene_decider", 0.04), ["cheap", "dear"], "scene_score", None, -1.0)


def test_a_pool_refuses_a_decision_metric_it_does_not_score():
    with pytest.raises(ValueError, match="not one of the pool's metrics"):
        Pool.model_validate({"cost_unit": "gflops", "metrics": [{"name": "scene_score"}], "decision_metric": "scene_decider",
                             "candidates": [{"name": "a", "cost": 1.0, "generator": {"model": "world:mini", "steps": 2}}]})
