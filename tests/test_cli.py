"""The command line: the user-facing paths of evaluate / fit / route, and clear errors at the boundary."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from catimage.cli import app
from catimage.tables.table import write_quality_table

runner = CliRunner()
WORDS = ["cat", "dog", "castle", "robot", "river", "forest", "city", "boat", "tree", "clock"]


@pytest.fixture(scope="module")
def table_and_pool(tmp_path_factory):
    """60 prompts; 'big' wins on long prompts, 'small' is as good on short ones (a planted signal)."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    rows = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "quality")}
    for i in range(60):
        n = 1 + i % 6
        prompt = " ".join(rng.choice(WORDS, size=n)) + f" scene {i}"
        for cand, q in (("small", 0.8 - 0.12 * n), ("big", 0.75)):
            for seed in range(2):
                rows["prompt_id"].append(f"p{i}")
                rows["prompt"].append(prompt)
                rows["candidate"].append(cand)
                rows["seed"].append(seed)
                rows["quality"].append(q + rng.normal(0, 0.02))
    table = write_quality_table(pa.table(rows), root / "q.parquet")
    pool = root / "pool.yaml"
    pool.write_text("cost_unit: seconds\ncandidates:\n  - {name: small, cost: 1.0}\n  - {name: big, cost: 4.0}\n")
    return table, pool, root


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_evaluate_writes_the_three_report_files(table_and_pool):
    table, pool, root = table_and_pool
    out = root / "eval"
    _ok(runner.invoke(app, ["evaluate", str(table), "--pool", str(pool), "--out", str(out), "--embedder", "tfidf",
                            "--estimator", "knn", "--estimator", "linear", "--trials", "2", "--test-frac", "0.25"]))
    report = json.loads((out / "report.json").read_text())
    assert {"fixed", "router", "oracle", "hull", "summary"} <= set(report)
    for key in ("best_fixed", "cost_ratio_or_miss", "quality_at_best_fixed_cost", "area_over_hull",
                "oracle_gain_fraction", "gain_at_fixed_cost", "trials"):
        assert key in report["summary"]
    assert set(report["routers"]) == {"knn", "linear"}
    assert (out / "report.md").stat().st_size > 0 and (out / "deferral.png").stat().st_size > 0


def test_evaluate_auto_says_what_it_picked_and_how_sure(table_and_pool):
    table, pool, root = table_and_pool
    out = root / "eval-auto"
    result = _ok(runner.invoke(app, ["evaluate", str(table), "--pool", str(pool), "--out", str(out), "--embedder",
                                     "tfidf", "--estimator", "auto", "--trials", "2", "--test-frac", "0.25",
                                     "--bootstrap", "50",
                                     "--estimator-params", '{"members": ["twoway-knn", "twoway-ridge"], "folds": 3}']))
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "auto picked" in text and "inner 3-fold CV" in text
    assert "trial 2/2 done" in text  # progress while it runs
    assert "Beats the prompt-agnostic mixture hull?" in text
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["estimator_selection"].startswith("auto picked")
    assert report["summary"]["trials"]["intervals"]["area_over_hull"][0] is not None
    assert "## Verdict" in (out / "report.md").read_text()


def test_fit_then_route_prints_choice_and_json(table_and_pool):
    table, pool, root = table_and_pool
    model = root / "model"
    _ok(runner.invoke(app, ["fit", str(table), "--pool", str(pool), "--out", str(model), "--embedder", "tfidf"]))
    result = _ok(runner.invoke(app, ["route", str(model), "--lambda", "0", "--json", "cat", "cat dog castle robot river forest"]))
    decisions = json.loads(result.output)
    assert [d["prompt"] for d in decisions] == ["cat", "cat dog castle robot river forest"]
    assert set(decisions[0]["predicted"]) == {"small", "big"}
    # At the cheapest budget every prompt must go to the cheapest candidate.
    cheap = json.loads(_ok(runner.invoke(app, ["route", str(model), "--budget", "1.0", "--json", "a", "b c d e f"])).output)
    assert {d["candidate"] for d in cheap} == {"small"}


