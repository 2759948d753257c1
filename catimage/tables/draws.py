"""The per-draw view of a quality table: every seed's decision and judge scores, not their means.

A cascade decides on each image as it is drawn, so it needs what single draws score, not the S-sample
means that `aggregate` keeps. The table already holds one row per (prompt, candidate, seed);
`draws_from_table` arranges two of its metric columns as (prompt, candidate, seed) arrays:

    decision (n, M, S)  what a policy reads online (the decision metric)
    judge    (n, M, S)  what a figure reports (the judge)
    seed     (n, M, S)  the table's seed value of each draw, -1 where absent (decision / judge NaN)

Seeds of a cell are sorted by seed value, so draw s of every candidate is the same seed index
(builds start a seed index from the same noise for every candidate). Prompts are in the order of
first appearance, as in `aggregate`, so `Draws` and `QualityMatrix` rows line up. When the decision
metric IS the judge, every figure built on the draws is an upper bound (`upper_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from catimage.errors import TableError
from catimage.tables.table import metric_columns, validate_table

if TYPE_CHECKING:
    from catimage.tables.pool import Pool

__all__ = ["CascadeInputs", "Draws", "cascade_inputs", "draws_from_table"]


@dataclass
class Draws:
    """Per-draw scores of n prompts x M candidates x S seeds (NaN / seed -1 where absent)."""

    prompt_ids: list[str]
    prompts: list[str]
    candidates: list[str]
    decision: np.ndarray  # (n, M, S) float64
    judge: np.ndarray  # (n, M, S) float64
    seed: np.ndarray  # (n, M, S) int64, -1 where absent
    decision_metric: str = "decision"
    judge_metric: str = "judge"

    def __post_init__(self) -> None:
        self.decision = np.asarray(self.decision, dtype=np.float64)
        self.judge = np.asarray(self.judge, dtype=np.float64)
        self.seed = np.asarray(self.seed, dtype=np.int64)
        shape = (len(self.prompt_ids), len(self.candidates))
        if self.decision.ndim != 3 or self.decision.shape[:2] != shape:
            raise TableError(f"decision has shape {self.decision.shape}, expected {shape} x seeds")
        if self.judge.shape != self.decision.shape or self.seed.shape != self.decision.shape:
            raise TableError(
                f"decision {self.decision.shape}, judge {self.judge.shape} and seed {self.seed.shape} must have one shape"
            )
        if len(self.prompts) != shape[0]:
            raise TableError(f"{len(self.prompts)} prompt texts for {shape[0]} prompt ids")

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_seeds(self) -> int:
        return int(self.decision.shape[2])

    @property
    def present(self) -> np.ndarray:
        """(n, M, S) bool: the draw exists (both scores known)."""
        return np.isfinite(self.decision) & np.isfinite(self.judge)

    @property
    def upper_bound(self) -> bool:
        """The decision metric is the judge: figures that select by it and report it are upper bounds."""
        return self.decision_metric == self.judge_metric

    def judge_mean(self) -> np.ndarray:
        """(n, M) mean judge score over each cell's draws (NaN where a cell has none)."""
        present = self.present
        count = present.sum(axis=2)
        total = np.where(present, self.judge, 0.0).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Draws:
        idx = np.asarray(idx, dtype=np.int64)
        return Draws(
            [self.prompt_ids[i] for i in idx], [self.prompts[i] for i in idx], list(self.candidates),
            self.decision[idx], self.judge[idx], self.seed[idx], self.decision_metric, self.judge_metric,
        )


