"""The command line: the user-facing paths of evaluate / fit / route, and clear errors at the boundary."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
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
    assert "**Verdict**" in (out / "report.md").read_text()


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
    badpool.write_text("cost_unit: s\ncandidates:\n  - {name: small, cost: 1.0}\n")
    fmt = {"model": model, "root": root, "pool": pool, "table": table, "badpool": badpool}
    result = runner.invoke(app, [a.format(**fmt) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
