"""Report files of an evaluation: report.json, report.md and deferral.png.

`write_report` (which also writes report.html, catimage.evaluation.html) takes the dict that
catimage.evaluation.trials.evaluate_table returns (keys `fixed`,
`router`, `oracle`, `hull`, `summary`, `meta`, optionally `routers` = {label: {router, summary}}
when several estimators were compared) and writes all three. The notes (assumed costs, noise
images, ...) go first in the Markdown, because they decide how far the figures can be trusted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catimage.evaluation.html import write_html_report
from catimage.evaluation.jsonable import to_jsonable
from catimage.evaluation.plot import plot_deferral
from catimage.policy.routing import cost_to_reach, interpolate_curve

if TYPE_CHECKING:
    from catimage.evaluation.gallery import Gallery

log = logging.getLogger(__name__)


def write_report(
    report: Mapping[str, Any],
    out_dir: str | Path,
    gallery: Gallery | None = None,
    curves: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, deferral.png and report.html into `out_dir`; returns their paths.

    `curves` (label -> report) are the routers drawn on the plot (default: the report's own, or its
    `routers`); `gallery` is the picture gallery of report.html (catimage.evaluation.gallery).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "deferral.png"}
    paths["json"].write_text(json.dumps(to_jsonable(report), indent=2))
    paths["markdown"].write_text(render_markdown(report))
    meta = report.get("meta", {})
    if curves is None and report.get("routers"):
        curves = {label: {**report, **sub} for label, sub in report["routers"].items()}
    elif curves is None:
        curves = {str(meta.get("estimator", "router")): report}
    plot_deferral(curves, paths["plot"])
    paths["html"] = write_html_report(report, out, gallery)
    return paths


# --- Markdown -----------------------------------------------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "n/a"
        return f"{value:.{digits}g}"
    return str(value)


def _signed(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if abs(value) < 1e-12:  # summation-order noise, not a gain
        value = 0.0
    return f"{value:+.{digits}g}"


def _mean_std(trials: Mapping[str, Any], key: str) -> str:
    mean, std = trials.get(f"mean_{key}"), trials.get(f"std_{key}")
    text = _f(mean) if std is None else f"{_f(mean)} ± {_f(std, 2)}"
    if f"n_{key}" in trials:
        text += f" ({trials[f'n_{key}']}/{trials.get('n')} trials)"
    return text


def _ci(intervals: Mapping[str, Any], key: str) -> str:
    lo, hi = (intervals or {}).get(key) or (None, None)
    return "n/a" if lo is None or hi is None else f"[{_f(lo, 3)}, {_f(hi, 3)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report: notes, summary, Tables 1-3 of the paper's layout, fixed points."""
    meta = report.get("meta", {})
    summary = report.get("summary", {})
    unit = meta.get("cost_unit", "cost")
    metric = meta.get("metric", "quality")
    lines = [f"# catimage evaluation: {metric} vs cost ({unit})", ""]
    notes = meta.get("notes", [])
    if notes:
        lines += ["> **Read first**", ">"] + [f"> - {n}" for n in notes] + [""]
    lines += [
        f"Router: **{meta.get('estimator', '?')}** {json.dumps(meta.get('estimator_params', {}))} on "
        f"**{(meta.get('embedder') or {}).get('name', '?')}** embeddings; {meta.get('n_test', '?')} test prompts "
        f"(of {meta.get('n_prompts', '?')}); quality in {metric} units, cost in {unit}; "
        f"curves read with {meta.get('interpolation', 'linear')} interpolation.",
        "",
    ]
    if meta.get("estimator_selection"):
        lines += [f"Selection (trial 0): {meta['estimator_selection']}", ""]
    if summary.get("verdict"):
        lines += ["## Verdict", "", "**Verdict** (95% intervals: the wider of the bootstrap over test prompts and mean ± t·std/√T over trials):", ""]
        lines += [f"- {v}" for v in summary["verdict"]] + [""]
    lines += ["## Summary (trial 0)", ""]
    best = summary.get("best_fixed")
    ci0 = summary.get("intervals") or {}
    lines += _table(
        ["figure", "value", "95% interval (test prompts)"],
        [
            ["best fixed candidate", f"{best} (cost {_f(summary.get('best_fixed_cost'))}, quality {_f(summary.get('best_fixed_quality'))})", ""],
            ["router quality at its cost", f"{_f(summary.get('quality_at_best_fixed_cost'))} ({_signed(summary.get('gain_at_best_fixed_cost'))})",
             _ci(ci0, "quality_at_best_fixed_cost")],
            ["oracle quality at its cost", _f(summary.get("oracle_quality_at_best_fixed_cost")), ""],
            ["router cost to match it / its cost", _f(summary.get("cost_ratio_or_miss"))
             + (" (never reached: a miss)" if summary.get("missed_best_fixed") else ""), _ci(ci0, "cost_ratio_or_miss")],
            ["mean gain over the prompt-agnostic hull", _signed(summary.get("area_over_hull")), _ci(ci0, "area_over_hull")],
            ["share of the oracle's gain at its cost", _f(summary.get("oracle_gain_fraction")), _ci(ci0, "oracle_gain_fraction")],
        ],
    )
    trials = summary.get("trials") or {}
    if trials:
        ci = trials.get("intervals") or {}
        tci = trials.get("trial_intervals") or {}
        lines += [f"## Table 1: {trials.get('n')} trial(s) (re-drawn splits)", "",
                  "Mean ± std over trials, then two 95% intervals of the mean: bias-corrected bootstrap over test "
                  "prompts / mean ± t·std/√T over trials (which also re-draw the training prompts). The verdict uses the "
                  "wider. The cost ratio counts a trial that never reaches the best fixed quality (a miss) as the worst "
                  "possible ratio.", ""]
        lines += _table(
            ["win rate", "misses", "quality at best fixed cost", "gain at best fixed cost", "area over hull",
             "cost ratio to match best", "oracle gain fraction"],
            [[
                _f(trials.get("win_rate")),
                str(trials.get("misses", "n/a")),
                _mean_std(trials, "quality_at_best_fixed_cost") + " " + _ci(ci, "quality_at_best_fixed_cost") + " / " + _ci(tci, "quality_at_best_fixed_cost"),
                _mean_std(trials, "gain_at_best_fixed_cost") + " " + _ci(ci, "gain_at_best_fixed_cost") + " / " + _ci(tci, "gain_at_best_fixed_cost"),
                _mean_std(trials, "area_over_hull") + " " + _ci(ci, "area_over_hull") + " / " + _ci(tci, "area_over_hull"),
                _mean_std(trials, "cost_ratio_or_miss") + " " + _ci(ci, "cost_ratio_or_miss") + " / " + _ci(tci, "cost_ratio_or_miss"),
                _mean_std(trials, "oracle_gain_fraction") + " " + _ci(ci, "oracle_gain_fraction") + " / " + _ci(tci, "oracle_gain_fraction"),
            ]],
        )
    noise = report.get("noise") or {}
    if noise:
        lines += ["## Label noise (split-half)", ""]
        if noise.get("available"):
            lines += _table(
                ["figure", "value"],
                [["prompts with >= 2 samples in every cell", str(noise["n_prompts"])],
                 ["oracle area over hull, full means (routes on its own noise: optimistic)", _signed(noise["oracle_area_full_means"])],
                 ["oracle area over hull, routed on one half, scored on the other (conservative)", _signed(noise["oracle_area_split_half"])],
                 ["share of the full oracle's lead lost out of sample (label noise)", _f(noise["noise_share_of_oracle_lead"])],
                 ["interaction split-half correlation", _f(noise["interaction_split_half_corr"])],
                 ["interaction reliability of full means (Spearman-Brown)", _f(noise["interaction_reliability_full_means"])]],
            )
        else:
            lines += [f"Not available: {noise.get('reason')}.", ""]
    checks = summary.get("budget_check") or []
    if checks:
        lines += ["## Budgets out of sample (trial 0)", "",
                  "Lambda set from each budget on the held-out calibration prompts, then applied to the test prompts.", ""]
        lines += _table(["budget", "lambda", "mean cost on test", "mean quality on test"],
                        [[_f(c["budget"]), _f(c["lambda"]), _f(c["test_cost"]), _f(c["test_quality"])] for c in checks])
    fixed = report.get("fixed", [])
    hull_names = {h.get("candidate") for h in report.get("hull", [])}
    router, oracle, hull = report.get("router", []), report.get("oracle", []), report.get("hull", [])
    if fixed:
        lines += ["## Fixed candidates", ""]
        lines += _table(
            ["candidate", f"cost ({unit})", f"mean {metric}", "on hull"],
            [[p["candidate"], _f(p["cost"]), _f(p["quality"]), "yes" if p["candidate"] in hull_names else ""]
             for p in sorted(fixed, key=lambda p: p["cost"])],
        )
    if fixed and router:
        gains = summary.get("gain_at_fixed_cost", {})
        lines += ["## Table 2: quality at each fixed candidate's cost", ""]
        rows = []
        for p in sorted(fixed, key=lambda p: p["cost"]):
            q_r = interpolate_curve(router, p["cost"])
            q_o = interpolate_curve(oracle, p["cost"]) if oracle else None
            q_h = interpolate_curve(hull, p["cost"]) if hull else None
            rows.append([p["candidate"], _f(p["cost"]), _f(p["quality"]), _f(q_r),
                         _signed(gains.get(p["candidate"], q_r - p["quality"])), _f(q_h), _f(q_o)])
        lines += _table(["candidate", "cost", "fixed", "router", "router gain", "hull", "oracle"], rows)
        ratios = summary.get("cost_ratio_or_miss_by_candidate", {})
        lines += ["## Table 3: cost for the router to match each candidate's quality", ""]
        rows = []
        for p in sorted(fixed, key=lambda p: p["cost"]):
            reach = cost_to_reach(router, p["quality"])
            rows.append([p["candidate"], _f(p["quality"]), _f(p["cost"]), _f(reach),
                         _f(ratios.get(p["candidate"]))])
        lines += _table(["candidate", "quality", "its cost", "router cost to match", "ratio"], rows)
    routers = report.get("routers")
    if routers:
        lines += ["## Routers compared", ""]
        rows = []
        for label, sub in routers.items():
            s = sub.get("summary", {})
            tr = s.get("trials") or {}
            rows.append([label, _f(s.get("quality_at_best_fixed_cost")), _signed(s.get("area_over_hull")),
                         _f(s.get("cost_ratio_or_miss")), _f(s.get("oracle_gain_fraction")),
                         _f(tr.get("win_rate")), _mean_std(tr, "gain_at_best_fixed_cost") if tr else "n/a"])
        lines += _table(["router", "quality at best fixed cost", "area over hull", "cost ratio",
                         "oracle gain fraction", "win rate", "gain over trials"], rows)
    lines += [
        "Figures: **gain** = router quality minus the fixed candidate's at the same average cost; "
        "**area over hull** = mean over the fixed candidates' cost range of the router's quality minus the "
        "best prompt-agnostic random mixture; **cost ratio** = the router's cheapest average cost reaching a "
        "candidate's quality divided by that candidate's cost (n/a: never reached); **oracle gain fraction** = "
        "(router - best fixed) / (oracle - best fixed) at the best fixed candidate's cost.",
        "",
    ]
    return "\n".join(lines)