def draws_from_table(
    table: pa.Table, candidates: Sequence[str], decision_metric: str, judge_metric: str,
) -> Draws:
    """Per-draw decision and judge scores of `candidates` (in that order) from a quality table.

    Without a `seed` column, a cell's rows are its draws in table order. Rows of candidates not in
    `candidates` are ignored (the pool chooses); a listed candidate without rows is an error.
    """
    table = validate_table(table)
    metrics = metric_columns(table)
    for role, name in (("decision", decision_metric), ("judge", judge_metric)):
        if name not in metrics:
            raise TableError(
                f"{role} metric {name!r} is not a numeric column of the table; its metrics are {metrics}"
            )
    candidates = list(candidates)
    cands = np.asarray(table.column("candidate").to_pylist(), dtype=object)
    keep = np.isin(cands, candidates)
    absent = [c for c in candidates if c not in set(cands[keep])]
    if absent:
        raise TableError(f"candidate(s) {absent} have no rows in the table; it has {sorted(set(cands))}")
    pids = table.column("prompt_id").to_pylist()
    texts = table.column("prompt").to_pylist()
    order: dict[str, int] = {}
    prompts: list[str] = []
    for pid, text in zip(pids, texts):
        if pid not in order:
            order[pid] = len(order)
            prompts.append(text)
    rows = np.fromiter((order[p] for p in pids), dtype=np.int64, count=len(pids))[keep]
    col_of = {c: j for j, c in enumerate(candidates)}
    cols = np.fromiter((col_of[c] for c in cands[keep]), dtype=np.int64, count=int(keep.sum()))
    seeds = (table.column("seed").to_numpy(zero_copy_only=False).astype(np.int64)[keep]
             if "seed" in table.column_names else np.arange(int(keep.sum()), dtype=np.int64))
    dec = table.column(decision_metric).to_numpy(zero_copy_only=False).astype(np.float64)[keep]
    jud = table.column(judge_metric).to_numpy(zero_copy_only=False).astype(np.float64)[keep]
    n, m = len(order), len(candidates)
    srt = np.lexsort((seeds, cols, rows))  # per cell, seeds in increasing order
    rows, cols, seeds, dec, jud = rows[srt], cols[srt], seeds[srt], dec[srt], jud[srt]
    cell = rows * m + cols
    first = np.searchsorted(cell, cell, side="left")
    slot = np.arange(cell.size) - first
    dup = (slot > 0) & (seeds == np.concatenate([[-1], seeds[:-1]])) & (cell == np.concatenate([[-1], cell[:-1]]))
    if dup.any():
        k = int(np.flatnonzero(dup)[0])
        raise TableError(
            f"prompt {list(order)[rows[k]]!r}, candidate {candidates[cols[k]]!r} has seed {seeds[k]} twice; "
            "a quality table holds one row per (prompt, candidate, seed)"
        )
    s = int(slot.max()) + 1 if slot.size else 1
    out = {name: np.full((n, m, s), np.nan) for name in ("decision", "judge")}
    seed_arr = np.full((n, m, s), -1, dtype=np.int64)
    out["decision"][rows, cols, slot] = dec
    out["judge"][rows, cols, slot] = jud
    seed_arr[rows, cols, slot] = seeds
    missing = ~(np.isfinite(out["decision"]) & np.isfinite(out["judge"]))
    seed_arr[missing] = -1
    out["decision"][missing] = np.nan
    out["judge"][missing] = np.nan
    return Draws(list(order), prompts, candidates, out["decision"], out["judge"], seed_arr,
                 decision_metric, judge_metric)


@dataclass(frozen=True)
class CascadeInputs:
    """What a cascade evaluation or fit needs beyond the quality matrix: per-draw scores, what scoring
    one image costs (in the pool's unit) and the notes every report built on them must carry."""

    draws: Draws
    score_cost: float
    notes: tuple[str, ...]


def cascade_inputs(
    table: pa.Table, pool: Pool, candidates: Sequence[str], judge_metric: str,
    decision_metric: str | None = None, decision_cost: float | None = None,
) -> CascadeInputs:
    """The one way every caller (CLI, demo, benchmarks) picks a cascade's decision metric and its cost.

    The decision metric is the one asked for, else the pool's `decision_metric` when the table has its
    column, else the judge itself (then every cascade figure is an upper bound, and a note says so).
    The scorer's cost is the one asked for, else the pool's `cost` for that metric, else 0 with a note:
    a plan pays for every image it scores, and a figure that leaves it out must say so.
    """
    notes: list[str] = []
    decision = decision_metric
    if decision is None and pool.decision_metric is not None:
        if pool.decision_metric in metric_columns(table):
            decision = pool.decision_metric
        else:
            notes.append(f"The pool's decision metric {pool.decision_metric!r} is not a column of this table (build it "
                         "with that metric in the pool's `metrics:`): the judge decides instead.")
    decision = decision or judge_metric
    draws = draws_from_table(table, candidates, decision, judge_metric)
    if draws.upper_bound:
        notes.append(f"The cascade decides on {decision}, the judge itself: its figures are UPPER BOUNDS, not what a "
                     "deployment reaches; pass another decision metric for a figure a deployment can reach.")
    if decision_cost is None:
        spec = pool.metric(decision)
        decision_cost = spec.cost if spec is not None else None
        if decision_cost is None:
            notes.append(f"The pool declares no cost for the decision scorer {decision}: plans are charged for "
                         "generation only (declare the metric's `cost:` in the pool, or pass the decision cost).")
            decision_cost = 0.0
    if not math.isfinite(decision_cost) or decision_cost < 0:
        raise TableError(f"the decision scorer's cost must be a number >= 0 (in {pool.cost_unit}), got {decision_cost}")
    return CascadeInputs(draws, float(decision_cost), tuple(notes))
