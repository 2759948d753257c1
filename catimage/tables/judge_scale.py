"""Put served traffic's decision scores on the judge's scale before a refit learns from them.

Serving scores every image with the cheap online decision metric (the world's `scene_decider`); the
judge (`scene_score`, or human raters) never runs there. A decider that over-scores one candidate
(in the world it rates `mini-8` 0.026 above the judge on average) makes a policy refitted on logged
decision scores favour that candidate, however much traffic it sees. A base quality table built
offline holds BOTH columns on the same draws, so it can say, per candidate, how far the decider
sits from the judge: the mean difference (judge - decision) over the candidate's draws. A refit then
learns from one label column on the judge's scale: the judge where a row has it, the decision score
plus its candidate's offset where it does not.

An offset per candidate, not a fitted curve: on the world's closed loop a per-candidate line gave no
more than the offset (0.970 vs 0.977 of the full-table policy's area on 900 table prompts) and a
line extrapolates where the base table is thin. The thresholds a cascade stops on stay in the
decision metric's units: only what an accepted image is worth moves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catimage.errors import TableError

log = logging.getLogger(__name__)

__all__ = ["JudgeScale", "fit_judge_scale", "on_judge_scale"]


@dataclass(frozen=True)
class JudgeScale:
    """Per candidate, the mean of (judge - decision) over draws scored by both."""

    decision_metric: str
    judge_metric: str
    offsets: dict[str, float]
    draws: dict[str, int]

    def to_dict(self) -> dict:
        return {"decision_metric": self.decision_metric, "judge_metric": self.judge_metric,
                "offsets": dict(self.offsets), "draws": dict(self.draws)}


def _column(table: pa.Table, name: str, role: str) -> np.ndarray:
    if name not in table.column_names:
        raise TableError(f"the table has no {role} column {name!r}; its columns are {table.column_names}")
    return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)


def fit_judge_scale(table: pa.Table, decision_metric: str, judge_metric: str) -> JudgeScale:
    """Offsets from a table holding both scores (a build's table: every row has both)."""
    dec, jud = _column(table, decision_metric, "decision"), _column(table, judge_metric, "judge")
    cands = np.asarray(table.column("candidate").to_pylist(), dtype=object)
    both = np.isfinite(dec) & np.isfinite(jud)
    if not both.any():
        raise TableError(f"no row holds both {decision_metric!r} and {judge_metric!r}: the judge's scale needs a "
                         "table scored by both (build one with both metrics in the pool)")
    offsets, draws = {}, {}
    for c in sorted(set(cands[both])):
        k = both & (cands == c)
        offsets[str(c)] = float(np.mean(jud[k] - dec[k]))
        draws[str(c)] = int(k.sum())
    return JudgeScale(decision_metric, judge_metric, offsets, draws)


def on_judge_scale(table: pa.Table, scale: JudgeScale) -> pa.Table:
    """The table with its judge column filled: the judge where a row has it, else the decision score
    plus its candidate's offset. A candidate the scale never saw keeps its decision score (offset 0,
    logged as a warning: give the base table rows of it)."""
    dec = _column(table, scale.decision_metric, "decision")
    has_judge = scale.judge_metric in table.column_names
    jud = _column(table, scale.judge_metric, "judge") if has_judge else np.full(table.num_rows, np.nan)
    cands = table.column("candidate").to_pylist()
    unknown = sorted({c for c, j in zip(cands, jud, strict=True) if not np.isfinite(j)} - set(scale.offsets))
    if unknown:
        log.warning("no offset for candidate(s) %s (absent from the table the judge's scale was fitted on): their "
                    "decision scores are used as they are", unknown)
    offset = np.fromiter((scale.offsets.get(c, 0.0) for c in cands), dtype=np.float64, count=len(cands))
    label = np.where(np.isfinite(jud), jud, dec + offset)
    column = pa.array(label, type=pa.float64(), mask=~np.isfinite(label))
    if has_judge:
        return table.set_column(table.column_names.index(scale.judge_metric), scale.judge_metric, column)
    return table.append_column(scale.judge_metric, column)
