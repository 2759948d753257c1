"""The quality-table schema, its readers, aggregation into the S-sample mean, scaling and splits."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catimage.errors import TableError
from catimage.tables.table import (
    MetricScaler,
    aggregate,
    metric_columns,
    read_quality_table,
    split_prompts,
    stable_prompt_id,
    validate_table,
    write_quality_table,
)


def _table(**over):
    data = {
        "prompt_id": ["p1", "p1", "p1", "p2", "p2", "p2"],
        "prompt": ["a cat", "a cat", "a cat", "a dog", "a dog", "a dog"],
        "candidate": ["fast", "fast", "slow", "fast", "slow", "slow"],
        "seed": [0, 1, 0, 0, 0, 1],
        "cost": [1.0, 1.0, 4.0, 1.0, 4.0, 4.0],
        "clip_score": [20.0, 22.0, 30.0, 10.0, 25.0, 27.0],
    }
    data.update(over)
    return pa.table(data)


def test_aggregate_means_counts_variances_and_costs():
    m = aggregate(_table())
    assert m.prompt_ids == ["p1", "p2"] and m.candidates == ["fast", "slow"]
    np.testing.assert_allclose(m.mean, [[21.0, 30.0], [10.0, 26.0]])
    np.testing.assert_array_equal(m.count, [[2, 1], [1, 2]])
    assert m.var[0, 0] == pytest.approx(2.0) and m.var[1, 1] == pytest.approx(2.0)
    assert np.isnan(m.var[0, 1])
    np.testing.assert_allclose(m.cost, [1.0, 4.0])


def test_aggregate_follows_pool_order_and_marks_missing_cells():
    t = _table().take([0, 1, 2, 4, 5])  # p2 keeps only its 'slow' samples
    m = aggregate(t, candidates=["slow", "fast"])
    assert m.candidates == ["slow", "fast"]
    assert np.isnan(m.mean[1, 1]) and m.count[1, 1] == 0
    assert m.mean[1, 0] == pytest.approx(26.0)


def test_metric_must_be_chosen_when_ambiguous():
    t = _table(image_reward=[0.1] * 6)
    assert metric_columns(t) == ["clip_score", "image_reward"]
    with pytest.raises(TableError, match="--metric"):
        aggregate(t)
    assert aggregate(t, metric="image_reward").metric == "image_reward"
    with pytest.raises(TableError, match="choose one of"):
        aggregate(t, metric="aesthetic")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (_table().drop_columns(["candidate"]), r"lacks required column\(s\) \['candidate'\]"),
        (_table().slice(0, 0), "is empty"),
        (_table().drop_columns(["clip_score"]), "no numeric quality column"),
    ],
)
def test_validation_errors(table, message):
    with pytest.raises(TableError, match=message):
        validate_table(table)


def test_nan_quality_is_refused_with_count():
    with pytest.raises(TableError, match="1 NaN"):
        aggregate(_table(clip_score=[20.0, np.nan, 30.0, 10.0, 25.0, 27.0]))


def test_unknown_and_absent_candidates():
    with pytest.raises(TableError, match=r"\['slow'\] that are not among the candidates asked for \['fast'\]"):
        aggregate(_table(), candidates=["fast"])
    with pytest.raises(TableError, match="have no rows"):
        aggregate(_table(), candidates=["fast", "slow", "api"])


def test_parquet_and_csv_roundtrip(tmp_path):
    path = write_quality_table(_table(), tmp_path / "q" / "t.parquet")
    assert read_quality_table(path).equals(validate_table(_table()))
    # A directory of Parquet parts reads as one table (what the build job writes).
    pq.write_table(_table(), tmp_path / "q" / "u.parquet")
    assert read_quality_table(tmp_path / "q").num_rows == 12
    csv = tmp_path / "t.csv"
    _table().to_pandas().to_csv(csv, index=False)
    assert aggregate(read_quality_table(csv)).mean.shape == (2, 2)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(TableError, match="does not exist"):
        read_quality_table(tmp_path / "none.parquet")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(TableError, match="unknown table format"):
        read_quality_table(tmp_path / "t.xlsx")


def test_stable_prompt_id_ignores_spacing_only():
    assert stable_prompt_id("a  red car ") == stable_prompt_id("a red car")
    assert stable_prompt_id("a red car") != stable_prompt_id("a red cat")
    assert len(stable_prompt_id("x")) == 16


def test_scaler_fits_on_given_values_and_inverts():
    s = MetricScaler.fit(np.array([[2.0, np.nan], [4.0, 6.0]]))
    assert (s.low, s.high) == (2.0, 6.0)
    np.testing.assert_allclose(s.transform([2.0, 4.0, 6.0, 8.0]), [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(s.inverse_transform([0.0, 0.5]), [2.0, 4.0])
    assert MetricScaler.from_dict(s.to_dict()) == s


def test_split_is_disjoint_covering_and_seeded():
    sp = split_prompts(100, 0.1, 0.2, seed=3)
    allidx = np.concatenate([sp.train, sp.calibration, sp.test])
    assert sorted(allidx) == list(range(100))
    assert (len(sp.test), len(sp.calibration)) == (10, 20)
    assert np.array_equal(split_prompts(100, 0.1, 0.2, seed=3).test, sp.test)
    assert not np.array_equal(split_prompts(100, 0.1, 0.2, seed=4).test, sp.test)
    with pytest.raises(TableError):
        split_prompts(3, 0.5, 0.4)


def test_genai_bench_loads_one_row_per_rating(shared_data):
    t = read_quality_table(shared_data / "genai-bench-527" / "genai_image.json")
    # Two published ratings lie outside the 1-5 scale (41 and 33): they are dropped.
    assert t.num_rows == 527 * 6 * 3 - 2
    q = t.column("quality").to_numpy()
    assert q.min() >= 1 and q.max() <= 5
    m = aggregate(t)
    assert m.mean.shape == (527, 6) and (m.count == 3).sum() == 527 * 6 - 2
    means = dict(zip(m.candidates, m.mean.mean(axis=0)))
    assert means["DALLE_3"] == pytest.approx(3.70, abs=0.01)
    assert means["SDXL_2_1"] == pytest.approx(2.85, abs=0.005)


def test_genai_bench_out_of_scale_ratings_are_dropped(tmp_path):
    path = tmp_path / "g.json"
    path.write_text('{"1": {"id": "1", "prompt": "a cat", "models": {"A": [5, 41, 4], "B": [2, 3, 3]}}}')
    m = aggregate(read_quality_table(path))
    np.testing.assert_array_equal(m.count, [[2, 3]])
    assert m.mean[0, 0] == pytest.approx(4.5)


def test_agiqa3k_loads_configs_from_file_names(shared_data):
    t = read_quality_table(shared_data / "agiqa-3k" / "data.csv")
    assert set(metric_columns(t)) == {"mos_quality", "mos_align"}
    m = aggregate(t, metric="mos_quality")
    assert m.mean.shape == (300, 10)
    assert "sd1.5_lowstep" in m.candidates and "midjourney_normal" in m.candidates
    assert np.isnan(m.mean[:, m.candidates.index("DALLE2_normal")]).sum() == 10


def test_build_output_folder_reads_its_quality_table(tmp_path):
    write_quality_table(_table(), tmp_path / "quality.parquet")
    pq.write_table(pa.table({"prompt_id": ["p9"], "error": ["boom"]}), tmp_path / "errors.parquet")
    assert read_quality_table(tmp_path).num_rows == 6


def test_scaler_keeps_missing_labels_missing():
    s = MetricScaler(0.0, 10.0)
    out = s.transform(np.array([[5.0, np.nan]]))
    assert out[0, 0] == 0.5 and np.isnan(out[0, 1])


def test_load_pool_matrix_restricts_pool_to_the_table_and_rejects_strangers(tmp_path):
    from catimage.tables.table import load_pool_matrix

    path = write_quality_table(_table(), tmp_path / "t.parquet")
    pool = tmp_path / "pool.yaml"
    pool.write_text("cost_unit: seconds\ncandidates:\n  - {name: slow, cost: 4}\n  - {name: api, cost: 9}\n  - {name: fast, cost: 1}\n")
    p, m, costs = load_pool_matrix(path, pool)
    assert p.names == m.candidates == ["slow", "fast"]
    np.testing.assert_array_equal(costs, [4.0, 1.0])
    pool.write_text("cost_unit: seconds\ncandidates:\n  - {name: slow, cost: 4}\n")
    with pytest.raises(TableError, match=r"\['fast'\] that the pool .* does not declare; the pool declares \['slow'\] "
                                         r"and the table has \['fast', 'slow'\]"):
        load_pool_matrix(path, pool)


def test_a_pool_sharing_no_candidate_with_the_table_names_both(tmp_path):
    """Not "the pool does not declare []": the pool's candidates and the table's are both named."""
    from catimage.tables.table import load_pool_matrix

    path = write_quality_table(_table(), tmp_path / "t.parquet")
    pool = tmp_path / "pool.yaml"
    pool.write_text("cost_unit: seconds\ncandidates:\n  - {name: sdxl, cost: 4}\n  - {name: turbo, cost: 1}\n")
    with pytest.raises(TableError) as err:
        load_pool_matrix(path, pool)
    assert "['sdxl', 'turbo']" in str(err.value) and "['fast', 'slow']" in str(err.value)
    assert "[]" not in str(err.value)


def test_aggregate_names_the_table_candidates_when_asked_for_others():
    with pytest.raises(TableError) as err:
        aggregate(_table(), "clip_score", candidates=["fast", "slow", "sdxl"])
    assert "['sdxl']" in str(err.value) and "['fast', 'slow']" in str(err.value)


def test_measured_seconds_in_the_table_fill_only_a_seconds_pool(tmp_path):
    """The table's `cost` column is measured seconds: it stands in for an undeclared cost in a
    seconds pool, and a gflops pool with an undeclared cost is refused naming both units."""
    from catimage.errors import PoolError
    from catimage.tables.table import load_pool_matrix

    path = write_quality_table(_table(), tmp_path / "t.parquet")
    pool = tmp_path / "pool.yaml"
    pool.write_text("cost_unit: seconds\ncandidates:\n  - {name: slow}\n  - {name: fast, cost: 0.5}\n")
    _, _, costs = load_pool_matrix(path, pool)
    np.testing.assert_array_equal(costs, [4.0, 0.5])  # slow: the mean of its rows' 4.0 s; fast: declared
    pool.write_text("cost_unit: gflops\ncandidates:\n  - {name: slow}\n  - {name: fast, cost: 0.5}\n")
    with pytest.raises(PoolError, match=r"\['slow'\].*seconds.*gflops"):
        load_pool_matrix(path, pool)


def test_split_half_means_by_hand():
    import pyarrow as pa

    from catimage.tables.table import aggregate

    t = pa.table({"prompt_id": ["p"] * 5 + ["q"], "prompt": ["p"] * 5 + ["q"], "candidate": ["a"] * 3 + ["b"] * 2 + ["a"],
                  "quality": [1.0, 2.0, 4.0, 3.0, 5.0, 7.0]})
    m = aggregate(t, "quality")
    # cell (p, a): samples 1, 2, 4 -> halves {1, 4} and {2}; (p, b): {3} and {5}; (q, a): one sample -> NaN
    np.testing.assert_allclose(m.half[0], [[2.5, 3.0], [np.nan, np.nan]])
    np.testing.assert_allclose(m.half[1], [[2.0, 5.0], [np.nan, np.nan]])
    assert m.subset([1]).half.shape == (2, 1, 2)


def test_load_pool_matrix_reads_the_pools_first_metric_when_the_table_has_several(tmp_path):
    from catimage.tables.table import load_pool_matrix

    path = write_quality_table(_table(sharpness=[0.5] * 6), tmp_path / "t.parquet")
    pool = tmp_path / "pool.yaml"
    pool.write_text("cost_unit: seconds\nmetrics:\n  - {name: sharpness}\n  - {name: clip_score}\n"
                    "candidates:\n  - {name: slow, cost: 4}\n  - {name: fast, cost: 1}\n")
    _, m, _ = load_pool_matrix(path, pool)
    assert m.metric == "sharpness" and np.allclose(m.mean, 0.5)
    pool.write_text("cost_unit: seconds\ncandidates:\n  - {name: slow, cost: 4}\n  - {name: fast, cost: 1}\n")
    with pytest.raises(TableError, match="--metric"):  # no metrics listed: still the user's choice
        load_pool_matrix(path, pool)
