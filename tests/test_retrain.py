"""The retrain job end to end on a planted served log: Ray Data reads it, the one fit pipeline fits on
it, off-policy evaluation compares with the serving model, and only a confident win is promoted."""

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from catimage.model.router_model import RouterModel
from catimage.policy.explore import ExplorationConfig, explore
from catimage.tables.served_log import LogConfig, ServedLogWriter, ServedRow, read_served_log
from catimage.tables.table import aggregate, stable_prompt_id
from jobs.retrain import RetrainConfig, retrain_on_log, run_retrain

CANDIDATES = ["small", "big"]
COSTS = np.array([1.0, 3.0])
LAM = 0.05
# Planted mean decision score: circles draw well with small, squares need big.
TRUTH = {"circle": np.array([0.8, 0.6]), "square": np.array([0.3, 0.9])}
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SIZES = ["small", "large", "tiny", "big"]


def _prompts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = "circle" if i % 2 == 0 else "square"
        out.append((f"a {SIZES[rng.integers(4)]} {COLOURS[rng.integers(8)]} {shape} scene {seed}-{i}", shape))
    return out


def _table(prompts, truth, seeds: int, rng) -> pa.Table:
    rows = {"prompt_id": [], "prompt": [], "candidate": [], "seed": [], "decider": []}
    for text, shape in prompts:
        for j, cand in enumerate(CANDIDATES):
            for s in range(seeds):
                rows["prompt_id"].append(stable_prompt_id(text))
                rows["prompt"].append(text)
                rows["candidate"].append(cand)
                rows["seed"].append(s)
                rows["decider"].append(float(truth[shape][j] + rng.normal(0, 0.1)))
    return pa.table(rows)


def _model(table: pa.Table, tmp_path, name: str) -> str:
    model = RouterModel.fit(aggregate(table, "decider", CANDIDATES), COSTS, "relative", "tfidf", None, "knn", None)
    return str(model.save(tmp_path / name))


def _serve(model_dir: str, log_dir, n: int, seed: int, truth=TRUTH) -> None:
    """Serve n fresh prompts with epsilon-greedy exploration around the model; log every request."""
    model, rng = RouterModel.load(model_dir), np.random.default_rng(seed)
    prompts = _prompts(n, seed)
    pred = model.predict([p for p, _ in prompts])
    ex = explore(pred - LAM * COSTS, COSTS, ExplorationConfig(epsilon=0.3), rng)
    t0 = datetime(2026, 12, 5, 9, tzinfo=UTC)
    rows = [
        ServedRow(prompt_id=stable_prompt_id(text), prompt=text, candidate=CANDIDATES[k], seed=i,
                  pool_cost=float(COSTS[k]), request_id=f"req-{seed}-{i}", propensity=float(p), lam=LAM,
                  model_version="serving", time=t0 + timedelta(seconds=10 * i),
                  scores={"decider": float(truth[shape][k] + rng.normal(0, 0.1))})
        for i, ((text, shape), k, p) in enumerate(zip(prompts, ex.choice, ex.propensity, strict=True))
    ]
    with ServedLogWriter(LogConfig(uri=str(log_dir), metrics=("decider",), flush_rows=200)) as writer:
        writer.append(rows)


def _true_gain(log_dir, candidate_dir: str, serving_dir: str) -> float:
    """Utility gain on the held-out requests computed from the planted truth and each model's choices."""
    from catimage.evaluation.offpolicy import holdout_by_time

    _, held = holdout_by_time(read_served_log(str(log_dir)), 0.2)
    prompts = held.column("prompt").to_pylist()
    truth = np.array([TRUTH["circle" if " circle " in p else "square"] for p in prompts]) - LAM * COSTS
    utility = []
    for model_dir in (candidate_dir, serving_dir):
        choice = RouterModel.load(model_dir).decide(prompts, lam=LAM)
        utility.append(truth[np.arange(len(prompts)), [d.index for d in choice]].mean())
    return float(utility[0] - utility[1])


