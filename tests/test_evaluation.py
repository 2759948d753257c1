"""Evaluation figures on hand-computed cases, the trial loop on a planted signal, and report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from catimage.errors import CatimageError
from catimage.evaluation.confidence import summarize_trials
from catimage.evaluation.figures import area_between, evaluate_predictions
from catimage.evaluation.plot import curves_to_draw, plot_deferral
from catimage.evaluation.report import render_markdown, write_report
from catimage.evaluation.trials import EvaluateOptions, evaluate_table
from catimage.features.registry import make_embedder
from catimage.tables.table import QualityMatrix, aggregate, read_quality_table

REQUIRED = {"fixed", "router", "oracle", "hull", "summary", "meta"}
SUMMARY_KEYS = {
    "best_fixed",
    "cost_ratio_or_miss",
    "missed_best_fixed",
    "quality_at_best_fixed_cost",
    "area_over_hull",
    "oracle_gain_fraction",
    "gain_at_fixed_cost",
    "trials",
}
META_KEYS = {"metric", "cost_unit", "candidates", "costs", "n_test", "estimator", "embedder", "notes"}
GENAI_COSTS = {  # ../shared/data/README.md "Illustrative costs" (ASSUMED, not measured)
    "SDXL_Turbo": 0.0026,
    "SDXL_2_1": 0.35,
    "SDXL_Base": 1.0,
    "DeepFloyd_I_XL_v1": 1.5,
    "Midjourney_6": 2.0,
    "DALLE_3": 3.0,
}


def _strict_json(text: str) -> object:
    def bad(name: str) -> None:
        raise AssertionError(f"report.json holds {name}")

    return json.loads(text, parse_constant=bad)


# --- pure figures -------------------------------------------------------------------------------


def test_figures_on_hand_example():
    # router curve (see test_routing): (1,.25) (1.5,.3) (3,.7) (4,.85); fixed (1,.25) (2,.5) (4,.85)
    pred = np.array([[0.2, 0.5, 0.6], [0.1, 0.15, 0.9]])
    true = np.array([[0.3, 0.4, 0.7], [0.2, 0.6, 1.0]])
    res = evaluate_predictions(pred, true, [1.0, 2.0, 4.0], ["a", "b", "c"])
    s = res.summary
    assert [(p.candidate, p.cost, p.quality) for p in res.fixed] == [
        ("a", 1.0, pytest.approx(0.25)),
        ("b", 2.0, pytest.approx(0.5)),
        ("c", 4.0, pytest.approx(0.85)),
    ]
    assert [p.index for p in res.hull] == [0, 1, 2]  # slopes .25 then .175: concave
    assert s["best_fixed"] == "c"
    assert s["quality_at_best_fixed_cost"] == pytest.approx(0.85)
    # at cost 2 the router mixes (1.5,.3) and (3,.7): .3 + .4/3
    assert s["gain_at_fixed_cost"] == pytest.approx({"a": 0.0, "b": 0.3 + 0.4 / 3 - 0.5, "c": 0.0})
    # .5 is reached halfway between (1.5,.3) and (3,.7): cost 2.25 = 1.125 x b's cost
    assert s["cost_ratio_or_miss_by_candidate"] == pytest.approx({"a": 1.0, "b": 1.125, "c": 1.0})
    assert s["cost_ratio_or_miss"] == pytest.approx(1.0) and not s["missed_best_fixed"]
    # router - hull at costs 1, 1.5, 2, 3, 4: 0, -.075, -1/15, .025, 0 -> trapezoids sum to -1/16 over a range of 3
    assert s["area_over_hull"] == pytest.approx(-1 / 48)
    assert s["oracle_gain_fraction"] is None  # the oracle also ends at .85 at cost 4: no room to gain


def test_figures_when_the_router_finds_the_oracle():
    # prompt A is best on the cheap candidate, B on the dear one; the router's ranking is right
    true = np.array([[1.0, 0.5], [0.0, 1.0]])
    pred = np.array([[0.9, 0.8], [0.1, 0.9]])
    s = evaluate_predictions(pred, true, [1.0, 2.0], ["cheap", "dear"]).summary
    assert s["best_fixed"] == "dear"
    assert s["quality_at_best_fixed_cost"] == pytest.approx(1.0)  # (1.5, 1.0) held flat to cost 2
    assert s["gain_at_fixed_cost"]["dear"] == pytest.approx(0.25)
    assert s["oracle_gain_fraction"] == pytest.approx(1.0)
    assert s["cost_ratio_or_miss"] == pytest.approx(1.25 / 2)  # .75 between (1,.5) and (1.5,1)
    assert s["area_over_hull"] == pytest.approx(0.25)


def test_a_router_that_never_reaches_the_best_is_a_miss():
    true = np.array([[0.0, 1.0], [0.0, 1.0]])
    pred = np.array([[1.0, 0.0], [1.0, 0.0]])  # exactly backwards: always the cheap, bad one
    s = evaluate_predictions(pred, true, [1.0, 2.0], ["cheap", "dear"]).summary
    assert s["missed_best_fixed"] and s["missed_candidates"] == ["dear"]
    assert s["cost_ratio_or_miss"] == 1.0  # the best fixed is the dearest: a miss counts as 2 / 2
    assert s["gain_at_fixed_cost"]["dear"] == pytest.approx(-1.0)
    assert s["area_over_hull"] == pytest.approx(-0.5)  # mean of -(c - 1) over [1, 2]


def test_oracle_gain_fraction_between_zero_and_one_by_hand():
    # A and A2 are drawn best by the cheap candidate, B and B2 by the dear one; the router gets B2 wrong.
    true = np.array([[1.0, 0.6], [1.0, 0.6], [0.0, 1.0], [0.5, 1.0]])
    pred = np.array([[0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.7, 0.3]])
    s = evaluate_predictions(pred, true, [1.0, 2.0], ["cheap", "dear"]).summary
    # fixed: cheap .625, dear .8 (best, cost 2). Router at lambda 0: cheap, cheap, dear, cheap = (1.25, .875),
    # held flat to cost 2; its only other point is all-cheap (1, .625). Oracle: (1.5, 1.0).
    assert s["best_fixed"] == "dear" and s["best_fixed_quality"] == pytest.approx(0.8)
    assert s["quality_at_best_fixed_cost"] == pytest.approx(0.875)
    assert s["oracle_quality_at_best_fixed_cost"] == pytest.approx(1.0)
    assert s["oracle_gain_fraction"] == pytest.approx(0.075 / 0.2)  # (.875 - .8) / (1 - .8)
    # .8 is reached 70 % of the way from (1, .625) to (1.25, .875): cost 1.175 of the dear one's 2
    assert s["cost_ratio_or_miss"] == pytest.approx(0.5875) and not s["missed_best_fixed"]
    # router minus hull (.625 + .175 (c - 1)): 0 at 1, .20625 at 1.25, .075 at 2 -> trapezoids .02578 + .10547
    assert s["area_over_hull"] == pytest.approx(0.13125)


def test_a_miss_counts_as_the_dearest_cost_over_the_best_when_the_best_is_not_the_dearest():
    # Planted table: "mid" (cost 2) is the best fixed candidate, "dear" (cost 5) is worse than it. The router
    # believes in the cheap one everywhere, so it never reaches mid's quality: a miss, counted as 5 / 2.
    true = np.array([[0.2, 0.9, 0.6], [0.4, 0.7, 0.6]])
    pred = np.array([[0.9, 0.1, 0.1], [0.9, 0.2, 0.1]])
    s = evaluate_predictions(pred, true, [1.0, 2.0, 5.0], ["cheap", "mid", "dear"]).summary
    assert s["best_fixed"] == "mid" and s["missed_best_fixed"]
    assert s["cost_ratio_or_miss"] == pytest.approx(2.5) and s["miss_ratio"] == pytest.approx(2.5)
    assert s["cost_ratio_or_miss_by_candidate"] == pytest.approx({"cheap": 1.0, "mid": 2.5, "dear": 1.0})
    assert s["missed_candidates"] == ["mid", "dear"]


def test_area_between_single_cost_range():
    up = [{"cost": 1.0, "quality": 0.7}]
    low = [{"cost": 1.0, "quality": 0.5}]
    assert area_between(up, low, 1.0, 1.0) == pytest.approx(0.2)


def test_evaluate_predictions_bad_input():
    with pytest.raises(CatimageError, match="differ in shape"):
        evaluate_predictions(np.zeros((3, 2)), np.zeros((2, 2)), [1, 2], ["a", "b"])
    with pytest.raises(CatimageError, match="NaN"):
        evaluate_predictions(np.zeros((2, 2)), np.array([[0.0, np.nan], [0, 0]]), [1, 2], ["a", "b"])
    with pytest.raises(CatimageError, match=">= 0"):
        evaluate_predictions(np.zeros((2, 2)), np.zeros((2, 2)), [1, -2], ["a", "b"])
    with pytest.raises(CatimageError, match="candidates"):
        evaluate_predictions(np.zeros((2, 2)), np.zeros((2, 2)), [1, 2], ["a"])


def test_random_invariants_of_the_summary():
    rng = np.random.default_rng(5)
    n, m = 300, 5
    costs = np.array([0.1, 0.5, 1.0, 2.0, 3.0])
    true = rng.random((n, m)) + np.linspace(0, 0.3, m)
    pred = true + rng.normal(0, 0.3, (n, m))
    s = evaluate_predictions(pred, true, costs, list("abcde")).summary
    assert s["oracle_quality_at_best_fixed_cost"] >= s["quality_at_best_fixed_cost"] - 1e-12
    assert s["oracle_area_over_hull"] >= s["area_over_hull"] - 1e-12
    assert s["oracle_area_over_hull"] >= 0
    assert s["oracle_gain_fraction"] <= 1 + 1e-12  # the oracle is at least as good at every cost
    assert s["gain_at_fixed_cost"]["a"] == 0.0  # the cheapest: every router ends there


def _record(gain: float, quality: float, area: float, ratio: float, missed: bool, frac: float | None,
            counted_as: float = 2.5) -> dict:
    return {"gain_at_best_fixed_cost": gain, "quality_at_best_fixed_cost": quality, "area_over_hull": area,
            "cost_ratio_or_miss": ratio, "missed_best_fixed": missed, "miss_ratio": counted_as,
            "oracle_gain_fraction": frac}


def test_summarize_trials():
    t = summarize_trials([_record(0.2, 3.0, 0.1, 0.5, False, 0.4), _record(-0.1, 2.0, 0.3, 2.5, True, None)])
    assert t["n"] == 2 and t["win_rate"] == 0.5
    assert t["mean_quality_at_best_fixed_cost"] == pytest.approx(2.5)
    assert t["std_quality_at_best_fixed_cost"] == pytest.approx(np.sqrt(0.5))  # sample std
    assert t["mean_cost_ratio_or_miss"] == pytest.approx(1.5) and t["misses"] == 1 and t["miss_ratio"] == 2.5
    assert "mean_cost_ratio_to_match_best_fixed" not in t  # no second, miss-dropping ratio
    assert t["mean_oracle_gain_fraction"] == 0.4 and t["n_oracle_gain_fraction"] == 1
    assert t["std_oracle_gain_fraction"] is None


# --- the trial loop on a planted signal ---------------------------------------------------------


def _planted_matrix(n: int = 160, seed: int = 0) -> QualityMatrix:
    """'cat' prompts are drawn well by the cheap candidate, 'ship' prompts only by the dear one."""
    rng = np.random.default_rng(seed)
    prompts, mean = [], []
    for i in range(n):
        if i % 2:
            prompts.append(f"a cat sleeping on a sofa, photo {i}")
            mean.append([0.9, 0.5])
        else:
            prompts.append(f"a sailing ship in a storm at sea, painting {i}")
            mean.append([0.2, 0.8])
    mean = np.array(mean) + rng.normal(0, 0.05, (n, 2))
    count = np.full((n, 2), 3)
    mean[5, 1] = np.nan  # a missing label: wherever prompt 5 lands, it must not break anything
    count[5, 1] = 0
    return QualityMatrix(
        [f"p{i}" for i in range(n)], prompts, ["cheap", "dear"], "quality", mean, count, np.zeros((n, 2)), np.full(2, np.nan)
    )


@pytest.fixture(scope="module")
def planted_report():
    matrix = _planted_matrix()
    return evaluate_table(matrix, np.array([1.0, 3.0]), EvaluateOptions(
        estimator="knn", estimator_params={"k": 5}, embedder=make_embedder("tfidf", dim=None),
        test_frac=0.25, calibration_frac=0.1, seed=0, trials=3, cost_unit="s", notes=("Costs are ASSUMED.",),
    ))


def test_evaluate_table_finds_the_planted_signal(planted_report):
    rep = planted_report
    assert REQUIRED <= set(rep) and SUMMARY_KEYS <= set(rep["summary"]) and META_KEYS <= set(rep["meta"])
    s = rep["summary"]
    assert s["best_fixed"] == "dear"
    # routing each kind to its good candidate gives ~.85 at cost ~2 vs .65 for always-dear at cost 3
    assert s["quality_at_best_fixed_cost"] > 0.8
    assert s["cost_ratio_or_miss"] < 0.75 and not s["missed_best_fixed"]
    assert s["area_over_hull"] > 0.1
    assert s["oracle_gain_fraction"] > 0.8
    assert s["trials"]["n"] == 3 and s["trials"]["win_rate"] == 1.0
    assert len(rep["per_trial"]) == 3 and len({t["seed"] for t in rep["per_trial"]}) == 3
    assert rep["meta"]["notes"][0] == "Costs are ASSUMED."
    assert rep["meta"]["cost_unit"] == "s" and rep["meta"]["embedder"]["name"] == "tfidf"
    assert rep["meta"]["n_test"] + rep["meta"]["n_test_dropped"] == 40
    assert rep["router"][0]["lambda"] == 0.0
    assert [p["candidate"] for p in rep["fixed"]] == ["cheap", "dear"]


def test_evaluate_table_rejects_wrong_costs():
    with pytest.raises(CatimageError, match="one per candidate"):
        evaluate_table(_planted_matrix(20), np.array([1.0]), EvaluateOptions(estimator="knn", embedder="tfidf"))


# --- report files -------------------------------------------------------------------------------


def test_write_report_files(planted_report, tmp_path):
    paths = write_report(planted_report, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "plot", "html"}
    assert paths["html"].name == "report.html" and paths["html"].parent == paths["markdown"].parent
    data = _strict_json(paths["json"].read_text())
    assert REQUIRED <= set(data)
    md = paths["markdown"].read_text()
    head = md.split("## Summary")[0]
    assert "Costs are ASSUMED." in head  # notes come before any figure
    for title in ("Table 1", "Table 2", "Table 3", "Fixed candidates"):
        assert title in md
    with Image.open(paths["plot"]) as img:
        assert img.size[0] > 500 and img.size[1] > 300


def test_plot_several_routers_and_log_axis(planted_report, tmp_path):
    other = dict(planted_report)
    other["router"] = [{**p, "quality": p["quality"] - 0.05} for p in planted_report["router"]]
    curves = {"knn": planted_report, "worse": other}
    path = plot_deferral(planted_report, tmp_path / "two.png", curves=curves, log_x=True)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (960, 780)  # 8 x 6.5 inches at 120 dpi
    labels = list(curves_to_draw(planted_report, curves))
    assert len(labels) == 2 and all("predicted quality" in label for label in labels)
    multi = dict(planted_report, routers={"knn": planted_report, "worse": other})
    assert "Routers compared" in render_markdown(multi)


def _planted_trial(pred: list[list[float]]) -> dict:
    """Costs 1, 2, 5; 'mid' is the best fixed candidate (.8), not the dearest (.6)."""
    true = np.array([[0.2, 0.9, 0.6], [0.8, 0.7, 0.6]])
    return evaluate_predictions(np.array(pred), true, [1.0, 2.0, 5.0], ["cheap", "mid", "dear"])


def test_report_files_print_one_cost_ratio_with_its_miss_rule(tmp_path):
    from catimage.evaluation.figures import TRIAL_RECORD_KEYS

    # Trial 0 routes perfectly: all-cheap (1, .5), then P1 to mid: (1.5, .85); mid's .8 is reached 6/7 of the
    # way, at cost 1 + .5 * 6/7, a ratio of 5/7 to mid's cost 2. Trial 1 always picks cheap: a miss, 5 / 2.
    hit = _planted_trial([[0.2, 0.9, 0.6], [0.8, 0.7, 0.6]])
    miss = _planted_trial([[0.9, 0.1, 0.1], [0.9, 0.2, 0.1]])
    assert hit.summary["cost_ratio_or_miss"] == pytest.approx(5 / 7)
    records = [{k: r.summary[k] for k in TRIAL_RECORD_KEYS} for r in (hit, miss)]
    report = hit.to_dict()
    report["summary"]["trials"] = summarize_trials(records)
    report["meta"] = {"metric": "q", "cost_unit": "gflops", "candidates": ["cheap", "mid", "dear"]}
    assert report["summary"]["trials"]["mean_cost_ratio_or_miss"] == pytest.approx((5 / 7 + 2.5) / 2)
    paths = write_report(report, tmp_path)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    for text in (md, page):
        assert "1.607" in text and "0.7143" in text  # the mean over both trials, and trial 0's own ratio
        assert "the dearest candidate&#39;s cost" in text or "the dearest candidate's cost" in text
        assert "(2.5 here)" in text
    assert "| 1 |" in md  # one miss in Table 1


# --- the real rated set -------------------------------------------------------------------------


def test_genai_bench_end_to_end(shared_data, tmp_path):
    path = shared_data / "genai-bench-527" / "genai_image.json"
    if not path.is_file():
        pytest.skip("genai_image.json is not in ../shared/data")
    matrix = aggregate(read_quality_table(path), "quality")
    costs = np.array([GENAI_COSTS[c] for c in matrix.candidates])
    rep = evaluate_table(matrix, costs, EvaluateOptions(
        estimator="knn", embedder=make_embedder("tfidf", dim=None),
        test_frac=0.2, calibration_frac=0.1, seed=0, trials=2, cost_unit="relative",
    ))
    assert REQUIRED <= set(rep) and SUMMARY_KEYS <= set(rep["summary"]) and META_KEYS <= set(rep["meta"])
    s = rep["summary"]
    assert rep["meta"]["n_test"] == 105  # complete matrix: nothing dropped
    fixed = {p["candidate"]: p["quality"] for p in rep["fixed"]}
    assert s["best_fixed"] == max(fixed, key=fixed.get)
    assert set(s["gain_at_fixed_cost"]) == set(GENAI_COSTS)
    assert 1.0 <= s["quality_at_best_fixed_cost"] <= 5.0  # the rating scale
    assert s["trials"]["n"] == 2
    paths = write_report(rep, tmp_path)
    _strict_json(paths["json"].read_text())


# --- confidence, misses, label noise ------------------------------------------------------------


def test_fast_figures_match_the_full_evaluation():
    from catimage.evaluation.figures import BOOTSTRAP_FIGURES, fast_figures

    rng = np.random.default_rng(7)
    costs = np.array([0.5, 1.0, 2.0, 4.0])
    for _ in range(5):
        pred, true = rng.random((40, 4)), rng.random((40, 4))
        s = evaluate_predictions(pred, true, costs, list("abcd")).summary
        fast = dict(zip(BOOTSTRAP_FIGURES, fast_figures(pred, true, costs)))
        for key in BOOTSTRAP_FIGURES:
            want = s[key] if s[key] is not None else np.nan
            assert fast[key] == pytest.approx(want, nan_ok=True), key


def test_a_miss_counts_as_the_worst_ratio():
    # The router always picks the cheap candidate: it never reaches the dear one's quality.
    true = np.array([[0.2, 0.9], [0.3, 0.8]])
    pred = np.array([[0.9, 0.1], [0.9, 0.1]])
    s = evaluate_predictions(pred, true, [1.0, 4.0], ["cheap", "dear"]).summary
    assert s["missed_best_fixed"] and s["cost_ratio_or_miss"] == 1.0  # the best fixed is the dearest: 4 / 4
    t = summarize_trials([_record(0.1, 1, 0.1, 0.5, False, 0.5), _record(-0.1, 1, 0.0, 1.0, True, 0.0, 1.0)])
    # mean 0.75, sample std 0.3536, t(0.975, 1) = 12.706: 0.75 +- 12.706 * 0.3536 / sqrt(2)
    assert t["trial_intervals"]["cost_ratio_or_miss"] == pytest.approx([0.75 - 3.1766, 0.75 + 3.1766], abs=1e-3)
    assert t["mean_cost_ratio_or_miss"] == 0.75 and t["misses"] == 1  # what the report leads with


def test_bootstrap_interval_brackets_a_planted_gain():
    from catimage.evaluation.confidence import bootstrap_figures, intervals
    from catimage.evaluation.figures import BOOTSTRAP_FIGURES

    rng = np.random.default_rng(0)
    n = 300
    kind = rng.integers(0, 2, n)
    true = np.stack([np.where(kind, 0.2, 0.8), np.full(n, 0.6)], axis=1) + rng.normal(0, 0.05, (n, 2))
    perfect = evaluate_predictions(true, true, [1.0, 2.0], ["a", "b"]).summary
    point = [perfect[k] for k in BOOTSTRAP_FIGURES]
    ci = intervals(bootstrap_figures(true, true, np.array([1.0, 2.0]), 200, seed=1), point)
    lo, hi = ci["area_over_hull"]
    assert 0 < lo <= perfect["area_over_hull"] <= hi
    assert set(ci) == set(BOOTSTRAP_FIGURES)


def test_verdict_words():
    from catimage.evaluation.confidence import verdict

    trials = {"n": 10, "mean_area_over_hull": 0.1, "mean_gain_at_best_fixed_cost": 0.01, "mean_cost_ratio_or_miss": 0.6,
              "misses": 1, "intervals": {"area_over_hull": [0.05, 0.15], "gain_at_best_fixed_cost": [-0.02, 0.04],
                                         "cost_ratio_or_miss": [0.5, 0.8]},
              "trial_intervals": {"area_over_hull": [0.02, 0.18], "gain_at_best_fixed_cost": [0.001, 0.02],
                                  "cost_ratio_or_miss": [0.4, 0.9]}}
    lines = verdict(trials, "big", "quality")
    assert "hull? yes, with confidence" in lines[0] and "+0.02 to +0.18" in lines[0]  # the wider interval
    assert "not distinguishable" in lines[1]  # the bootstrap interval includes zero
    assert "for less? yes, with confidence" in lines[2] and "1 of 10" in lines[2]
    trials["trial_intervals"]["area_over_hull"] = [-0.01, 0.2]  # training noise alone can make it doubtful
    assert "not distinguishable" in verdict(trials, "big", "quality")[0]


def test_label_noise_separates_signal_from_noise():
    from catimage.evaluation.noise import label_noise

    rng = np.random.default_rng(0)
    n, costs = 400, np.array([1.0, 2.0])
    kind = rng.integers(0, 2, n)
    signal = np.stack([np.where(kind, 0.3, 0.7), np.full(n, 0.5)], axis=1)

    def matrix(strength: float) -> QualityMatrix:
        a = strength * signal + rng.normal(0, 0.2, (n, 2))
        b = strength * signal + rng.normal(0, 0.2, (n, 2))
        return QualityMatrix([str(i) for i in range(n)], ["p"] * n, ["c", "d"], "q", (a + b) / 2,
                             np.full((n, 2), 2), np.zeros((n, 2)), np.full(2, np.nan), half=np.stack([a, b]))

    pure_noise = label_noise(matrix(0.0), costs)
    assert pure_noise["available"] and abs(pure_noise["interaction_split_half_corr"]) < 0.15
    assert pure_noise["noise_share_of_oracle_lead"] > 0.7  # nearly all of the oracle's lead is noise
    strong = label_noise(matrix(3.0), costs)
    # By hand: interaction +-0.3 (variance 0.09); a half's interaction noise (e_c - e_d) / 2 has variance
    # 0.02, so the split-half correlation is 0.09 / 0.11 = 0.82 and Spearman-Brown gives 0.90.
    assert strong["interaction_split_half_corr"] == pytest.approx(0.82, abs=0.05)
    assert strong["interaction_reliability_full_means"] == pytest.approx(0.90, abs=0.03)
    assert strong["noise_share_of_oracle_lead"] < 0.3
    single = QualityMatrix(["0"], ["p"], ["c"], "q", np.zeros((1, 1)), np.ones((1, 1), int), np.zeros((1, 1)),
                           np.full(1, np.nan))
    assert label_noise(single, np.array([1.0]))["available"] is False


def test_evaluate_table_reports_intervals_verdict_and_budget_check(planted_report):
    s = planted_report["summary"]
    assert set(s["intervals"]) and set(s["trials"]["intervals"])
    lo, hi = s["intervals"]["area_over_hull"]
    assert lo <= s["area_over_hull"] <= hi
    assert s["verdict"] and "hull?" in s["verdict"][0]
    checks = s["budget_check"]
    assert [c["budget"] for c in checks] == [1.0, 3.0]
    assert checks[-1]["lambda"] == 0.0


# --- route and cascade in one report ------------------------------------------------------------


def _two_policy_report(cascade_decides_on: str = "q_decider") -> dict:
    """The hand example of test_oracle_gain_fraction_between_zero_and_one_by_hand for route, and a planted
    cascade curve (1, .625) -> (1.2, 1.0) on the same test prompts, judged by q."""
    from catimage.evaluation.figures import evaluate_curve
    from catimage.policy.routing import CurvePoint

    true = np.array([[1.0, 0.6], [1.0, 0.6], [0.0, 1.0], [0.5, 1.0]])
    pred = np.array([[0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.7, 0.3]])
    route = evaluate_predictions(pred, true, [1.0, 2.0], ["cheap", "dear"])
    cascade = evaluate_curve([CurvePoint(0.0, 1.2, 1.0), CurvePoint(0.3, 1.0, 0.625)], true, [1.0, 2.0], ["cheap", "dear"])
    report = route.to_dict()
    report["meta"] = {"metric": "q", "cost_unit": "gflops", "candidates": ["cheap", "dear"]}
    trace = {"prompt_id": "p3", "prompt": "a planted prompt", "label": "cheap > dear @0.5", "budget": 1.5, "lambda": 0.1,
             "attempts": [{"candidate": "cheap", "seed": 0, "decision": 0.25, "judge": 0.5, "accepted": False,
                           "returned": False, "cost": 1.0},
                          {"candidate": "dear", "seed": 1, "decision": 0.75, "judge": 1.0, "accepted": True,
                           "returned": True, "cost": 2.0}]}
    report["policies"] = {
        "route": {**route.to_dict(), "curve": route.to_dict()["router"], "decision_metric": None, "judge_metric": "q",
                  "upper_bound": False},
        "cascade": {**cascade.to_dict(), "curve": cascade.to_dict()["router"], "decision_metric": cascade_decides_on,
                    "judge_metric": "q", "upper_bound": cascade_decides_on == "q", "traces": [trace]},
    }
    report["policies"]["cascade"]["summary"].update({"apgr": 0.123, "cpt_50": 0.0456, "cpt_80": 0.0789})
    return report


def test_markdown_shows_route_and_cascade_with_their_own_figures():
    report = _two_policy_report()
    # the cascade reaches the dear candidate's .8 at 1 + .2 * .175 / .375 = 1.0933, a ratio of .5467; route: .5875
    assert report["policies"]["cascade"]["summary"]["cost_ratio_or_miss"] == pytest.approx(0.546667, abs=1e-6)
    assert report["policies"]["cascade"]["summary"]["area_over_hull"] == pytest.approx(0.25)
    md = render_markdown(report)
    assert "## Policies side by side" in md and "## Policy: route" in md and "## Policy: cascade" in md
    assert "0.5875" in md and "0.5467" in md  # each policy's own cost ratio
    assert md.count("### Table 2") == 2 and md.count("### Table 3") == 2
    assert "decides on **q_decider**, judged by **q**" in md and "IS the judge" not in md
    assert "| 0.123 |" in md and "0.0456" in md  # APGR and CPT(50%) in the side-by-side table
    returned = [line for line in md.splitlines() if "**returned**" in line]
    assert len(returned) == 1 and "| dear | 1 | 0.75 | 1 |" in returned[0]  # attempt 2: decision .75, judge 1
    upper = render_markdown(_two_policy_report(cascade_decides_on="q"))
    assert upper.count("IS the judge") == 1 and "q (upper bound)" in upper


def test_plot_names_each_policy_decider_and_judge(tmp_path):
    labels = list(curves_to_draw(_two_policy_report(), None))
    assert labels == ["route: decides on the router's predicted q, judged by q",
                      "cascade: decides on q_decider, judged by q"]
    upper = list(curves_to_draw(_two_policy_report(cascade_decides_on="q"), None))
    assert upper[1].endswith("UPPER BOUND: the judge decides") and "UPPER" not in upper[0]
    path = plot_deferral(_two_policy_report(), tmp_path / "both.png")
    with Image.open(path) as img:
        assert img.size == (960, 780)
