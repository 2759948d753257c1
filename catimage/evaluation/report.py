"""Report files of an evaluation: report.json, report.md and deferral.png (report.html: html.py).

`write_report` takes the dict that catimage.evaluation.trials.evaluate_table returns (keys `fixed`,
`router`, `oracle`, `hull`, `summary`, `meta`; optionally `routers` = {label: {router, summary}}
when several estimators were compared, and `policies` = {name: {...}} when route and cascade were
both evaluated) and writes all four. The notes (assumed costs, noise images, ...) go first in the
Markdown, because they decide how far the figures can be trusted; then, for each policy, its verdict,
summary and Tables 1-3 (catimage.evaluation.figures.policy_views says which policies there are).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catimage.evaluation.figures import PolicyView, describe_miss_rule, policy_views
from catimage.evaluation.html import write_html_report
from catimage.evaluation.jsonable import to_jsonable
from catimage.evaluation.plot import plot_deferral
from catimage.policy.routing import cost_to_reach, interpolate_curve

if TYPE_CHECKING:
    from catimage.evaluation.gallery import Gallery, PlanTrace

log = logging.getLogger(__name__)

Lines = list[str]


def write_report(
    report: Mapping[str, Any],
    out_dir: str | Path,
    gallery: Gallery | None = None,
    curves: Mapping[str, Mapping[str, Any]] | None = None,
    traces: Mapping[str, Sequence[PlanTrace]] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, deferral.png and report.html into `out_dir`; returns their paths.

    `curves` (label -> report) are the routers drawn on the plot (default: the report's policies, or
    its `routers`, or its own router); `gallery` is the picture gallery of report.html
    (catimage.evaluation.gallery); `traces` (policy -> catimage.evaluation.gallery.PlanTrace, with
    images) replace the report's own traced plans in report.html.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "deferral.png"}
    paths["json"].write_text(json.dumps(to_jsonable(report), indent=2))
    paths["markdown"].write_text(render_markdown(report))
    if curves is None and report.get("routers") and not report.get("policies"):
        curves = {label: {**report, **sub} for label, sub in report["routers"].items()}
    plot_deferral(report, paths["plot"], curves=curves)
    paths["html"] = write_html_report(report, out, gallery, traces=traces)
    return paths


# --- formatting -----------------------------------------------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}" if np.isfinite(value) else "n/a"
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


def _ci(intervals: Mapping[str, Any] | None, key: str) -> str:
    lo, hi = (intervals or {}).get(key) or (None, None)
    return "n/a" if lo is None or hi is None else f"[{_f(lo, 3)}, {_f(hi, 3)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Lines:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _ratio(summary: Mapping[str, Any], missed: bool | None = None) -> str:
    """THE cost ratio (cost_ratio_or_miss), marked when it counts a miss."""
    missed = summary.get("missed_best_fixed") if missed is None else missed
    return _f(summary.get("cost_ratio_or_miss")) + (" (a miss)" if missed else "")


def _heading(title: str, view: PolicyView, several: bool) -> str:
    """A policy's section: level 2 when it is the only one, level 3 under "## Policy: NAME" otherwise."""
    return f"### {title} ({view.name})" if several else f"## {title}"


# --- sections before the policies ----------------------------------------------------------------


def _title(report: Mapping[str, Any]) -> Lines:
    meta = report.get("meta", {})
    return [f"# catimage evaluation: {meta.get('metric', 'quality')} vs cost ({meta.get('cost_unit', 'cost')})", ""]


def _notes(report: Mapping[str, Any]) -> Lines:
    notes = report.get("meta", {}).get("notes", [])
    return ["> **Read first**", ">", *[f"> - {n}" for n in notes], ""] if notes else []


def _setup(report: Mapping[str, Any]) -> Lines:
    meta = report.get("meta", {})
    lines = [
        (f"Router: **{meta.get('estimator', '?')}** {json.dumps(meta.get('estimator_params', {}))} on "
        f"**{(meta.get('embedder') or {}).get('name', '?')}** embeddings; {meta.get('n_test', '?')} test prompts "
        f"(of {meta.get('n_prompts', '?')}); quality in {meta.get('metric', 'quality')} units, cost in "
        f"{meta.get('cost_unit', 'cost')}; curves read with {meta.get('interpolation', 'linear')} interpolation."),
        "",
    ]
    if meta.get("estimator_selection"):
        lines += [f"Selection (trial 0): {meta['estimator_selection']}", ""]
    return lines


# --- one policy's sections -----------------------------------------------------------------------

