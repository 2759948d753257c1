"""How well a decider agrees with the judge, and what a cascade deciding with it earns.

Agreement (`agreement`): RMSE, Spearman over all pictures and the mean Spearman within a prompt
(a cascade compares draws of the same prompt: that is the figure it lives on), and pass/fail
agreement at fixed thresholds (accept iff score >= t, for the decider and for the judge).

Cascade (`cascade_curve`, `cost_to_match`): the plan "draw with one candidate; while the decision is
below t and fewer than `max_draws` pictures were drawn, draw again with the next seed; keep the
draw with the best decision", judged by the judge's score of the kept picture. Cost per prompt =
draws x (candidate cost + decider cost). Sweeping t traces a cost-quality curve; the cost to match
a reference quality is read off it by linear interpolation between neighbouring thresholds (the
curve's cost grows with t), or is a miss when no threshold reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

THRESHOLDS = (0.7, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class Agreement:
    n: int
    rmse: float
    spearman: float
    within_spearman: float  # mean over prompts whose judge scores are not all equal
    within_prompts: int
    pass_fail: dict[float, float]  # threshold -> share of pictures where both accept or both reject


def agreement(decision: np.ndarray, judge: np.ndarray, groups: np.ndarray,
              thresholds: tuple[float, ...] = THRESHOLDS) -> Agreement:
    """Agreement of `decision` with `judge` on pictures grouped by prompt (`groups`)."""
    decision, judge = np.asarray(decision, float), np.asarray(judge, float)
    within = []
    for g in np.unique(groups):
        sel = groups == g
        d, q = decision[sel], judge[sel]
        if len(q) < 2 or np.ptp(q) == 0:
            continue
        rho = 0.0 if np.ptp(d) == 0 else stats.spearmanr(d, q).statistic
        within.append(float(rho))
    return Agreement(
        n=len(judge), rmse=float(np.sqrt(np.mean((decision - judge) ** 2))),
        spearman=float(stats.spearmanr(decision, judge).statistic),
        within_spearman=float(np.mean(within)) if within else float("nan"), within_prompts=len(within),
        pass_fail={t: float(np.mean((decision >= t) == (judge >= t))) for t in thresholds},
    )


def cascade(decision: np.ndarray, judge: np.ndarray, threshold: float) -> tuple[float, float]:
    """(mean draws, mean judged quality) of the redraw plan on (prompts, draws) score matrices."""
    n, k = judge.shape
    draws = np.full(n, k)
    below = decision < threshold
    for j in range(k - 1, -1, -1):  # the first draw whose decision passes ends the cascade
        draws = np.where(~below[:, j], j + 1, draws)
    masked = np.where(np.arange(k)[None, :] < draws[:, None], decision, -np.inf)
    kept = np.argmax(masked, axis=1)  # best decision among the draws made (first on ties)
    return float(draws.mean()), float(judge[np.arange(n), kept].mean())


def cascade_curve(decision: np.ndarray, judge: np.ndarray, unit_cost: float,
                  thresholds: np.ndarray | None = None) -> np.ndarray:
    """(T, 3) rows of (threshold, mean cost, mean quality), cost growing with the threshold."""
    if thresholds is None:
        thresholds = np.concatenate([[-np.inf], np.linspace(0.0, 1.0, 201), [np.inf]])
    rows = []
    for t in thresholds:
        draws, quality = cascade(decision, judge, t)
        rows.append((t, draws * unit_cost, quality))
    return np.array(rows)


def cost_to_match(curve: np.ndarray, target: float) -> float | None:
    """The smallest cost on the curve at which quality reaches `target` (linear interpolation
    between neighbouring thresholds), None when no threshold reaches it."""
    _, cost, quality = curve.T
    if quality[0] >= target:
        return float(cost[0])
    for i in range(1, len(curve)):
        if quality[i] >= target > quality[i - 1]:
            if cost[i] == cost[i - 1]:
                return float(cost[i])
            frac = (target - quality[i - 1]) / (quality[i] - quality[i - 1])
            return float(cost[i - 1] + frac * (cost[i] - cost[i - 1]))
    return None


def threshold_for(curve: np.ndarray, target: float) -> float | None:
    """The smallest swept threshold whose quality reaches `target` (to carry to other prompts)."""
    for t, _, quality in curve:
        if quality >= target:
            return float(t)
    return None
