"""How sure a figure is: bias-corrected bootstrap intervals over test prompts, the spread over
re-drawn splits (Table 1), and the verdict in words.

Every summary figure gets a BC bootstrap interval over test prompts (trial 0: resample its test
prompts; over trials: resample each trial's test prompts and average, which gives an interval for
the trial mean; the fixed candidates' means, hull and best candidate are re-estimated on every
resample, as they are estimated from the test prompts) beside the spread over trials, and `verdict`
says whether the router beats the hull and the best fixed candidate with confidence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from catimage.evaluation.figures import BOOTSTRAP_FIGURES, TRIAL_FIGURES, describe_miss_rule, fast_figures

CONFIDENCE = 0.95


def bootstrap_figures(pred: np.ndarray, true: np.ndarray, costs: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, len(BOOTSTRAP_FIGURES)): the figures on test prompts resampled with replacement."""
    return bootstrap_resamples(pred.shape[0], n_boot, seed, lambda idx: fast_figures(pred[idx], true[idx], costs))


def bootstrap_resamples(n: int, n_boot: int, seed: int, figures_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(n_boot, len(BOOTSTRAP_FIGURES)): `figures_of(idx)` on `n_boot` resamples (with replacement)
    of n test prompts; hook used by every policy's bootstrap (routing above, the cascade's)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(BOOTSTRAP_FIGURES)))
    for b in range(n_boot):
        out[b] = figures_of(rng.integers(0, n, n))
    return out


