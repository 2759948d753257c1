"""The demo's summary and requests, on planted reports: expectations written out by hand."""

from __future__ import annotations

from jobs.demo import policy_rows, request_body

DECIDER = "scene_decider"


def _record(ratio: float, missed: bool, area: float) -> dict:
    return {"cost_ratio_or_miss": ratio, "missed_best_fixed": missed, "area_over_hull": area}


def _report(cascade_decides_on: str) -> dict:
    route = [_record(0.8, False, 0.01), _record(1.0, True, -0.002), _record(0.9, False, 0.003)]
    cascade = [_record(0.31, False, 0.05), _record(0.42, False, 0.04), _record(0.35, False, 0.05)]
    return {
        "meta": {"metric": "scene_score"},
        "policies": {
            "route": {"per_trial": route, "summary": {"trials": {"mean_cost_ratio_or_miss": 0.9}},
                      "decision_metric": None, "judge_metric": "scene_score", "upper_bound": False},
            "cascade": {"per_trial": cascade, "summary": {"trials": {"mean_cost_ratio_or_miss": 0.36}},
                        "decision_metric": cascade_decides_on, "judge_metric": "scene_score",
                        "upper_bound": cascade_decides_on == "scene_score"},
        },
    }


def test_policy_rows_show_every_split_and_mark_misses_and_upper_bounds():
    route, cascade = policy_rows(_report(DECIDER))
    assert route == ["route", "the router's predicted scene_score", "scene_score", "0.80, 1.00 (miss), 0.90", "0.9", "2/3"]
    assert cascade == ["cascade", DECIDER, "scene_score", "0.31, 0.42, 0.35", "0.36", "3/3"]
    _, upper = policy_rows(_report("scene_score"))
    assert upper[1] == "scene_score" and upper[2] == "scene_score (UPPER BOUND)"


def test_a_request_names_its_policy_only_when_the_app_takes_one():
    assert "policy" not in request_body("a red circle", 1.5, None)
    assert request_body("a red circle", 1.5, "cascade") == {
        "prompt": "a red circle", "budget": 1.5, "seed": 0, "return": "png_base64", "policy": "cascade"}
