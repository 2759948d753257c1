"""Decision scores put on the judge's scale (catimage.tables.judge_scale), against hand computations."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest

from catimage.errors import TableError
from catimage.tables.judge_scale import fit_judge_scale, on_judge_scale


def _base() -> pa.Table:
    # A: the decider says 0.8 and 0.6 where the judge says 0.7 and 0.5 -> offset -0.1 (by hand);
    # B: 0.4 where the judge says 0.6 -> +0.2.
    return pa.table({"prompt_id": ["p1", "p2", "p1"], "prompt": ["a", "b", "a"], "candidate": ["A", "A", "B"],
                     "seed": [0, 0, 0], "dec": [0.8, 0.6, 0.4], "judge": [0.7, 0.5, 0.6]})


def test_offsets_are_the_mean_judge_minus_decision_per_candidate():
    scale = fit_judge_scale(_base(), "dec", "judge")
    assert scale.offsets == pytest.approx({"A": -0.1, "B": 0.2})
    assert scale.draws == {"A": 2, "B": 1}


def test_logged_rows_take_their_candidates_offset_and_judged_rows_keep_the_judge(caplog):
    scale = fit_judge_scale(_base(), "dec", "judge")
    logged = pa.table({"prompt_id": ["q1", "q1", "q2"], "prompt": ["c", "c", "d"], "candidate": ["A", "B", "C"],
                       "seed": [1, 1, 1], "dec": [0.9, 0.3, 0.5]})
    with caplog.at_level(logging.WARNING):
        out = on_judge_scale(logged, scale)
    assert out.column("judge").to_pylist() == pytest.approx([0.8, 0.5, 0.5])
    assert "['C']" in caplog.text  # a candidate the base never saw keeps its decision score, and says so
    both = on_judge_scale(pa.concat_tables([_base(), logged.append_column("judge", pa.nulls(3, pa.float64()))]), scale)
    assert both.column("judge").to_pylist() == pytest.approx([0.7, 0.5, 0.6, 0.8, 0.5, 0.5])


def test_a_table_without_both_scores_is_refused():
    with pytest.raises(TableError, match="no row holds both"):
        fit_judge_scale(_base().set_column(5, "judge", pa.nulls(3, pa.float64())), "dec", "judge")
    with pytest.raises(TableError, match="no judge column 'rating'"):
        fit_judge_scale(_base(), "dec", "rating")