def test_fit_policy_cascade_writes_a_bundle_that_decides_on_the_pools_decision_metric(table_and_pool):
    from catimage.model.cascade_model import CascadeModel

    table, _, root = table_and_pool
    base = pq.read_table(table).rename_columns({"quality": "scene_score"})
    verdict = pa.array(np.clip(base.column("scene_score").to_numpy() + 0.05, 0, 1))
    with_verdict = write_quality_table(base.append_column("scene_decider", verdict), root / "qv.parquet")
    pool = root / "pool_verdict.yaml"
    pool.write_text("cost_unit: seconds\nmetrics:\n  - {name: scene_score}\n  - {name: scene_decider, cost: 0.25}\n"
                    "decision_metric: scene_decider\ncandidates:\n  - {name: small, cost: 1.0}\n  - {name: big, cost: 4.0}\n")
    out = root / "cascade"
    _ok(runner.invoke(app, ["fit", str(with_verdict), "--pool", str(pool), "--out", str(out), "--embedder", "tfidf",
                            "--metric", "scene_score", "--policy", "cascade"]))
    model = CascadeModel.load(out)
    assert (model.decision_metric, model.judge_metric, model.score_cost) == ("scene_decider", "scene_score", 0.25)
    # At a prohibitive lambda the cheapest plan wins: one draw of the cheapest candidate.
    assert [p.attempts for p in model.plan(["cat", "cat dog castle robot river"], lam=1e6)] == [("small",), ("small",)]
    refused = runner.invoke(app, ["fit", str(with_verdict), "--pool", str(pool), "--out", str(out), "--policy", "both"])
    assert refused.exit_code != 0 and "one bundle" in refused.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["route", "{model}", "--budget", "0.5", "cat"], "cheapest"),
        (["route", "{model}", "--budget", "2", "--lambda", "1", "cat"], "not both"),
        (["route", "{model}", "  "], "empty prompt"),
        (["route", "{root}", "cat"], "not a catimage model directory"),
        (["evaluate", "{root}/missing.parquet", "--pool", "{pool}", "--out", "{root}/x"], "does not exist"),
        (["evaluate", "{table}", "--pool", "{root}/nopool.yaml", "--out", "{root}/x"], "does not exist"),
        (["evaluate", "{table}", "--pool", "{badpool}", "--out", "{root}/x", "--embedder", "tfidf"], "does not declare"),
        (["fit", "{table}", "--pool", "{pool}", "--out", "{root}/m2", "--estimator-params", "[1]"], "JSON object"),
        (["evaluate", "{table}", "--pool", "{pool}", "--out", "{root}/x", "--metric", "nope"], "choose one of"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(table_and_pool, args, message):
    table, pool, root = table_and_pool
    model = root / "model"
    if not (model / "router.json").exists():
        _ok(runner.invoke(app, ["fit", str(table), "--pool", str(pool), "--out", str(model), "--embedder", "tfidf"]))
    badpool = root / "badpool.yaml"
    badpool.write_text("cost_unit: seconds\ncandidates:\n  - {name: small, cost: 1.0}\n")
    fmt = {"model": model, "root": root, "pool": pool, "table": table, "badpool": badpool}
    result = runner.invoke(app, [a.format(**fmt) for a in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # rich wraps long paths at the console width
    assert "Traceback" not in result.output


def _seconds_table(root):
    """Two candidates over 30 prompts, each row with its measured seconds (what `catimage build` records)."""
    rows = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "cost", "quality")}
    for i in range(30):
        for cand, seconds in (("small", 0.2), ("big", 0.9)):
            rows["prompt_id"].append(f"p{i}")
            rows["prompt"].append(f"a scene with {i} things")
            rows["candidate"].append(cand)
            rows["seed"].append(0)
            rows["cost"].append(seconds)
            rows["quality"].append(0.5 + 0.01 * i)
    return write_quality_table(pa.table(rows), root / "seconds.parquet")


def test_evaluate_refuses_a_gflops_pool_that_would_borrow_measured_seconds(tmp_path):
    """The acceptance case: one candidate has no cost in a gflops pool; the table measured seconds.
    Before, those seconds silently became its GFLOPs; now evaluate (and fit) refuse, naming the units."""
    table = _seconds_table(tmp_path)
    pool = tmp_path / "pool.yaml"
    pool.write_text("cost_unit: gflops\ncandidates:\n  - {name: small, cost: 1.5}\n  - {name: big}\n")
    for command in (["evaluate", str(table), "--pool", str(pool), "--out", str(tmp_path / "r")],
                    ["fit", str(table), "--pool", str(pool), "--out", str(tmp_path / "m")]):
        result = runner.invoke(app, [*command, "--embedder", "tfidf"])
        text = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert "['big']" in text and "seconds" in text and "gflops" in text and "Traceback" not in text
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


def test_cost_out_refuses_to_relabel_declared_costs_in_another_unit(tmp_path):
    """An http candidate keeps its declared USD; counting the others in TFLOPs and labelling the whole
    pool tflops would turn 0.04 USD into 0.04 TFLOPs. Refused before counting; nothing written."""
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "cost_unit: usd\ncandidates:\n"
        "  - {name: api, cost: 0.04, generator: {kind: http, url: 'http://127.0.0.1:1/v1/images', model: x}}\n"
        "  - {name: local, cost: 0.01, generator: {model: 'tiny:sd', steps: 2}}\n"
    )
    out = tmp_path / "counted.yaml"
    result = runner.invoke(app, ["cost", str(pool), "--out", str(out), "--unit", "tflops"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "['api']" in text and "usd" in text and "tflops" in text
    assert not out.exists()


def test_cost_rejects_an_unknown_unit(tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text("cost_unit: usd\ncandidates:\n  - {name: local, cost: 0.01, generator: {model: 'tiny:sd'}}\n")
    result = runner.invoke(app, ["cost", str(pool), "--unit", "dollars"])
    assert result.exit_code == 2 and "tflops or gflops" in result.output


def test_build_fails_fast_on_a_gpu_pool_without_gpus(tmp_path):
    """configs/sdxl_pool.yaml on this GPU-less machine: an error naming the missing GPUs, not a hang."""
    from pathlib import Path

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    pool = Path(__file__).resolve().parents[1] / "configs" / "sdxl_pool.yaml"
    result = runner.invoke(app, ["build", "--pool", str(pool), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                                 "--num-cpus", "2"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "GPU in all, the cluster has 0 GPU" in text and "--wait-for-resources" in text
    assert not (tmp_path / "o" / "quality.parquet").exists()


def test_add_candidate_refuses_costs_in_another_unit_than_the_routers(table_and_pool, tmp_path):
    """The router counts seconds; a new candidate's cost declared in a gflops pool, or only measured
    for a gflops router, would silently mix units in its lambda. Both refused, naming the units."""
    table, pool, _ = table_and_pool
    model = tmp_path / "model"
    _ok(runner.invoke(app, ["fit", str(table), "--pool", str(pool), "--out", str(model), "--embedder", "tfidf"]))
    rows = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "cost", "quality")}
    for i in range(30):
        rows["prompt_id"].append(f"p{i}")
        rows["prompt"].append(f"cat dog scene {i}")
        rows["candidate"].append("extra")
        rows["seed"].append(0)
        rows["cost"].append(2.0)
        rows["quality"].append(0.7)
    new_rows = write_quality_table(pa.table(rows), tmp_path / "new.parquet")
    gflops = tmp_path / "gflops.yaml"
    gflops.write_text("cost_unit: gflops\ncandidates:\n  - {name: extra, cost: 9.0}\n")
    result = runner.invoke(app, ["add-candidate", str(model), "--table", str(new_rows), "--pool", str(gflops),
                                 "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2, result.output
    assert "the router counts cost in seconds, but the pool counts cost in gflops" in " ".join(result.output.split())
    seconds = tmp_path / "seconds.yaml"
    seconds.write_text("cost_unit: seconds\ncandidates:\n  - {name: extra}\n")
    _ok(runner.invoke(app, ["add-candidate", str(model), "--table", str(new_rows), "--pool", str(seconds),
                            "--out", str(tmp_path / "m3")]))
    added = json.loads((tmp_path / "m3" / "router.json").read_text())["added"]
    assert [(a["name"], a["cost"]) for a in added] == [("extra", 2.0)]  # its measured seconds
