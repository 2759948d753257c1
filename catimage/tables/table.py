"""The quality table: the one schema every stage reads or writes (Arrow in memory, Parquet on disk).

Long form, one row per scored sample::

    prompt_id  str     stable id of the prompt (see `stable_prompt_id`)
    prompt     str     the prompt text
    candidate  str     pool candidate name
    seed       int     optional: which sample (seed index) of this (prompt, candidate)
    cost       float   optional: measured wall seconds of this generation (what `catimage build` records)
    image_path str     optional: where the build job stored the image
    <metric>   float   one or more numeric quality columns (clip_score, image_reward, quality, ...)

Generation (`catimage build`) writes it; `fit`, `evaluate` and `train` read it; the public rated sets
load into it. `aggregate` turns it into the prompt x candidate matrix of S-sample means that the
estimators learn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from catimage.errors import TableError
from catimage.tables.served_log import SERVING_COLUMNS, is_served_log, read_served_log, training_rows

if TYPE_CHECKING:
    from catimage.tables.pool import Pool

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt_id", "prompt", "candidate")
OPTIONAL_COLUMNS = ("seed", "cost", "image_path")
NON_METRIC_COLUMNS = frozenset(REQUIRED_COLUMNS + OPTIONAL_COLUMNS + SERVING_COLUMNS)  # + how a logged row was served
GENAI_RATING_RANGE = (1.0, 5.0)
TableFormat = Literal["auto", "table", "genai-bench", "agiqa-3k"]

_COLUMN_TYPES: dict[str, pa.DataType] = {
    "prompt_id": pa.string(),
    "prompt": pa.string(),
    "candidate": pa.string(),
    "seed": pa.int64(),
    "cost": pa.float64(),
    "image_path": pa.string(),
}


def stable_prompt_id(prompt: str) -> str:
    """A prompt id that is the same on every machine and run: 16 hex digits of SHA-1 of the text.

    Whitespace is collapsed first so that trailing spaces in a prompt file do not fork a prompt.
    """
    norm = " ".join(prompt.split())
    return hashlib.sha1(norm.encode("utf-8")).hexdigest()[:16]


def metric_columns(table: pa.Table) -> list[str]:
    """The numeric columns that are not part of the key: the quality metrics."""
    return [
        f.name
        for f in table.schema
        if f.name not in NON_METRIC_COLUMNS and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
    ]


def validate_table(table: pa.Table, source: str = "quality table") -> pa.Table:
    """Check and normalise a table to the schema; raise `TableError` saying exactly what is wrong."""
    if table.num_rows == 0:
        raise TableError(f"{source} is empty: build it first (`catimage build`) or check the file")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise TableError(
            f"{source} lacks required column(s) {missing}; it has {table.column_names}. A quality table needs "
            f"{list(REQUIRED_COLUMNS)} plus at least one numeric metric column"
        )
    for name, typ in _COLUMN_TYPES.items():
        if name in table.column_names and table.schema.field(name).type != typ:
            try:
                idx = table.column_names.index(name)
                table = table.set_column(idx, name, pc.cast(table.column(name), typ))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise TableError(f"{source}: column {name!r} cannot be read as {typ}: {err}") from None
    for name in REQUIRED_COLUMNS:
        if table.column(name).null_count:
            raise TableError(f"{source}: column {name!r} has {table.column(name).null_count} empty value(s)")
    metrics = metric_columns(table)
    if not metrics:
        raise TableError(
            f"{source} has no numeric quality column (columns: {table.column_names}); add one such as "
            "clip_score or quality"
        )
    for name in metrics:
        col = table.column(name)
        if pa.types.is_integer(col.type):
            table = table.set_column(table.column_names.index(name), name, pc.cast(col, pa.float64()))
    return table


def read_quality_table(path: str | Path, fmt: TableFormat = "auto") -> pa.Table:
    """Read a quality table from Parquet (file or directory), CSV, or one of the public rated formats."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path} does not exist; pass the path of a quality table (Parquet or CSV)")
    if path.is_dir() and (path / "quality.parquet").is_file():
        # A build output folder: its quality table, not the errors table or per-run parts beside it.
        path = path / "quality.parquet"
    if path.is_dir() and is_served_log(str(path)):  # a served-traffic log (hour=... partitions)
        return validate_table(training_rows(read_served_log(str(path)), str(path)), source=str(path))
    if fmt == "auto":
        fmt = _guess_format(path)
    if fmt == "genai-bench":
        table = load_genai_bench(path)
    elif fmt == "agiqa-3k":
        table = load_agiqa3k(path)
    elif path.is_dir() or path.suffix in (".parquet", ".pq"):
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise TableError(f"cannot read {path} as Parquet: {err}") from None
    elif path.suffix == ".csv":
        try:
            table = pacsv.read_csv(path)
        except pa.ArrowInvalid as err:
            raise TableError(f"cannot read {path} as CSV: {err}") from None
    else:
        raise TableError(f"{path}: unknown table format; use .parquet, .csv, or --format genai-bench|agiqa-3k")
    return validate_table(table, source=str(path))