def _pool(tmp_path) -> str:
    path = tmp_path / "pool.yaml"
    path.write_text("cost_unit: relative\ncandidates:\n  - {name: small, cost: 1.0}\n  - {name: big, cost: 3.0}\n")
    return str(path)


def _config(tmp_path, log_dir, serving, **kw) -> RetrainConfig:
    kw.setdefault("lam", LAM)
    return RetrainConfig(log=str(log_dir), pool=_pool(tmp_path), serving=serving, out=tmp_path / "models",
                         embedder="tfidf", estimator="knn", min_requests=50, n_boot=300, **kw)


def test_a_better_model_learned_from_traffic_is_promoted_through_ray(tmp_path):
    """The serving model was fitted on a table with the preferences inverted; the log shows the truth."""
    rng = np.random.default_rng(0)
    inverted = {"circle": TRUTH["square"], "square": TRUTH["circle"]}
    serving = _model(_table(_prompts(40, 1), inverted, 2, rng), tmp_path, "serving")
    _serve(serving, tmp_path / "log", 500, seed=2)
    outcome = run_retrain(_config(tmp_path, tmp_path / "log", serving, version="v2", num_cpus=1))
    assert outcome.promoted, outcome.decision["reasons"]
    gain = outcome.decision["evidence"]["gain"]["utility"]
    assert gain["low"] <= _true_gain(tmp_path / "log", outcome.model_dir, serving) <= gain["high"]
    pointer = json.loads((tmp_path / "models" / "serving.json").read_text())
    assert pointer["model_version"] == "v2"
    assert json.loads((tmp_path / "models" / "v2" / "promotion.json").read_text())["decision"] == "promote"
    assert RouterModel.load(pointer["path"]).metric == "decider"


def test_no_confident_win_over_a_model_that_already_knows_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    serving = _model(_table(_prompts(200, 4), TRUTH, 4, rng), tmp_path, "serving")
    _serve(serving, tmp_path / "log", 500, seed=5)
    outcome = retrain_on_log(read_served_log(str(tmp_path / "log")), _config(tmp_path, tmp_path / "log", serving,
                                                                              version="v3"))
    assert not outcome.promoted
    assert any(r.startswith("failed: utility gain") for r in outcome.decision["reasons"])
    assert not (tmp_path / "models" / "serving.json").exists()
    assert json.loads((tmp_path / "models" / "v3" / "promotion.json").read_text())["decision"] == "refuse"


def test_judge_flag_learns_logged_decider_scores_on_the_judges_scale(tmp_path):
    """The decider over-scores `small` by 0.4 (planted); the base table holds both scores. With --judge
    the offsets are the planted ones (-0.4, 0) and the refitted router predicts `small` on squares 0.4
    lower than the same refit on raw decider scores (the k-NN smooths over shapes alike in both, so the
    difference, not the level, is what the planted bias fixes)."""
    from catimage.tables.table import write_quality_table

    bias = np.array([0.4, 0.0])
    decider = {k: v + bias for k, v in TRUTH.items()}
    rng = np.random.default_rng(21)
    base = _table(_prompts(40, 22), decider, 2, rng)
    shapes = ["circle" if " circle " in p else "square" for p in base.column("prompt").to_pylist()]
    cols = [CANDIDATES.index(c) for c in base.column("candidate").to_pylist()]
    judge = [float(TRUTH[sh][j] + rng.normal(0, 0.1)) for sh, j in zip(shapes, cols, strict=True)]
    base_path = write_quality_table(base.append_column("judge", pa.array(judge)), tmp_path / "base.parquet")
    serving = _model(base, tmp_path, "serving")
    _serve(serving, tmp_path / "log", 200, seed=23, truth=decider)
    log_table = read_served_log(str(tmp_path / "log"))
    squares = [p for p, sh in _prompts(30, 24) if sh == "square"]
    small_on_squares = {}
    for judged in (True, False):
        kw = {"judge": "judge", "version": "judged"} if judged else {"version": "raw"}
        out = retrain_on_log(log_table, _config(tmp_path, tmp_path / "log", serving, base_table=base_path, **kw))
        small_on_squares[judged] = float(RouterModel.load(out.model_dir).predict(squares)[:, 0].mean())
        if judged:
            assert out.decision["label"] == "judge"
            offsets = out.decision["judge_scale"]["offsets"]
            assert offsets["small"] == pytest.approx(-0.4, abs=0.05) and offsets["big"] == pytest.approx(0.0, abs=0.05)
    assert small_on_squares[True] - small_on_squares[False] == pytest.approx(-0.4, abs=0.05)


