"""Plans: the wire form, the stop rule on hand-traced score sequences, and the cost as serving counts it."""

from __future__ import annotations

import math

import pytest

from catimage.errors import CatimageError
from catimage.policy.plans import Plan, executed_attempts, plan_cost

COSTS = {"cheap": 1.0, "mid": 2.0, "dear": 4.0}


def test_plan_wire_form_round_trips_and_validates():
    plan = Plan(("cheap", "cheap", "dear"), 0.8)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.to_dict() == {"attempts": ["cheap", "cheap", "dear"], "threshold": 0.8}
    assert Plan.from_dict({"attempts": ["mid"], "threshold": None}).is_route
    assert Plan(["a", "b"], 1).attempts == ("a", "b") and Plan(["a", "b"], 1).threshold == 1.0
    for bad in ({"attempts": []}, {"attempts": "cheap"}, {"threshold": 0.5}, {"attempts": ["a"], "threshold": "x"},
                {"attempts": ["a"], "threshold": float("nan")}, {"attempts": [""]}):
        with pytest.raises(CatimageError):
            Plan.from_dict(bad)


def test_route_plan_is_unscored_and_others_are_scored():
    assert Plan.route("cheap").is_route and not Plan.route("cheap").scored
    assert Plan(("cheap",), 0.5).scored  # one attempt with a threshold: scored for nothing, but scored
    assert Plan(("cheap", "dear"), None).scored  # best of two
    assert Plan(("cheap", "dear"), None).label() == "best of cheap > dear"
    assert Plan(("cheap", "dear"), 0.75).label() == "cheap > dear @0.75"


def test_cost_counts_generation_and_scoring_of_the_attempts_drawn():
    plan = Plan(("cheap", "mid", "dear"), 0.8)
    # by hand: (1 + .5) + (2 + .5) = 4 after two attempts; + (4 + .5) after three
    assert plan_cost(plan, COSTS, 0.5, drawn=2) == pytest.approx(4.0)
    assert plan_cost(plan, COSTS, 0.5) == pytest.approx(8.5)
    assert plan_cost(Plan.route("dear"), COSTS, 0.5) == pytest.approx(4.0)  # the route plan scores nothing
    with pytest.raises(CatimageError, match="no cost"):
        plan_cost(Plan(("cheap", "other"), 0.5), COSTS, 0.5)
    with pytest.raises(CatimageError):
        plan_cost(plan, COSTS, 0.5, drawn=4)


@pytest.mark.parametrize(
    ("threshold", "scores", "expected"),
    [
        (0.8, [0.5, 0.9, 0.95], (2, 1)),  # the second passes: accepted, the third is never drawn
        (0.8, [0.85, 0.2, 0.2], (1, 0)),  # the first passes
        (0.8, [0.8, 0.2, 0.2], (1, 0)),  # >= threshold passes
        (0.8, [0.5, 0.7, 0.6], (3, 1)),  # none passes: the best-scoring (0.7) is returned
        (0.8, [0.7, 0.7, 0.6], (3, 0)),  # exact tie: the earliest
        (0.8, [math.nan, 0.6, 0.3], (3, 1)),  # a failed score never wins
        (0.8, [math.nan, math.nan, math.nan], (3, 2)),  # nothing scored: the last image drawn
        (0.8, [0.2, math.nan, 0.9], (3, 2)),
        (None, [0.9, 0.95, 0.5], (3, 1)),  # best of three: all drawn, the best kept
    ],
)
def test_stop_rule_on_hand_traced_sequences(threshold, scores, expected):
    assert executed_attempts(Plan(("cheap", "cheap", "dear"), threshold), scores) == expected


def test_route_plan_draws_once_and_needs_no_score():
    assert executed_attempts(Plan.route("dear"), []) == (1, 0)
    with pytest.raises(CatimageError, match="no score"):
        executed_attempts(Plan(("cheap", "dear"), 0.5), [0.1])
