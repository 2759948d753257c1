"""Offline evaluation of cascades: plans simulated on hand-traced seed rows, the vectorised simulation
against the reference stop rule, the fitted bundle, and `evaluate` with both policies on a planted table."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from catimage.errors import BudgetError, CatimageError
from catimage.evaluation.cascade import attempt_trace, seed_slots, simulate_plans
from catimage.evaluation.trials import EvaluateOptions, evaluate_table
from catimage.features.registry import make_embedder
from catimage.model.cascade_model import CascadeModel, CascadeOptions
from catimage.policy.cascade import choose_plans
from catimage.policy.plans import Plan, executed_attempts
from catimage.tables.draws import Draws, draws_from_table
from catimage.tables.table import aggregate

# One prompt, candidates a (cost 1) and b (cost 3), three seeds (table seed values 10, 11, 12); scorer .5
HAND = Draws(["p"], ["a prompt"], ["a", "b"],
             decision=[[[0.5, 0.9, 0.3], [0.6, 0.7, 0.95]]], judge=[[[0.4, 0.95, 0.2], [0.65, 0.72, 0.9]]],
             seed=[[[10, 11, 12], [10, 11, 12]]], decision_metric="decider", judge_metric="score")
TRACED = {  # traced by hand: attempt j draws seed slot j, whichever candidate
    Plan(("a", "a", "b"), 0.8): (0.95, 3.0),  # a@10 .5 fails, a@11 .9 passes
    Plan(("a", "b"), 0.8): (0.72, 5.0),  # a@10 .5, b@11 .7: both fail, b's .7 is the best
    Plan(("b", "a", "a"), 0.8): (0.95, 5.0),  # b@10 .6 fails, a@11 .9 passes
    Plan(("a", "b", "b"), 0.99): (0.9, 8.5),  # .5, .7, .95 all fail: b@12 (.95) is returned
    Plan(("a", "b"), None): (0.72, 5.0),  # best of two
    Plan.route("b"): (0.65, 3.0),  # b@10, unscored
}


def test_simulation_follows_the_hand_traced_seeds():
    plans = list(TRACED)
    real = simulate_plans(plans, HAND, [1.0, 3.0], 0.5)
    for k, plan in enumerate(plans):
        assert (real.quality[0, k], real.cost[0, k]) == pytest.approx(TRACED[plan]), plan.label()


def test_attempt_trace_by_hand():
    rows = attempt_trace(Plan(("a", "b", "b"), 0.8), HAND, 0, {"a": 1.0, "b": 3.0}, 0.5)
    assert [(r["candidate"], r["seed"], r["decision"], r["judge"], r["accepted"], r["returned"], r["cost"]) for r in rows] == [
        ("a", 10, 0.5, 0.4, False, False, 1.5),
        ("b", 11, 0.7, 0.72, False, False, 3.5),
        ("b", 12, 0.95, 0.9, True, True, 3.5),
    ]
    route = attempt_trace(Plan.route("a"), HAND, 0)
    assert route == [{"candidate": "a", "seed": 10, "decision": None, "judge": 0.4, "accepted": False, "returned": True}]


def test_vectorised_simulation_equals_the_reference_stop_rule():
    rng = np.random.default_rng(11)
    n, m, s = 30, 3, 3
    dec = np.round(rng.random((n, m, s)), 1)  # coarse: exact ties between draws
    dec[rng.random(dec.shape) < 0.1] = np.nan  # failed scores
    jud = rng.random((n, m, s))
    draws = Draws([str(i) for i in range(n)], ["x"] * n, ["a", "b", "c"], dec, jud, np.zeros((n, m, s), int))
    plans = [Plan.route("b"), *(Plan(tuple(rng.choice(["a", "b", "c"], k)), t)
                                for k in (2, 3) for t in (0.3, 0.6, 0.9, None) for _ in range(4))]
    costs = np.array([1.0, 2.0, 3.0])
    real = simulate_plans(plans, draws, costs, 0.25)
    col = {"a": 0, "b": 1, "c": 2}
    for i in range(n):
        for k, plan in enumerate(plans):
            cols = [col[a] for a in plan.attempts]
            drawn, ret = executed_attempts(plan, [dec[i, c, j] for j, c in enumerate(cols)])
            assert real.quality[i, k] == jud[i, cols[ret], ret]
            assert real.cost[i, k] == pytest.approx(sum(costs[c] + (0 if plan.is_route else 0.25) for c in cols[:drawn]))


def test_one_sample_per_cell_allows_one_attempt_per_candidate():
    att = np.array([[0, 1, -1], [1, 0, 2]])
    assert seed_slots(att, 1).tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(CatimageError, match="one attempt per candidate"):
        seed_slots(np.array([[0, 0]]), 1)
    with pytest.raises(CatimageError, match="max_attempts <= 2"):
        seed_slots(np.array([[0, 1, 1]]), 2)


# --- a planted table ----------------------------------------------------------------------------


def _planted_table(n: int = 80, s: int = 4, seed: int = 0) -> pa.Table:
    """`cheap` (cost 1) draws a perfect image (1.0) or a failure (0.0), a fair coin per seed; `dear`
    (cost 3) always draws 0.6. The decider reads the judge with a little noise. Nothing in the prompt
    tells the draws apart, so routing can only mix; a cascade redraws `cheap` until one passes:
    two attempts give .75 at an expected 1.5 (+ scoring), three .875 at 1.75."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "score", "decider")}
    words = ["red", "blue", "green", "cat", "ship", "tree", "house", "moon"]
    for i in range(n):
        text = f"a {words[i % 8]} {words[(3 * i) % 8]} number {i}"
        for cand in ("cheap", "dear"):
            for j in range(s):
                q = float(rng.random() < 0.5) if cand == "cheap" else 0.6 + rng.normal(0, 0.02)
                rows["prompt_id"].append(f"p{i}")
                rows["prompt"].append(text)
                rows["candidate"].append(cand)
                rows["seed"].append(j)
                rows["score"].append(q)
                rows["decider"].append(q + rng.normal(0, 0.01))
    return pa.table(rows)