def _guess_format(path: Path) -> TableFormat:
    if path.suffix == ".json":
        return "genai-bench"
    if path.suffix == ".csv" and not path.is_dir():
        with path.open() as fh:
            header = fh.readline()
        if "mos_quality" in header and "name" in header.split(","):
            return "agiqa-3k"
    return "table"


def write_quality_table(table: pa.Table, path: str | Path) -> Path:
    """Write a validated table as one Parquet file (parent directories created)."""
    table = validate_table(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def load_genai_bench(path: str | Path) -> pa.Table:
    """GenAI-Bench image ratings: one row per (prompt, model, rater); metric `quality` (1-5)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TableError(f"cannot read {path} as GenAI-Bench JSON: {err}") from None
    rows: dict[str, list[Any]] = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "quality")}
    dropped: list[str] = []
    for key, item in data.items():
        try:
            prompt, models = item["prompt"], item["models"]
        except (TypeError, KeyError):
            raise TableError(f"{path}: entry {key!r} lacks 'prompt' or 'models'; is this genai_image.json?") from None
        for model, ratings in models.items():
            for rater, score in enumerate(ratings):
                if not GENAI_RATING_RANGE[0] <= float(score) <= GENAI_RATING_RANGE[1]:
                    # The published file holds a few typos (41, 33 on a 1-5 scale). One such value
                    # would stretch the [0, 1] scaling of every label, so it is left out, loudly.
                    dropped.append(f"{key}/{model}/rater{rater}={score}")
                    continue
                rows["prompt_id"].append(str(item.get("id", key)))
                rows["prompt"].append(prompt)
                rows["candidate"].append(model)
                rows["seed"].append(rater)  # the sample index: here a rater, not an image seed
                rows["quality"].append(float(score))
    if dropped:
        log.warning("%s: dropped %d rating(s) outside %s: %s", path, len(dropped), GENAI_RATING_RANGE, ", ".join(dropped))
    return pa.table(rows, schema=pa.schema([(k, _COLUMN_TYPES.get(k, pa.float64())) for k in rows]))


_AGIQA_NAME = re.compile(r"^(?P<config>.+)_(?P<index>\d+)\.\w+$")


def load_agiqa3k(path: str | Path) -> pa.Table:
    """AGIQA-3K: candidate = the file-name prefix; metrics `mos_quality` and `mos_align`."""
    try:
        raw = pacsv.read_csv(path)
    except pa.ArrowInvalid as err:
        raise TableError(f"cannot read {path} as AGIQA-3K CSV: {err}") from None
    need = {"name", "prompt", "mos_quality", "mos_align"}
    if not need <= set(raw.column_names):
        raise TableError(f"{path} lacks AGIQA-3K columns {sorted(need - set(raw.column_names))}")
    names = raw.column("name").to_pylist()
    prompts = raw.column("prompt").to_pylist()
    candidates = []
    for n in names:
        match = _AGIQA_NAME.match(n)
        if not match:
            raise TableError(f"{path}: image name {n!r} is not CONFIG_INDEX.ext")
        candidates.append(match["config"])
    # Rows of one prompt share its text across configurations; identify prompts by text.
    return pa.table(
        {
            "prompt_id": [stable_prompt_id(p) for p in prompts],
            "prompt": prompts,
            "candidate": candidates,
            "mos_quality": pc.cast(raw.column("mos_quality"), pa.float64()),
            "mos_align": pc.cast(raw.column("mos_align"), pa.float64()),
        }
    )


@dataclass
class QualityMatrix:
    """Prompt x candidate view of a table: the S-sample mean quality the estimators learn.

    `mean` is NaN where a (prompt, candidate) has no sample; `count` says how many samples each
    mean rests on and `var` their sample variance (NaN below two samples), which noise-aware
    estimators use as weights.
    """

    prompt_ids: list[str]
    prompts: list[str]
    candidates: list[str]
    metric: str
    mean: np.ndarray  # (n, M) float64
    count: np.ndarray  # (n, M) int64
    var: np.ndarray  # (n, M) float64
    cost: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (M,) mean measured seconds per image, or NaN
    # Split-half means (2, n, M): each cell's samples alternately assigned to two halves, NaN below
    # two samples; None when the matrix was not built from per-sample rows. For label-noise estimates.
    half: np.ndarray | None = None

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> QualityMatrix:
        idx = np.asarray(idx, dtype=np.int64)
        return QualityMatrix(
            prompt_ids=[self.prompt_ids[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
            candidates=list(self.candidates),
            metric=self.metric,
            mean=self.mean[idx],
            count=self.count[idx],
            var=self.var[idx],
            cost=self.cost.copy(),
            half=None if self.half is None else self.half[:, idx],
        )

    def measured_costs(self) -> dict[str, float]:
        """Mean measured seconds per image of each candidate the table timed (`MEASURED_COST_UNIT`)."""
        return {c: float(v) for c, v in zip(self.candidates, self.cost) if np.isfinite(v)}


def aggregate(table: pa.Table, metric: str | None = None, candidates: Sequence[str] | None = None) -> QualityMatrix:
    """Average samples per (prompt, candidate) into a `QualityMatrix`.

    `candidates` fixes the column order (usually the pool's) and fails on a candidate the table
    lacks; by default the table's candidates in order of first appearance.
    """
    table = validate_table(table)
    metric = _chosen_metric(table, metric)
    values = _metric_values(table, metric)
    pids = table.column("prompt_id").to_pylist()
    cands = table.column("candidate").to_pylist()
    candidates = _column_order(list(dict.fromkeys(cands)), candidates)
    prompt_index: dict[str, int] = {}
    prompt_text: list[str] = []
    for pid, text in zip(pids, table.column("prompt").to_pylist()):
        if pid not in prompt_index:
            prompt_index[pid] = len(prompt_index)
            prompt_text.append(text)
    cand_index = {c: j for j, c in enumerate(candidates)}
    rows = np.fromiter((prompt_index[p] for p in pids), dtype=np.int64, count=len(pids))
    cols = np.fromiter((cand_index[c] for c in cands), dtype=np.int64, count=len(cands))
    n, m = len(prompt_index), len(candidates)
    count, mean, var = _cell_moments(rows, cols, values, n, m)
    half = _split_half_means(rows, cols, values, count, n, m)
    cost = np.full(m, np.nan)
    if "cost" in table.column_names:
        seconds = table.column("cost").to_numpy(zero_copy_only=False).astype(np.float64)
        for j in range(m):
            sel = (cols == j) & np.isfinite(seconds)
            if sel.any():
                cost[j] = float(seconds[sel].mean())
    return QualityMatrix(list(prompt_index), prompt_text, list(candidates), metric, mean, count, var, cost, half)


def _chosen_metric(table: pa.Table, metric: str | None) -> str:
    metrics = metric_columns(table)
    if metric is None:
        if len(metrics) > 1:
            raise TableError(f"the table has several metrics {metrics}; choose one with --metric")
        metric = metrics[0]
    if metric not in metrics:
        raise TableError(f"metric {metric!r} is not a numeric column of the table; choose one of {metrics}")
    return metric


def _metric_values(table: pa.Table, metric: str) -> np.ndarray:
    values = table.column(metric).to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(values).any():
        bad = int(np.isnan(values).sum())
        raise TableError(f"metric {metric!r} has {bad} NaN/empty value(s); drop or re-score those rows before fitting")
    if not np.isfinite(values).all():
        raise TableError(f"metric {metric!r} has infinite values")
    return values


def _column_order(table_cands: list[str], candidates: Sequence[str] | None) -> list[str]:
    """The matrix's candidate columns: `candidates` (each with rows, covering the table's), else the table's."""
    if candidates is None:
        return table_cands
    candidates = list(candidates)
    unknown = [c for c in table_cands if c not in set(candidates)]
    if unknown:
        raise TableError(
            f"the table has candidate(s) {unknown} that are not among the candidates asked for {candidates} "
            f"(the table has {table_cands}); add them to the pool file or filter the table"
        )
    absent = [c for c in candidates if c not in set(table_cands)]
    if absent:
        raise TableError(f"candidate(s) {absent} have no rows in the table (it has {table_cands}); remove them from the pool")
    return candidates


def _cell_moments(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, sample variance) of each (prompt, candidate) cell; NaN mean without samples,
    NaN variance below two."""
    count = np.zeros((n, m), dtype=np.int64)
    total = np.zeros((n, m))
    total_sq = np.zeros((n, m))
    np.add.at(count, (rows, cols), 1)
    np.add.at(total, (rows, cols), values)
    np.add.at(total_sq, (rows, cols), values * values)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        var = np.where(count > 1, (total_sq - count * mean**2) / np.maximum(count - 1, 1), np.nan)
    return count, mean, np.where(np.isnan(var), var, np.maximum(var, 0.0))


def _split_half_means(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, count: np.ndarray, n: int, m: int
) -> np.ndarray | None:
    """(2, n, M) means of each cell's even- and odd-numbered samples (in table order); NaN where a
    cell has fewer than two samples; None when no cell has two."""
    if not (count >= 2).any():
        return None
    cell = rows * m + cols
    order = np.argsort(cell, kind="stable")
    sorted_cell = cell[order]
    first = np.searchsorted(sorted_cell, sorted_cell, side="left")
    parity = np.empty_like(cell)
    parity[order] = (np.arange(cell.size) - first) % 2
    out = np.full((2, n, m), np.nan)
    for h in (0, 1):
        sel = parity == h
        tot = np.zeros((n, m))
        cnt = np.zeros((n, m))
        np.add.at(tot, (rows[sel], cols[sel]), values[sel])
        np.add.at(cnt, (rows[sel], cols[sel]), 1)
        out[h] = np.where((count >= 2) & (cnt > 0), tot / np.maximum(cnt, 1), np.nan)
    return out


@dataclass
class MetricScaler:
    """Min-max scaling of a metric to [0, 1], fitted on the training split only (as the paper does).

    Estimators are trained on scaled labels (the Transformer's sigmoid heads need [0, 1]); reports
    map predictions back to the metric's own units with `inverse_transform`.
    """

    low: float = 0.0
    high: float = 1.0

    @classmethod
    def fit(cls, values: np.ndarray) -> MetricScaler:
        finite = np.asarray(values, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size == 0:
            raise TableError("cannot fit a metric scaler on no finite values")
        low, high = float(finite.min()), float(finite.max())
        if high - low < 1e-12:
            high = low + 1.0
        return cls(low, high)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(values, dtype=np.float64) - self.low) / (self.high - self.low), 0.0, 1.0)

    def inverse_transform(self, scaled: np.ndarray) -> np.ndarray:
        return np.asarray(scaled, dtype=np.float64) * (self.high - self.low) + self.low

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> MetricScaler:
        return cls(float(data["low"]), float(data["high"]))


@dataclass(frozen=True)
class Split:
    """Prompt indices of the train / calibration / test splits (disjoint, covering every prompt)."""

    train: np.ndarray
    calibration: np.ndarray
    test: np.ndarray


def split_prompts(n: int, test_frac: float = 0.1, calibration_frac: float = 0.1, seed: int = 0) -> Split:
    """A random split of prompts (never of samples: all seeds of a prompt stay together)."""
    if not (0 <= test_frac < 1 and 0 <= calibration_frac < 1 and test_frac + calibration_frac < 1):
        raise TableError(f"test_frac ({test_frac}) and calibration_frac ({calibration_frac}) must be in [0, 1) and sum below 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_frac)
    n_calibration = round(n * calibration_frac)
    if test_frac > 0 and n_test == 0:
        n_test = 1
    if calibration_frac > 0 and n_calibration == 0:
        n_calibration = 1
    if n - n_test - n_calibration < 2:
        raise TableError(f"{n} prompts are too few for test_frac={test_frac}, calibration_frac={calibration_frac}")
    return Split(
        train=np.sort(perm[n_test + n_calibration :]),
        calibration=np.sort(perm[n_test : n_test + n_calibration]),
        test=np.sort(perm[:n_test]),
    )


def load_pool_matrix(
    table_path: str | Path, pool_path: str | Path, fmt: TableFormat = "auto", metric: str | None = None
) -> tuple[Pool, QualityMatrix, np.ndarray]:
    """Read a table and its pool file: (pool restricted to the table's candidates, matrix in pool
    order, cost vector). What `fit`, `evaluate`, `train` and the demo all start from.

    A candidate in the table but not in the pool is an error naming both lists; pool candidates
    without rows are left out, so one pool file serves tables that cover part of it. The costs come
    from `Pool.cost_vector`, which refuses a pool whose costs would mix units. Without
    `metric`, a table with several metric columns is read on the pool's first listed metric (the
    one its builds score first), so `fit`/`evaluate` on a table the pool built need no --metric.
    """
    from catimage.tables.pool import load_pool

    pool = load_pool(pool_path)
    table = read_quality_table(table_path, fmt)
    if metric is None and len(metric_columns(table)) > 1 and pool.metrics:
        metric = pool.metrics[0].name
    present = list(dict.fromkeys(table.column("candidate").to_pylist()))
    strangers = [c for c in present if c not in set(pool.names)]
    if strangers:
        raise TableError(
            f"the table has candidate(s) {strangers} that the pool {pool_path} does not declare; the pool declares "
            f"{pool.names} and the table has {present}: add them to the pool file or filter the table"
        )
    matrix = aggregate(table, metric=metric, candidates=[n for n in pool.names if n in set(present)])
    pool = pool.select(matrix.candidates)
    return pool, matrix, pool.cost_vector(matrix.candidates, measured=matrix.measured_costs())
