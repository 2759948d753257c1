"""The served-traffic log: explicit schema, hourly partitions, a fresh file per flush, bounded memory,
the privacy switch, and read back as a quality table by the ordinary readers (no conversion step)."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from catimage.cli import app
from catimage.errors import TableError
from catimage.tables.served_log import (
    LogConfig,
    ServedLogWriter,
    ServedRow,
    read_served_log,
    served_log_schema,
)
from catimage.tables.table import aggregate, metric_columns, read_quality_table, stable_prompt_id

T0 = datetime(2026, 12, 5, 13, 50, tzinfo=UTC)


def _row(i: int, prompt: str = "a red circle", candidate: str = "small", score: float | None = 0.5,
         minutes: int = 0, **kw) -> ServedRow:
    kw.setdefault("pool_cost", 1.0)
    kw.setdefault("request_id", f"r{i}")
    return ServedRow(prompt_id=stable_prompt_id(prompt), prompt=prompt, candidate=candidate, seed=i, scores={"decider": score}, time=T0 + timedelta(minutes=minutes), **kw)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))


def test_rows_land_in_hour_partitions_and_read_back_with_the_explicit_schema(tmp_path):
    writer = ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider",), flush_rows=100))
    rows = [_row(0, minutes=0, propensity=0.25, latency_ms=12.0), _row(1, minutes=20, score=0.9, attempt=1)]
    writer.append(rows)
    assert writer.pending == 2 and writer.written == 0  # below flush_rows: nothing written yet
    assert writer.close() == 2
    files = _files(tmp_path)
    assert [f.split("/")[0] for f in files] == ["hour=2026-12-05T13", "hour=2026-12-05T14"]
    table = read_served_log(str(tmp_path))
    assert table.schema.remove(table.schema.get_field_index("hour")) == served_log_schema(["decider"])
    assert table.column("seed").to_pylist() == [0, 1]
    assert table.column("propensity").to_pylist() == [0.25, 1.0]
    assert table.column("decider").to_pylist() == [0.5, 0.9]
    assert table.column("plan").to_pylist() == ["small", "small"]  # a route plan is its candidate
    assert table.column("time").to_pylist()[1] == T0 + timedelta(minutes=20)


def test_each_flush_writes_a_fresh_file_and_loses_nothing(tmp_path):
    writer = ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider",), flush_rows=2))
    assert writer.append([_row(0), _row(1)]) == 2  # reaches flush_rows: written now
    assert writer.pending == 0 and writer.written == 2
    writer.append([_row(2)])
    assert writer.flush() == 1
    assert writer.flush() == 0
    assert len(_files(tmp_path)) == 2  # same hour, two flushes, two files (never an overwrite)
    assert sorted(read_served_log(str(tmp_path)).column("seed").to_pylist()) == [0, 1, 2]


def test_an_unwritable_store_keeps_rows_in_bounded_memory_and_counts_the_dropped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = ServedLogWriter(LogConfig(uri=str(blocker / "log"), metrics=("decider",), flush_rows=2,
                                       max_buffered_rows=5))
    writer.append([_row(i) for i in range(4)])  # flushes fail: serving must not see an error
    assert writer.pending == 4 and writer.dropped == 0 and writer.last_error
    writer.append([_row(i) for i in range(4, 7)])
    assert writer.pending == 5 and writer.dropped == 2  # the two oldest went, and were counted
    with pytest.raises(OSError):
        writer.flush()  # an explicit flush says so
    assert writer.pending == 5


def test_a_bad_row_is_refused_and_nothing_of_its_batch_is_buffered(tmp_path):
    writer = ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider",)))
    with pytest.raises(TableError, match="propensity"):
        writer.append([_row(0), _row(1, propensity=0.0)])
    with pytest.raises(TableError, match="not log columns"):
        writer.append([ServedRow("id", "p", "small", 0, 1.0, "r", scores={"judge": 1.0})])
    with pytest.raises(TableError, match="pool_cost"):
        writer.append([_row(0), _row(1, pool_cost=float("nan"))])
    assert writer.pending == 0


def test_privacy_switch_stores_a_keyed_hash_and_refuses_to_train(tmp_path):
    cfg = LogConfig(uri=str(tmp_path), metrics=("decider",), hash_prompts=True, hash_salt="secret")
    with ServedLogWriter(cfg) as writer:
        writer.append([_row(0, "a red circle"), _row(1, "a  red circle "), _row(2, "a blue square")])
    table = read_served_log(str(tmp_path))
    prompts = table.column("prompt").to_pylist()
    assert not any("circle" in p or "square" in p for p in prompts)
    assert prompts[0] == prompts[1] != prompts[2]  # equal text (up to spaces), equal hash
    assert stable_prompt_id("a red circle") not in table.column("prompt_id").to_pylist()
    with pytest.raises(TableError, match="hashed prompts"):
        read_quality_table(tmp_path)
    with pytest.raises(TableError, match="salt"):
        LogConfig(uri=str(tmp_path), metrics=("decider",), hash_prompts=True)


def test_the_log_folder_reads_as_a_quality_table_with_only_the_scores_as_metrics(tmp_path):
    with ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider",))) as writer:
        writer.append([
            _row(0, "a red circle", "small", 0.2), _row(1, "a red circle", "small", 0.4, minutes=30),
            _row(2, "a red circle", "big", 0.9), _row(3, "a blue square", "big", None),  # unscored: left out
            _row(4, "a blue square", "small", 0.7, propensity=0.1, latency_ms=3.0, lam=0.5),
        ])
    table = read_quality_table(tmp_path)
    assert metric_columns(table) == ["decider"]  # propensity, latency_ms, lam, costs, attempt: not metrics
    m = aggregate(table, candidates=["small", "big"])
    np.testing.assert_allclose(m.mean, [[0.3, 0.9], [0.7, np.nan]])
    np.testing.assert_array_equal(m.count, [[2, 1], [1, 0]])


def test_any_fsspec_uri_works(tmp_path):
    uri = "memory://catimage-test/served"
    with ServedLogWriter(LogConfig(uri=uri, metrics=("decider",))) as writer:
        writer.append([_row(0), _row(1, minutes=30)])
    assert read_served_log(uri).num_rows == 2


def test_a_log_whose_metric_set_changed_still_reads(tmp_path):
    with ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider",))) as writer:
        writer.append([_row(0)])
    with ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider", "other"))) as writer:
        writer.append([ServedRow("id", "p", "small", 1, 1.0, "r1", scores={"decider": 0.1, "other": 0.3},
                                 time=T0)])
    table = read_served_log(str(tmp_path))
    assert sorted(table.column("other").to_pylist(), key=lambda v: (v is None, v)) == [0.3, None]
    assert table.schema.field("other").type == pa.float64()


def test_catimage_fit_and_train_read_a_log_folder_with_no_conversion(tmp_path):
    rng = np.random.default_rng(0)
    log_dir, pool, model = tmp_path / "log", tmp_path / "pool.yaml", tmp_path / "model"
    pool.write_text("cost_unit: relative\ncandidates:\n  - {name: small, cost: 1.0}\n  - {name: big, cost: 4.0}\n")
    words = ["circle", "square", "star", "moon", "tree", "house", "car", "bird", "fish", "cloud"]
    rows = []
    for i in range(60):
        prompt = f"a {words[i % 10]} number {i}"
        for k, cand in enumerate(("small", "big")):
            rows.append(_row(2 * i + k, prompt, cand, float(rng.uniform()), minutes=i))
    with ServedLogWriter(LogConfig(uri=str(log_dir), metrics=("decider",))) as writer:
        writer.append(rows)
    result = CliRunner().invoke(app, ["fit", str(log_dir), "--pool", str(pool), "--out", str(model),
                                      "--embedder", "tfidf", "--estimator", "knn"])
    assert result.exit_code == 0, result.output
    assert (model / "router.json").is_file()
    assert '"metric": "decider"' in (model / "router.json").read_text()
    trained = tmp_path / "trained"
    result = CliRunner().invoke(app, ["train", str(log_dir), "--pool", str(pool), "--out", str(trained),
                                      "--embedder", "tfidf", "--estimator", "knn"])
    assert result.exit_code == 0, result.output
    assert '"metric": "decider"' in (trained / "router.json").read_text()


def test_training_keeps_first_attempts_unless_asked_for_all(tmp_path):
    from catimage.tables.served_log import training_rows

    with ServedLogWriter(LogConfig(uri=str(tmp_path), metrics=("decider",))) as writer:
        writer.append([_row(0, score=0.2, attempt=0, returned=False, request_id="a"),
                       _row(1, score=0.3, attempt=1, returned=False, request_id="a"),
                       _row(2, score=0.9, attempt=2, request_id="a"), _row(3, "a blue square", score=0.7)])
    log_table = read_served_log(str(tmp_path))
    # a cascade drew again because its first draws failed: only the first is free of that selection
    assert sorted(training_rows(log_table).column("decider").to_pylist()) == [0.2, 0.7]
    assert sorted(training_rows(log_table, attempts="all").column("decider").to_pylist()) == [0.2, 0.3, 0.7, 0.9]
    with pytest.raises(TableError, match="attempts"):
        training_rows(log_table, attempts="some")