def test_held_out_prompts_never_reach_training(tmp_path):
    from catimage.evaluation.offpolicy import holdout_by_time

    rng = np.random.default_rng(6)
    serving = _model(_table(_prompts(20, 7), TRUTH, 2, rng), tmp_path, "serving")
    _serve(serving, tmp_path / "log", 100, seed=8)
    log_table = read_served_log(str(tmp_path / "log"))
    train, held = holdout_by_time(log_table, 0.2)
    assert len(set(held.column("request_id").to_pylist())) == 20
    assert not set(train.column("prompt_id").to_pylist()) & set(held.column("prompt_id").to_pylist())
    assert min(held.column("time").to_pylist()) > max(train.column("time").to_pylist())


def test_a_log_without_the_asked_metric_is_a_clear_error(tmp_path):
    from catimage.errors import CatimageError

    rng = np.random.default_rng(9)
    serving = _model(_table(_prompts(20, 10), TRUTH, 2, rng), tmp_path, "serving")
    _serve(serving, tmp_path / "log", 50, seed=11)
    with pytest.raises(CatimageError, match="no score column 'judge'"):
        retrain_on_log(read_served_log(str(tmp_path / "log")), _config(tmp_path, tmp_path / "log", serving,
                                                                        metric="judge"))


def test_catimage_evaluate_logged_covers_a_routers_true_value(tmp_path):
    """`catimage evaluate --logged`: the DR estimate of a fixed router on served traffic covers its
    true mean decision score there, computed from the planted truth and its own choices."""
    from typer.testing import CliRunner

    from catimage.cli import app

    rng = np.random.default_rng(12)
    fixed = _model(_table(_prompts(60, 13), TRUTH, 2, rng), tmp_path, "fixed")
    serving = _model(_table(_prompts(40, 14), {"circle": TRUTH["square"], "square": TRUTH["circle"]}, 2, rng),
                     tmp_path, "serving")
    _serve(serving, tmp_path / "log", 600, seed=15)
    result = CliRunner().invoke(app, ["evaluate", "--logged", str(tmp_path / "log"), "--model", fixed,
                                      "--lambda", str(LAM), "--out", str(tmp_path / "ope")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ope" / "offpolicy.json").read_text())["policies"][fixed]
    prompts = read_served_log(str(tmp_path / "log")).column("prompt").to_pylist()
    choice = [d.index for d in RouterModel.load(fixed).decide(prompts, lam=LAM)]
    truth = np.mean([TRUTH["circle" if " circle " in p else "square"][k] for p, k in zip(prompts, choice, strict=True)])
    dr = report["estimates"]["dr"]["quality"]
    assert dr["low"] <= truth <= dr["high"]
    assert report["logging_policy_realised"]["quality"]["value"] < truth  # serving is the worse router here


# --- cascades --------------------------------------------------------------------------------------

SD = 0.15  # per-draw spread of the planted decision score around TRUTH


def _cascade(table: pa.Table, tmp_path, name: str) -> str:
    from catimage.model.cascade_model import CascadeOptions, fit_cascade
    from catimage.tables.draws import draws_from_table
    from catimage.tables.table import split_prompts

    matrix = aggregate(table, "decider", CANDIDATES)
    split = split_prompts(matrix.n_prompts, test_frac=0.0, calibration_frac=0.1, seed=0)
    model = fit_cascade(matrix, draws_from_table(table, CANDIDATES, "decider", "decider"), COSTS, "relative",
                        split.train, split.calibration, score_cost=0.05,
                        options=CascadeOptions(max_attempts=2, plan_thresholds=(0.7,)),  # 6 plans
                        estimator="knn", embedder="tfidf")
    return str(model.save(tmp_path / name))


def _execute(plan, shape: str, rng) -> tuple[list[float], int, int]:
    from catimage.policy.plans import executed_attempts

    scores = [float(TRUTH[shape][CANDIDATES.index(c)] + rng.normal(0, SD)) for c in plan.attempts]
    drawn, returned = executed_attempts(plan, scores)
    return scores[:drawn], drawn, returned


def _serve_cascade(model_dir: str, log_dir, n: int, seed: int) -> None:
    """Serve with the cascade's plan, or (epsilon 0.5) any plan of its set; log every attempt. Exploring
    over every plan is what lets off-policy evaluation weigh another cascade's plans at all."""
    from catimage.model.cascade_model import CascadeModel
    from catimage.policy.explore import action_key

    model, rng = CascadeModel.load(model_dir), np.random.default_rng(seed)
    prompts = _prompts(n, seed)
    value, cost = model.plan_values(model.predict_stats([p for p, _ in prompts]))
    t0, rows = datetime(2026, 12, 5, 9, tzinfo=UTC), []
    for i, (text, shape) in enumerate(prompts):
        ex = explore((value[i] - LAM * cost[i])[None], cost[i][None], ExplorationConfig(epsilon=0.5), rng)
        plan = model.plans[int(ex.choice[0])]
        scores, _, returned = _execute(plan, shape, rng)
        rows += [ServedRow(prompt_id=stable_prompt_id(text), prompt=text, candidate=plan.attempts[j], seed=j,
                           pool_cost=float(COSTS[CANDIDATES.index(plan.attempts[j])]), decision_cost=0.05,
                           request_id=f"req-{seed}-{i}", attempt=j, returned=j == returned,
                           propensity=float(ex.propensity[0]), plan=action_key(plan), lam=LAM, policy="cascade",
                           time=t0 + timedelta(seconds=10 * i), scores={"decider": s}) for j, s in enumerate(scores)]
    with ServedLogWriter(LogConfig(uri=str(log_dir), metrics=("decider",), flush_rows=500)) as writer:
        writer.append(rows)


def _true_cascade_utility(model_dir: str, prompts: list[str], rng, reps: int = 400) -> float:
    """Mean utility of the cascade's plans on `prompts`, each executed `reps` times in the planted world."""
    from catimage.model.cascade_model import CascadeModel

    model = CascadeModel.load(model_dir)
    total = 0.0
    for text, plan in zip(prompts, model.plan(prompts, lam=LAM), strict=True):
        shape = "circle" if " circle " in text else "square"
        for _ in range(reps):
            scores, drawn, returned = _execute(plan, shape, rng)
            spent = sum(COSTS[CANDIDATES.index(c)] + (0.0 if plan.is_route else 0.05) for c in plan.attempts[:drawn])
            total += scores[returned] - LAM * spent
    return total / (reps * len(prompts))


def test_a_cascade_learned_from_traffic_is_promoted_and_the_gain_is_the_planted_one(tmp_path):
    from catimage.evaluation.offpolicy import holdout_by_time

    rng = np.random.default_rng(20)
    inverted = {"circle": TRUTH["square"], "square": TRUTH["circle"]}
    serving = _cascade(_table(_prompts(40, 21), inverted, 4, rng), tmp_path, "serving")
    _serve_cascade(serving, tmp_path / "log", 700, seed=22)
    log_table = read_served_log(str(tmp_path / "log"))
    outcome = retrain_on_log(log_table, _config(tmp_path, tmp_path / "log", serving, version="c2", policy="cascade",
                                                holdout_frac=0.35))
    assert outcome.promoted, outcome.decision["reasons"]
    held = holdout_by_time(log_table, 0.35)[1]
    prompts = list(dict.fromkeys(held.column("prompt").to_pylist()))
    truth = (_true_cascade_utility(outcome.model_dir, prompts, rng)
             - _true_cascade_utility(serving, prompts, rng))
    gain = outcome.decision["evidence"]["gain"]["utility"]
    assert gain["low"] <= truth <= gain["high"], (gain, truth)