COSTS = np.array([1.0, 3.0])


@pytest.fixture(scope="module")
def planted_both():
    table = _planted_table()
    matrix = aggregate(table, "score", ["cheap", "dear"])
    draws = draws_from_table(table, ["cheap", "dear"], "decider", "score")
    options = EvaluateOptions(estimator="knn", estimator_params={"k": 5}, embedder=make_embedder("tfidf", dim=None),
                              test_frac=0.25, trials=2, bootstrap=20, cost_unit="s", policy="both", score_cost=0.1,
                              cascade=CascadeOptions(max_attempts=3))
    return evaluate_table(matrix, COSTS, options, draws=draws)


def test_cascade_beats_routing_on_the_planted_table(planted_both):
    route, cascade = planted_both["policies"]["route"], planted_both["policies"]["cascade"]
    rs, cs = route["summary"], cascade["summary"]
    assert cs["best_fixed"] == "dear" and cs["best_fixed_quality"] == pytest.approx(0.6, abs=0.02)
    # redrawing cheap reaches .75 at ~1.7 and .875 at ~2.05 (scoring .1 per image): well above .6 at cost 3
    assert cs["quality_at_best_fixed_cost"] > 0.75
    assert cs["cost_ratio_or_miss"] < 0.7 and not cs["missed_best_fixed"]
    assert cs["area_over_hull"] > rs["area_over_hull"] + 0.1
    assert cs["apgr"] > 1.0  # it beats the strong model, which the weak-to-strong gap cannot contain
    assert rs["apgr"] < 0.7  # routing has no prompt signal to use
    assert len(cascade["per_trial"]) == 2 and cs["trials"]["n"] == 2


def test_report_names_both_metrics_and_keeps_the_route_top_level(planted_both):
    rep = planted_both
    assert rep["policies"]["route"]["decision_metric"] is None and rep["policies"]["route"]["upper_bound"] is False
    cascade = rep["policies"]["cascade"]
    assert cascade["decision_metric"] == "decider" and cascade["judge_metric"] == "score"
    assert cascade["upper_bound"] is False
    assert cascade["curve"][0]["lambda"] == 0.0 and {"cost", "quality"} <= set(cascade["curve"][0])
    assert rep["summary"] == rep["policies"]["route"]["summary"] and rep["router"] == rep["policies"]["route"]["curve"]
    trace = cascade["traces"][0]
    assert {"prompt", "plan", "attempts", "label"} <= set(trace) and sum(a["returned"] for a in trace["attempts"]) == 1
    checks = cascade["summary"]["budget_check"]
    assert [c["budget"] for c in checks] == [1.0, 3.0]
    json.dumps(rep, allow_nan=False)