ROUTELLM_WORDS = (
    "APGR and CPT as RouteLLM defines them: weak = the cheapest candidate, strong = the best fixed one; APGR = the "
    "mean share of the weak-to-strong quality gap the policy recovers over the cost range between them; CPT(p) = "
    "where, between the weak's cost (0) and the strong's (1), the policy first recovers a share p of the gap."
)


def _policy_line(view: PolicyView) -> Lines:
    bound = (" The decision metric IS the judge: these figures select images by the score they report, an "
             "upper bound." if view.upper_bound else "")
    scorer = view.plans.get("score_cost")
    cost = f" Each scored image also costs {_f(scorer)} for the decision scorer, counted in every cost." if scorer is not None else ""
    return [f"Policy **{view.name}**: decides on **{view.decision_metric}**, judged by **{view.judge_metric}**.{bound}{cost}",
            ""]


def _verdict(view: PolicyView, several: bool) -> Lines:
    lines = view.summary.get("verdict") or []
    if not lines:
        return []
    return [_heading("Verdict", view, several), "",
            "95% intervals: the wider of the bootstrap over test prompts and mean ± t·std/√T over trials.", "",
            *[f"- {v}" for v in lines], ""]


def _summary(view: PolicyView, several: bool) -> Lines:
    s = view.summary
    if "best_fixed" not in s:
        return []
    ci = s.get("intervals") or {}
    rows = [
        ["best fixed candidate", (f"{s['best_fixed']} (cost {_f(s.get('best_fixed_cost'))}, quality "
                                 f"{_f(s.get('best_fixed_quality'))})"), ""],
        ["policy quality at its cost", (f"{_f(s.get('quality_at_best_fixed_cost'))} "
                                       f"({_signed(s.get('gain_at_best_fixed_cost'))})"), _ci(ci, "quality_at_best_fixed_cost")],
        ["routing oracle quality at its cost", _f(s.get("oracle_quality_at_best_fixed_cost")), ""],
        ["cost ratio to match it (policy's cost over its cost)", _ratio(s), _ci(ci, "cost_ratio_or_miss")],
        ["mean gain over the prompt-agnostic hull", _signed(s.get("area_over_hull")), _ci(ci, "area_over_hull")],
        ["share of the routing oracle's gain at its cost", _f(s.get("oracle_gain_fraction")),
         _ci(ci, "oracle_gain_fraction")],
    ]
    if "apgr" in s:
        rows += [["APGR (RouteLLM)", _f(s.get("apgr")), ""], ["CPT(50%) / CPT(80%)",
                                                              f"{_f(s.get('cpt_50'))} / {_f(s.get('cpt_80'))}", ""]]
    return [_heading("Summary (trial 0)", view, several), "",
            *_table(["figure", "value", "95% interval (test prompts)"], rows),
            f"Cost ratio: {describe_miss_rule(s.get('miss_ratio'))}." + (f" {ROUTELLM_WORDS}" if "apgr" in s else ""), ""]


TABLE1_FIGURES = (
    ("quality_at_best_fixed_cost", "quality at best fixed cost"),
    ("gain_at_best_fixed_cost", "gain at best fixed cost"),
    ("area_over_hull", "area over hull"),
    ("cost_ratio_or_miss", "cost ratio to match best (misses counted)"),
    ("oracle_gain_fraction", "routing oracle gain fraction"),
)


def _table1(view: PolicyView, several: bool) -> Lines:
    trials = view.summary.get("trials") or {}
    if not trials:
        return []
    boot, over = trials.get("intervals") or {}, trials.get("trial_intervals") or {}
    cells = [_mean_std(trials, k) + " " + _ci(boot, k) + " / " + _ci(over, k) for k, _ in TABLE1_FIGURES]
    intro = ("Mean ± std over trials, then two 95% intervals of the mean: bias-corrected bootstrap over test "
             "prompts / mean ± t·std/√T over trials (which also re-draw the training prompts). The verdict uses the "
             f"wider. Cost ratio: {describe_miss_rule(trials.get('miss_ratio'))}.")
    lines = [_heading(f"Table 1: {trials.get('n')} trial(s) (re-drawn splits)", view, several), "", intro, "",
             *_table(["win rate", "misses", *[name for _, name in TABLE1_FIGURES]],
                     [[_f(trials.get("win_rate")), str(trials.get("misses", "n/a")), *cells]])]
    if "mean_apgr" in trials:
        lines += [(f"RouteLLM figures, mean over trials: APGR {_f(trials.get('mean_apgr'))}, CPT(50%) "
                  f"{_f(trials.get('mean_cpt_50'))}, CPT(80%) {_f(trials.get('mean_cpt_80'))}."), ""]
    return lines