def _interval(samples: np.ndarray, point: float) -> list[float | None]:
    """Bias-corrected percentile interval (Efron's BC) of a bootstrap distribution around `point`.

    Several figures are max-type statistics of the test sample (the hull and the best fixed
    candidate are chosen on it), so their bootstrap distribution sits off-centre from the estimate;
    plain percentiles would shift the interval. BC moves the percentiles by the share of resamples
    below the estimate.
    """
    from scipy.stats import norm

    finite = samples[np.isfinite(samples)]
    if finite.size < max(10, samples.size // 2) or point is None or not np.isfinite(point):
        return [None, None]
    below = (np.mean(finite < point) + 0.5 * np.mean(finite == point))
    below = float(np.clip(below, 0.5 / finite.size, 1 - 0.5 / finite.size))
    z0 = norm.ppf(below)
    tail = (1 - CONFIDENCE) / 2
    lo_q, hi_q = norm.cdf(2 * z0 + norm.ppf(tail)), norm.cdf(2 * z0 + norm.ppf(1 - tail))
    return [float(np.quantile(finite, lo_q)), float(np.quantile(finite, hi_q))]


def intervals(samples: np.ndarray, point: Sequence[float | None] | np.ndarray) -> dict[str, list[float | None]]:
    """BC intervals (CONFIDENCE) of each bootstrap figure; `point`: the estimates, in BOOTSTRAP_FIGURES order."""
    return {name: _interval(samples[:, j], point[j]) for j, name in enumerate(BOOTSTRAP_FIGURES)}



# --- trials -------------------------------------------------------------------------------------


def summarize_trials(per_trial: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Table 1: win rate and mean / std (sample std; None below two values) of each figure.

    A trial is won when the router's quality at the best fixed candidate's cost beats that
    candidate. `mean_cost_ratio_or_miss` counts every trial, a miss as `miss_ratio` (see
    catimage.evaluation.figures); `misses` says how many trials missed. A figure that is undefined in
    some trials (the oracle's gain when the oracle has no room) is averaged over the others and
    `n_<figure>` says over how many.
    """
    out: dict[str, Any] = {"n": len(per_trial)}
    if not per_trial:
        return out
    wins = [t["gain_at_best_fixed_cost"] > 0 for t in per_trial]
    out["win_rate"] = float(np.mean(wins))
    for key in TRIAL_FIGURES:
        vals = np.array([t[key] for t in per_trial if t.get(key) is not None], dtype=np.float64)
        out[f"mean_{key}"] = float(vals.mean()) if vals.size else None
        out[f"std_{key}"] = float(vals.std(ddof=1)) if vals.size >= 2 else None
        if vals.size != len(per_trial):
            out[f"n_{key}"] = int(vals.size)
    out["misses"] = int(sum(bool(t["missed_best_fixed"]) for t in per_trial))
    counted_as = {float(t["miss_ratio"]) for t in per_trial}  # differs only when the best fixed candidate does
    out["miss_ratio"] = counted_as.pop() if len(counted_as) == 1 else None
    out["trial_intervals"] = {key: _t_interval(out, key) for key in BOOTSTRAP_FIGURES}
    return out


def _t_interval(trials: Mapping[str, Any], key: str) -> list[float | None]:
    """mean +- t * std / sqrt(T) over trials: the spread from re-drawing training AND test prompts
    (trials share prompts, so it is a rough guide, not an exact interval)."""
    from scipy.stats import t as student

    mean, std, n = trials.get(f"mean_{key}"), trials.get(f"std_{key}"), trials.get(f"n_{key}", trials.get("n", 0))
    if mean is None or std is None or n < 2:
        return [None, None]
    half = float(student.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / np.sqrt(n)
    return [mean - half, mean + half]


def combined_interval(trials: Mapping[str, Any], key: str) -> list[float | None]:
    """The wider of the bootstrap interval (test prompts) and the over-trials interval (training too)."""
    boot = (trials.get("intervals") or {}).get(key, [None, None])
    over = (trials.get("trial_intervals") or {}).get(key, [None, None])
    lows = [v for v in (boot[0], over[0]) if v is not None]
    highs = [v for v in (boot[1], over[1]) if v is not None]
    return [min(lows) if lows else None, max(highs) if highs else None]


def _word(interval: Sequence[float | None], higher_is_better: bool = True) -> str:
    lo, hi = interval
    if lo is None or hi is None:
        return "cannot tell (too few test prompts for an interval)"
    if (lo > 0) if higher_is_better else (hi < 0):
        return "yes, with confidence"
    if (hi < 0) if higher_is_better else (lo > 0):
        return "no: worse, with confidence"
    return "not distinguishable from zero"


def verdict(trials: Mapping[str, Any], best_fixed: str, unit: str) -> list[str]:
    """Plain sentences: does the router beat the hull / the best fixed candidate, how sure are we.

    "With confidence" needs the WIDER of two 95% intervals to exclude zero: the bootstrap over test
    prompts, and mean +- t * std / sqrt(T) over the trials (which also re-draw the training prompts).
    """
    n = trials.get("n", 0)
    area, gain = trials.get("mean_area_over_hull"), trials.get("mean_gain_at_best_fixed_cost")
    ratio, misses = trials.get("mean_cost_ratio_or_miss"), trials.get("misses", 0)
    pct = round(CONFIDENCE * 100)
    lines = []
    if area is not None:
        ci = combined_interval(trials, "area_over_hull")
        lines.append(
            f"Beats the prompt-agnostic mixture hull? {_word(ci)}: mean area over the hull {area:+.4g} {unit} over "
            f"{n} trial(s) ({pct}% interval {_fmt_ci(*ci)})."
        )
    if gain is not None:
        ci = combined_interval(trials, "gain_at_best_fixed_cost")
        lines.append(
            f"Beats the best fixed candidate ({best_fixed}) at its cost? {_word(ci)}: mean gain {gain:+.4g} {unit} "
            f"({pct}% interval {_fmt_ci(*ci)})."
        )
    if ratio is not None:
        lo, hi = combined_interval(trials, "cost_ratio_or_miss")
        cheaper = "yes, with confidence" if hi is not None and hi < 1 else "not with confidence"
        lines.append(
            f"Matches {best_fixed}'s quality for less? {cheaper}: mean cost ratio {ratio:.3g} ({pct}% interval "
            f"{_fmt_ci(lo, hi, signed=False)}); {misses} of {n} trial(s) never reached it; "
            f"{describe_miss_rule(trials.get('miss_ratio'))}."
        )
    return lines


def _fmt_ci(lo: float | None, hi: float | None, signed: bool = True) -> str:
    if lo is None or hi is None:
        return "n/a"
    return f"{lo:+.4g} to {hi:+.4g}" if signed else f"{lo:.3g} to {hi:.3g}"