def test_fitted_cascade_plans_saves_and_calibrates(tmp_path):
    table = _planted_table(60)
    matrix = aggregate(table, "score", ["cheap", "dear"])
    draws = draws_from_table(table, ["cheap", "dear"], "decider", "score")
    model = CascadeModel.fit(matrix, draws, COSTS, "s", score_cost=0.1, options=CascadeOptions(max_attempts=2, router_means=True),
                             calibration_frac=0.2, seed=1, estimator="knn", estimator_params={"k": 5},
                             embedder=make_embedder("tfidf", dim=None))
    assert model.calibration_stats.n_prompts == 12  # 20 % of 60 held out for calibration only
    assert not model.upper_bound and model.decision_metric == "decider"
    prompts = ["a red cat number 1", "a blue ship number 2"]
    # with router_means, the draw means are the router's predictions, however they are computed
    assert model.predict_stats(prompts).q_mean == pytest.approx(model.router.predict(prompts))
    at_best = model.plan(prompts, lam=0.0)
    assert all(len(p.attempts) == 2 for p in at_best)  # redrawing beats one draw when cost is free
    assert model.plan(prompts, lam=1e6) == [Plan.route("cheap")] * 2
    # calibration meets the budget on the calibration prompts' expected costs, by construction
    value, cost = model.plan_values(model.calibration_stats)
    for budget in (1.0, 1.3, 2.0):
        chosen = choose_plans(value, cost, model.lambda_for_budget(budget))
        assert cost[np.arange(cost.shape[0]), chosen].mean() <= budget + 1e-9
    with pytest.raises(BudgetError):
        model.lambda_for_budget(0.5)
    loaded = CascadeModel.load(model.save(tmp_path / "cascade"))
    assert loaded.plan(prompts, budget=1.3) == model.plan(prompts, budget=1.3)
    assert loaded.lambda_for_budget(1.3) == model.lambda_for_budget(1.3)


def test_router_decide_at_infinite_lambda_picks_the_cheapest_without_nan():
    """Issue 15: an infinite lambda made decide compute inf * 0 = NaN utilities; it is the limit of
    the rule (the cheapest candidate, the ranking by cost)."""
    from catimage.model.router_model import RouterModel

    table = _planted_table(40)
    matrix = aggregate(table, "score", ["cheap", "dear"])
    router = RouterModel.fit(matrix, np.array([3.0, 1.0]), "s", embedder=make_embedder("tfidf", dim=None),
                             estimator_name="knn", estimator_params={"k": 3})  # here `dear` is the cheaper one
    decision = router.decide(["a red cat number 1"], lam=np.inf)[0]
    assert decision.candidate == "dear" and decision.ranking == ["dear", "cheap"]
    assert all(np.isfinite(v) for v in decision.predicted.values())


def test_cli_evaluate_both_policies(tmp_path):
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from catimage.cli import app

    pq.write_table(_planted_table(48), tmp_path / "t.parquet")
    (tmp_path / "pool.yaml").write_text(
        "cost_unit: relative\ncandidates:\n  - {name: cheap, cost: 1.0}\n  - {name: dear, cost: 3.0}\n")
    base = ["evaluate", str(tmp_path / "t.parquet"), "--pool", str(tmp_path / "pool.yaml"), "--metric", "score",
            "--estimator", "knn", "--embedder", "tfidf", "--no-embed-cache", "--trials", "1", "--bootstrap", "0"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "out"), "--policy", "both", "--decision-metric", "decider",
                              "--decision-cost", "0.1", "--max-attempts", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["policies"]) == {"route", "cascade"}
    assert rep["policies"]["cascade"]["decision_metric"] == "decider" and rep["policies"]["cascade"]["plans"]["score_cost"] == 0.1
    assert "APGR" in res.output
    bound = runner.invoke(app, [*base, "--out", str(tmp_path / "o2"), "--policy", "cascade", "--max-attempts", "2"])
    assert bound.exit_code == 0, bound.output
    rep2 = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert rep2["policies"]["cascade"]["upper_bound"] is True and "UPPER BOUND" in bound.output
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "o3"), "--decision-metric", "decider"])
    assert bad.exit_code == 2 and "--policy cascade" in bad.output
    unknown = runner.invoke(app, [*base, "--out", str(tmp_path / "o4"), "--policy", "cascade", "--decision-metric", "clip"])
    assert unknown.exit_code == 2 and "decider" in unknown.output  # the error names the table's metrics