def _by_cost(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(points, key=lambda p: p["cost"])


def _table2(view: PolicyView, several: bool) -> Lines:
    if not (view.fixed and view.curve):
        return []
    gains = view.summary.get("gain_at_fixed_cost", {})
    rows = []
    for p in _by_cost(view.fixed):
        q = interpolate_curve(view.curve, p["cost"])
        rows.append([p["candidate"], _f(p["cost"]), _f(p["quality"]), _f(q),
                     _signed(gains.get(p["candidate"], q - p["quality"])),
                     _f(interpolate_curve(view.hull, p["cost"]) if view.hull else None),
                     _f(interpolate_curve(view.oracle, p["cost"]) if view.oracle else None)])
    return [_heading("Table 2: quality at each fixed candidate's cost", view, several), "",
            *_table(["candidate", "cost", "fixed", "policy", "policy gain", "hull", "routing oracle"], rows)]


def _table3(view: PolicyView, several: bool) -> Lines:
    if not (view.fixed and view.curve):
        return []
    ratios = view.summary.get("cost_ratio_or_miss_by_candidate", {})
    missed = set(view.summary.get("missed_candidates", []))
    rows = [[p["candidate"], _f(p["quality"]), _f(p["cost"]), _f(cost_to_reach(view.curve, p["quality"])),
             _f(ratios.get(p["candidate"])) + (" (a miss)" if p["candidate"] in missed else "")]
            for p in _by_cost(view.fixed)]
    return [_heading("Table 3: cost for the policy to match each candidate's quality", view, several), "",
            f"Ratio: the policy's cost to match over the candidate's cost; {describe_miss_rule()}.", "",
            *_table(["candidate", "quality", "its cost", "policy cost to match (n/a: never)", "cost ratio or miss"],
                    rows)]


def _budget_check(view: PolicyView, several: bool) -> Lines:
    checks = view.summary.get("budget_check") or []
    if not checks:
        return []
    rows = [[_f(c["budget"]), _f(c["lambda"]), _f(c["test_cost"]), _f(c["test_quality"])] for c in checks]
    return [_heading("Budgets out of sample (trial 0)", view, several), "",
            "Lambda set from each budget on the held-out calibration prompts, then applied to the test prompts.", "",
            *_table(["budget", "lambda", "mean cost on test", "mean quality on test"], rows)]


def _trace(trace: Mapping[str, Any]) -> Lines:
    rows = [[str(k + 1), str(a.get("candidate")), str(a.get("seed")), _f(a.get("decision"), 3), _f(a.get("judge"), 3),
             "yes" if a.get("accepted") else "", "**returned**" if a.get("returned") else "", _f(a.get("cost"))]
            for k, a in enumerate(trace.get("attempts") or [])]
    return [(f"**{trace.get('prompt')}** — plan `{trace.get('label')}` (budget {_f(trace.get('budget'))}, "
            f"lambda {_f(trace.get('lambda'), 3)})"), "",
            *_table(["attempt", "candidate", "seed", "decision score", "judge score", "accepted", "returned", "cost"],
                    rows)]


def _traces(view: PolicyView, several: bool) -> Lines:
    if not view.traces:
        return []
    lines = [_heading("Plans at work (trial 0 test prompts)", view, several), "",
             (f"Every attempt the plan drew, with the decision score ({view.decision_metric}) it read and the judge's "
             f"score ({view.judge_metric}); the plan accepts the first image whose decision score reaches its "
             "threshold, else returns the best-scoring one drawn."), ""]
    for trace in view.traces:
        lines += _trace(trace)
    return lines


def _policy_sections(view: PolicyView, several: bool) -> Lines:
    lines = [f"## Policy: {view.name}", ""] if several else []
    for section in (_verdict, _summary, _table1, _table2, _table3, _budget_check, _traces):
        lines += section(view, several)
    return _policy_line(view) + lines if not several else lines[:2] + _policy_line(view) + lines[2:]


def _side_by_side(views: Sequence[PolicyView]) -> Lines:
    """One row per policy: what decides, what judges, and the headline figures over trials."""
    rows = []
    for v in views:
        s, t = v.summary, v.summary.get("trials") or {}
        misses = f" ({t.get('misses', 0)} of {t.get('n')} missed)" if t else ""
        rows.append([v.name, v.decision_metric, v.judge_metric + (" (upper bound)" if v.upper_bound else ""),
                     _f(s.get("quality_at_best_fixed_cost")), _signed(t.get("mean_area_over_hull", s.get("area_over_hull"))),
                     _f(t.get("mean_cost_ratio_or_miss", s.get("cost_ratio_or_miss"))) + misses,
                     _f(t.get("mean_apgr", s.get("apgr"))), _f(t.get("mean_cpt_50", s.get("cpt_50"))),
                     _f(t.get("mean_cpt_80", s.get("cpt_80")))])
    best = views[0].summary.get("best_fixed", "the best fixed candidate")
    return ["## Policies side by side", "",
            f"Means over the re-drawn splits (trial 0 for quality). Cost ratio to match {best}: {describe_miss_rule()}. "
            + ROUTELLM_WORDS, "",
            *_table(["policy", "decides on", "judged by", f"quality at {best}'s cost", "area over hull",
                     f"cost ratio to match {best}", "APGR", "CPT(50%)", "CPT(80%)"], rows)]


# --- sections after the policies ------------------------------------------------------------------


def _noise(report: Mapping[str, Any]) -> Lines:
    noise = report.get("noise") or {}
    if not noise:
        return []
    if not noise.get("available"):
        return ["## Label noise (split-half)", "", f"Not available: {noise.get('reason')}.", ""]
    rows = [
        ["prompts with >= 2 samples in every cell", str(noise["n_prompts"])],
        ["oracle area over hull, full means (routes on its own noise: optimistic)", _signed(noise["oracle_area_full_means"])],
        ["oracle area over hull, routed on one half, scored on the other (conservative)",
         _signed(noise["oracle_area_split_half"])],
        ["share of the full oracle's lead lost out of sample (label noise)", _f(noise["noise_share_of_oracle_lead"])],
        ["interaction split-half correlation", _f(noise["interaction_split_half_corr"])],
        ["interaction reliability of full means (Spearman-Brown)", _f(noise["interaction_reliability_full_means"])],
    ]
    return ["## Label noise (split-half)", "", *_table(["figure", "value"], rows)]


def _fixed(report: Mapping[str, Any]) -> Lines:
    if not report.get("fixed"):
        return []
    meta = report.get("meta", {})
    on_hull = {h.get("candidate") for h in report.get("hull", [])}
    rows = [[p["candidate"], _f(p["cost"]), _f(p["quality"]), "yes" if p["candidate"] in on_hull else ""]
            for p in _by_cost(report["fixed"])]
    return ["## Fixed candidates", "",
            *_table(["candidate", f"cost ({meta.get('cost_unit', 'cost')})", f"mean {meta.get('metric', 'quality')}",
                     "on hull"], rows)]


def _routers(report: Mapping[str, Any]) -> Lines:
    routers = report.get("routers")
    if not routers:
        return []
    rows = []
    for label, sub in routers.items():
        s = sub.get("summary", {})
        tr = s.get("trials") or {}
        rows.append([label, _f(s.get("quality_at_best_fixed_cost")), _signed(s.get("area_over_hull")), _ratio(s),
                     _f(s.get("oracle_gain_fraction")), _f(tr.get("win_rate")),
                     _mean_std(tr, "gain_at_best_fixed_cost") if tr else "n/a"])
    return ["## Routers compared", "", f"Cost ratio: {describe_miss_rule()}.", "",
            *_table(["router", "quality at best fixed cost", "area over hull", "cost ratio or miss",
                     "oracle gain fraction", "win rate", "gain over trials"], rows)]


def _glossary(_report: Mapping[str, Any]) -> Lines:
    return [
        ("Figures: **gain** = policy quality minus the fixed candidate's at the same average cost; "
        "**area over hull** = mean over the fixed candidates' cost range of the policy's quality minus the "
        "best prompt-agnostic random mixture; **cost ratio** (cost_ratio_or_miss) = the policy's cheapest average "
        "cost reaching a candidate's quality divided by that candidate's cost, where "
        f"{describe_miss_rule()}; **oracle gain fraction** = (policy - best fixed) / (oracle - best fixed) at "
        "the best fixed candidate's cost."),
        "",
    ]


BEFORE: tuple[Callable[[Mapping[str, Any]], Lines], ...] = (_title, _notes, _setup)
AFTER: tuple[Callable[[Mapping[str, Any]], Lines], ...] = (_noise, _fixed, _routers, _glossary)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report: notes, then each policy's verdict, summary and Tables 1-3 of the
    paper's layout, then label noise, budgets, fixed candidates and the glossary."""
    views = policy_views(report)
    several = len(views) > 1
    lines: Lines = [line for section in BEFORE for line in section(report)]
    lines += _side_by_side(views) if several else []
    for view in views:
        lines += _policy_sections(view, several)
    lines += [line for section in AFTER for line in section(report)]
    return "\n".join(lines)
