"""A visual report: one self-contained `report.html` beside report.md, for looking at what a policy did.

The page holds, for each policy of the report (route; cascade when evaluated), what decides and what
judges, its verdict, summary figures, Table 1 over re-drawn splits and the figures at each fixed
candidate's cost (Tables 2-3); the deferral plot of every policy on one pair of axes; and a gallery:
one block per prompt, one cell per candidate, each cell the candidate's image, its measured score and
the router's predicted quality, with the candidate chosen at each budget ringed in that budget's
colour and labelled in words. The cells wrap onto the next line when the page is narrow, so the
gallery never grows wider than the page.

Layout lives in a Jinja2 template (templates/report.html.j2, autoescaped); this module turns the
report and the gallery into plain values for it (`page_model`). Why one file with everything embedded
(data: URIs, inline CSS, no JavaScript, a Content-Security-Policy that forbids anything else): it can
be mailed, attached to an issue or opened from a laptop's downloads folder and still show every
image. Images larger than `EMBED_MAX_PX` are downscaled before embedding so that a gallery of real
1024 px images stays a few MB; small images (the scene world draws 32 px) are upscaled by the
browser with `image-rendering: pixelated` so their pixels stay visible rather than blurred.

Inputs are read tolerantly: a summary key that is missing is simply not shown, an unknown one still
appears under "All summary figures".
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catimage import __version__
from catimage.errors import CatimageError
from catimage.evaluation.figures import PolicyView, describe_miss_rule, policy_views
from catimage.evaluation.gallery import BUDGET_COLOURS, Gallery, GalleryCell, GalleryRow, PlanTrace, plan_traces
from catimage.evaluation.plot import plot_deferral
from catimage.policy.routing import cost_to_reach, interpolate_curve

log = logging.getLogger(__name__)

THUMB_PX = 128  # CSS box of every gallery image: 4x a 32 px and 2x a 64 px image, so pixels stay square
RING_PX = 5  # width of one budget's highlight ring around a chosen image
EMBED_MAX_PX = 320  # larger images are downscaled to this (longest side) before embedding
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
TEMPLATE = "report.html.j2"


# --- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedded:
    """An image as a data: URI, with its original pixel size."""

    uri: str
    width: int
    height: int


_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def _read_image_bytes(image: bytes | Path | str) -> bytes | None:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    text = str(image)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        log.warning("image %s is not a local file; the gallery shows a placeholder", text)
        return None
    try:
        return Path(text).read_bytes()
    except OSError as err:
        log.warning("cannot read image %s (%s); the gallery shows a placeholder", text, err)
        return None


def embed_image(image: bytes | Path | str, max_px: int = EMBED_MAX_PX) -> Embedded | None:
    """An image as a data: URI with its original size; downscaled (JPEG) when larger than `max_px`."""
    from PIL import Image, UnidentifiedImageError

    data = _read_image_bytes(image)
    if data is None:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        width, height, fmt = img.width, img.height, img.format
        if max(width, height) > max_px:
            img = img.convert("RGB")
            img.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=88)
            data, fmt = buf.getvalue(), "JPEG"
        elif fmt not in _MIME:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data, fmt = buf.getvalue(), "PNG"
    except (UnidentifiedImageError, OSError) as err:
        log.warning("cannot decode an image (%s); the gallery shows a placeholder", err)
        return None
    return Embedded(f"data:{_MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}", width, height)


# --- figures for people ---------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, digits: int = 4) -> str:
    """A figure for people: 4 significant digits, n/a for None / NaN, intervals as [lo, hi]."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}" if math.isfinite(value) else "n/a"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(v is None or _finite(v) for v in value):
        return f"[{num(value[0], digits)}, {num(value[1], digits)}]"
    if isinstance(value, (list, tuple)):
        return ", ".join(num(v, digits) for v in value)
    return str(value)


def signed(value: Any, digits: int = 3) -> str:
    if not _finite(value):
        return "n/a"
    value = 0.0 if abs(value) < 1e-12 else float(value)  # summation-order noise is not a gain
    return f"{value:+.{digits}g}"


def _interval(summary: Mapping[str, Any], key: str) -> str:
    """'interval lo to hi' when the summary carries a 95% interval for `key`."""
    value = (summary.get("intervals") or {}).get(key)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(v) for v in value):
        return f"95% interval {num(value[0])} to {num(value[1])}"
    return ""


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


# --- one policy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    label: str
    value: str
    detail: str = ""


@dataclass
class PolicySection:
    """What the page shows of one policy."""

    name: str
    decision_metric: str
    judge_metric: str
    upper_bound: bool
    cards: list[Card]
    verdict: list[str]
    trials: list[list[str]]  # Table 1 rows: figure, mean ± std, bootstrap interval, over-trials interval
    trials_note: str
    at_fixed: list[list[str]]  # Tables 2-3 rows, one per fixed candidate
    ratio_note: str
    scorer_cost: str  # the decision scorer's cost per image, "" when the policy scores nothing


def _ratio_card(s: Mapping[str, Any], unit: str) -> Card:
    ratio, best = s.get("cost_ratio_or_miss"), s.get("best_fixed", "it")
    if s.get("missed_best_fixed"):
        detail = f"never reaches {best}'s quality (a miss); {describe_miss_rule(s.get('miss_ratio'))}"
    else:
        detail = f"matches {best} at {num(100 * ratio, 3)}% of its cost" if _finite(ratio) else ""
    extra = _interval(s, "cost_ratio_or_miss")
    return Card("Cost ratio to match it", f"{num(ratio, 3)}×" if _finite(ratio) else "n/a",
                detail + (f"; {extra}" if extra else ""))


def _cards(s: Mapping[str, Any], unit: str) -> list[Card]:
    """Cards for the summary figures that exist; nothing is invented for the ones that do not."""
    cards = []
    if "best_fixed" in s:
        parts = [f"cost {num(s.get('best_fixed_cost'))} {unit}" if _finite(s.get("best_fixed_cost")) else "",
                 f"quality {num(s.get('best_fixed_quality'))}" if _finite(s.get("best_fixed_quality")) else ""]
        cards.append(Card("Best fixed candidate", str(s["best_fixed"]), ", ".join(p for p in parts if p)))
    if "quality_at_best_fixed_cost" in s:
        extra = _interval(s, "gain_at_best_fixed_cost")
        cards.append(Card("Quality at that cost", num(s["quality_at_best_fixed_cost"]),
                          f"{signed(s.get('gain_at_best_fixed_cost'))} vs the best fixed candidate"
                          + (f"; gain {extra}" if extra else "")))
    if "area_over_hull" in s:
        extra = _interval(s, "area_over_hull")
        cards.append(Card("Mean gain over the mixture hull", signed(s["area_over_hull"]),
                          "policy minus best random mix of fixed candidates" + (f"; {extra}" if extra else "")))
    if "cost_ratio_or_miss" in s:
        cards.append(_ratio_card(s, unit))
    if "oracle_gain_fraction" in s:
        cards.append(Card("Share of the routing oracle's gain", num(s["oracle_gain_fraction"], 3),
                          f"routing oracle quality at that cost {num(s.get('oracle_quality_at_best_fixed_cost'))}"))
    if "apgr" in s:
        cards.append(Card("APGR (RouteLLM)", num(s.get("apgr"), 3),
                          f"CPT(50%) {num(s.get('cpt_50'), 3)}, CPT(80%) {num(s.get('cpt_80'), 3)}; weak = the cheapest "
                          "candidate, strong = the best fixed one"))
    return cards


TABLE1 = (("quality_at_best_fixed_cost", "quality at best fixed cost"), ("gain_at_best_fixed_cost", "gain at best fixed cost"),
          ("area_over_hull", "area over hull"), ("cost_ratio_or_miss", "cost ratio to match best (misses counted)"),
          ("oracle_gain_fraction", "oracle gain fraction"))


def _trial_rows(trials: Mapping[str, Any]) -> list[list[str]]:
    if not trials.get("n"):
        return []
    boot, over = trials.get("intervals") or {}, trials.get("trial_intervals") or {}
    rows = []
    for key, name in TABLE1:
        mean, std = trials.get(f"mean_{key}"), trials.get(f"std_{key}")
        counted = f" ({trials[f'n_{key}']}/{trials['n']} trials)" if f"n_{key}" in trials else ""
        rows.append([name, num(mean) + (f" ± {num(std, 2)}" if _finite(std) else "") + counted,
                     num(boot.get(key), 3) if key in boot else "n/a", num(over.get(key), 3) if key in over else "n/a"])
    for key, name in (("apgr", "APGR (RouteLLM)"), ("cpt_50", "CPT(50%)"), ("cpt_80", "CPT(80%)")):
        if f"mean_{key}" in trials:
            rows.append([name, num(trials[f"mean_{key}"]), "n/a", "n/a"])
    return rows


def _at_fixed_rows(view: PolicyView) -> list[list[str]]:
    """Per fixed candidate: its cost and quality, on hull, and the policy's quality, gain, hull and oracle
    at that cost (Table 2), and the policy's cost and cost ratio to match it (Table 3)."""
    fixed = [p for p in view.fixed if isinstance(p, Mapping) and "candidate" in p and _finite(p.get("cost"))]
    if not fixed or not view.curve:
        return []
    on_hull = {h.get("candidate") for h in view.hull if isinstance(h, Mapping)}
    ratios = view.summary.get("cost_ratio_or_miss_by_candidate") or {}
    missed = set(view.summary.get("missed_candidates") or [])
    hull, oracle = view.hull, view.oracle
    rows = []
    for p in sorted(fixed, key=lambda p: p["cost"]):
        c, cost, quality = p["candidate"], float(p["cost"]), p.get("quality")
        q = float(interpolate_curve(view.curve, cost))
        rows.append([c, num(cost), num(quality), "yes" if c in on_hull else "", num(q),
                     signed(q - quality) if _finite(quality) else "n/a",
                     num(float(interpolate_curve(hull, cost))) if hull else "n/a",
                     num(float(interpolate_curve(oracle, cost))) if oracle else "n/a",
                     num(cost_to_reach(view.curve, quality)) if _finite(quality) else "n/a",
                     num(ratios.get(c), 3) + (" (a miss)" if c in missed else "")])
    return rows


def policy_section(report: Mapping[str, Any], view: PolicyView) -> PolicySection:
    unit = str((report.get("meta") or {}).get("cost_unit", "cost"))
    s = view.summary
    trials = s.get("trials") if isinstance(s.get("trials"), Mapping) else {}
    return PolicySection(
        name=view.name, decision_metric=view.decision_metric, judge_metric=view.judge_metric,
        upper_bound=view.upper_bound, cards=_cards(s, unit), verdict=[str(v) for v in s.get("verdict") or []],
        trials=_trial_rows(trials),
        trials_note=(f"{num(trials.get('n'))} re-drawn split(s); win rate {num(trials.get('win_rate'), 3)}; "
                     f"{num(trials.get('misses', 0))} miss(es)") if trials.get("n") else "",
        at_fixed=_at_fixed_rows(view),
        ratio_note=describe_miss_rule(trials.get("miss_ratio", s.get("miss_ratio"))),
        scorer_cost=num(view.plans["score_cost"]) if view.plans.get("score_cost") is not None else "",
    )


# --- the gallery ------------------------------------------------------------------------------------


@dataclass
class CellView:
    candidate: str
    cost: str
    image: Embedded | None
    pixelated: bool
    alt: str
    missing: str  # what the frame says when there is no image
    figures: list[tuple[str, str, bool]]  # (name, value, bold: the row's best)
    chosen: list[tuple[int, str]]  # (budget index, budget label)
    ring: str  # CSS box-shadow of the rings, "" when not chosen


@dataclass
class GalleryView:
    intro: str
    note: str
    legend: list[tuple[int, str, str]]  # (budget index, label, detail)
    metric: str
    rows: list[tuple[GalleryRow, list[CellView]]] = field(default_factory=list)


def _row_best(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if len(finite) > 1 else None


def _cell_figures(row: GalleryRow, cell: GalleryCell) -> list[tuple[str, str, bool]]:
    best_mean = _row_best([c.mean_score for c in row.cells])
    best_pred = _row_best([c.predicted for c in row.cells])
    figs = []
    if cell.score is not None:
        figs.append(("score", num(cell.score, 3), False))
    if cell.mean_score is not None and (cell.n_samples > 1 or cell.score is None):
        figs.append((f"mean of {cell.n_samples}", num(cell.mean_score, 3), cell.mean_score == best_mean))
    if cell.score is None and cell.mean_score is None:
        figs.append(("no score", "", False))
    figs.append(("predicted", num(cell.predicted, 3), cell.predicted is not None and cell.predicted == best_pred))
    return figs


def _cell_view(row: GalleryRow, cell: GalleryCell, gallery: Gallery, cost: float | None) -> CellView:
    labels = [b.label for b in gallery.budgets]
    picked = [(i, label) for i, label in enumerate(labels) if row.chosen.get(label) == cell.candidate]
    embedded = embed_image(cell.image) if cell.image is not None else None
    rings = ", ".join(f"0 0 0 {RING_PX * (k + 1)}px var(--b{i})" for k, (i, _) in enumerate(picked))
    return CellView(
        candidate=cell.candidate, cost=f"cost {num(cost)}" if cost is not None else "", image=embedded,
        pixelated=bool(embedded and max(embedded.width, embedded.height) < THUMB_PX),
        alt=f"{cell.candidate}'s image for: {row.prompt[:120]}",
        missing="image not readable" if cell.image is not None else "no image",
        figures=_cell_figures(row, cell), chosen=picked, ring=rings,
    )


def _legend(gallery: Gallery) -> list[tuple[int, str, str]]:
    costs = dict(zip(gallery.candidates, gallery.costs)) if gallery.costs is not None else {}
    items = []
    for i, b in enumerate(gallery.budgets):
        parts = []
        if b.value is not None:
            parts.append(f"average-cost budget {num(b.value)} {gallery.cost_unit}")
        if b.lam is not None:
            parts.append(f"λ = {num(b.lam, 3)}")
        spent = [costs[r.chosen[b.label]] for r in gallery.rows if b.label in r.chosen] if costs else []
        if spent:
            parts.append(f"the choices below cost {num(float(np.mean(spent)))} on average")
        items.append((i, b.label, "; ".join(parts)))
    return items


def gallery_view(gallery: Gallery | None) -> GalleryView | None:
    if gallery is None:
        return None
    shown = len(gallery.rows)
    total = gallery.n_total if gallery.n_total is not None else shown
    intro = f"{shown} prompt{'s' if shown != 1 else ''}" + (f" (of {total})" if total > shown else "")
    costs = gallery.costs or [None] * len(gallery.candidates)
    view = GalleryView(intro=intro, note=gallery.note or "", legend=_legend(gallery), metric=gallery.metric)
    for row in gallery.rows:
        view.rows.append((row, [_cell_view(row, cell, gallery, k) for cell, k in zip(row.cells, costs)]))
    return view


# --- plans at work ----------------------------------------------------------------------------------


@dataclass
class AttemptView:
    title: str  # "1. small-4"
    seed: str
    image: Embedded | None
    pixelated: bool
    alt: str
    decision: str
    judge: str
    accepted: bool
    returned: bool
    cost: str


@dataclass
class TraceView:
    prompt: str
    prompt_id: str
    plan: str
    context: str  # budget and lambda the plan was chosen at
    attempts: list[AttemptView]


def _attempt_view(trace: PlanTrace, k: int) -> AttemptView:
    a = trace.attempts[k]
    embedded = embed_image(a.image) if a.image is not None else None
    return AttemptView(
        title=f"{k + 1}. {a.candidate}", seed=f"seed {a.seed}", image=embedded,
        pixelated=bool(embedded and max(embedded.width, embedded.height) < THUMB_PX),
        alt=f"attempt {k + 1} ({a.candidate}, seed {a.seed}) for: {trace.prompt[:120]}",
        decision=num(a.decision, 3), judge=num(a.judge, 3), accepted=a.accepted, returned=a.returned,
        cost=num(a.cost) if a.cost is not None else "",
    )


def trace_views(traces: Sequence[PlanTrace]) -> list[TraceView]:
    views = []
    for t in traces:
        context = ", ".join(part for part in (f"budget {num(t.budget)}" if t.budget is not None else "",
                                              f"λ = {num(t.lam, 3)}" if t.lam is not None else "") if part)
        views.append(TraceView(t.prompt, t.prompt_id or "", t.plan, context,
                               [_attempt_view(t, k) for k in range(len(t.attempts))]))
    return views


def _traced_policies(report: Mapping[str, Any], traces: Mapping[str, Sequence[PlanTrace]] | None) -> list[dict[str, Any]]:
    """Per policy with traces: what decides, what judges, and its traced plans (images when given)."""
    out = []
    for view in policy_views(report):
        plans = (traces or {}).get(view.name)
        if plans is None:
            plans = plan_traces(report, view.name) if view.traces else []
        if plans:
            out.append({"name": view.name, "decision_metric": view.decision_metric, "judge_metric": view.judge_metric,
                        "upper_bound": view.upper_bound, "traces": trace_views(plans),
                        "images": any(a.image is not None for t in plans for a in t.attempts)})
    return out


def _side_by_side(views: Sequence[PolicyView]) -> list[list[str]]:
    rows = []
    for v in views:
        s, t = v.summary, v.summary.get("trials") if isinstance(v.summary.get("trials"), Mapping) else {}
        misses = f" ({num(t.get('misses', 0))} of {num(t.get('n'))} missed)" if t.get("n") else ""
        rows.append([v.name, v.decision_metric, v.judge_metric + (" (upper bound)" if v.upper_bound else ""),
                     num(s.get("quality_at_best_fixed_cost")), signed(t.get("mean_area_over_hull", s.get("area_over_hull"))),
                     num(t.get("mean_cost_ratio_or_miss", s.get("cost_ratio_or_miss")), 3) + misses,
                     num(t.get("mean_apgr", s.get("apgr")), 3), num(t.get("mean_cpt_50", s.get("cpt_50")), 3),
                     num(t.get("mean_cpt_80", s.get("cpt_80")), 3)])
    return rows


# --- the page ---------------------------------------------------------------------------------------


def _subtitle(meta: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(before, strong, after) parts joined by ' · '."""
    parts = []
    if "estimator" in meta:
        emb = (meta.get("embedder") or {}).get("name") if isinstance(meta.get("embedder"), Mapping) else meta.get("embedder")
        parts.append(("router ", str(meta["estimator"]), f" on {emb} embeddings" if emb else ""))
    if "n_test" in meta:
        parts.append(("", "", f"{meta['n_test']} test prompts" + (f" of {meta['n_prompts']}" if "n_prompts" in meta else "")))
    if meta.get("candidates"):
        parts.append(("", "", f"{len(meta['candidates'])} candidates"))
    parts.append(("", "", f"judge {meta.get('metric', 'metric')}, cost in {meta.get('cost_unit', 'the pool unit')}"))
    return parts


def _routers_rows(report: Mapping[str, Any]) -> list[list[str]]:
    routers = report.get("routers")
    if not isinstance(routers, Mapping):
        return []
    rows = []
    for label, sub in routers.items():
        s = (sub or {}).get("summary") or {}
        tr = s.get("trials") if isinstance(s.get("trials"), Mapping) else {}
        rows.append([str(label), num(s.get("quality_at_best_fixed_cost")), signed(s.get("area_over_hull")),
                     num(s.get("cost_ratio_or_miss"), 3) + (" (a miss)" if s.get("missed_best_fixed") else ""),
                     num(tr.get("win_rate"), 3)])
    return rows


def page_model(report: Mapping[str, Any], gallery: Gallery | None, plot_png: bytes | None,
               traces: Mapping[str, Sequence[PlanTrace]] | None = None) -> dict[str, Any]:
    """Everything the template shows, as plain values (the template only lays them out and escapes).
    `traces` (policy -> traced plans, with images) replaces the report's own traces (no images)."""
    meta = report.get("meta") or {}
    flat: list[tuple[str, Any]] = []
    _flatten("", report.get("summary") or {}, flat)
    views = [v for v in policy_views(report) if v.summary or v.curve]
    return {
        "side_by_side": _side_by_side(views) if len(views) > 1 else [],
        "best_fixed": str(views[0].summary.get("best_fixed", "the best fixed candidate")) if views else "",
        "traced": _traced_policies(report, traces),
        "title": f"catimage evaluation: {meta.get('metric', 'quality')} vs cost ({meta.get('cost_unit', 'cost')})",
        "csp": CSP, "thumb_px": THUMB_PX, "ring_px": RING_PX, "colours": BUDGET_COLOURS,
        "subtitle": _subtitle(meta), "notes": [str(n) for n in meta.get("notes") or []],
        "policies": [policy_section(report, v) for v in views],
        "cost_unit": str(meta.get("cost_unit", "cost")), "metric": str(meta.get("metric", "quality")),
        "plot_uri": f"data:image/png;base64,{base64.b64encode(plot_png).decode('ascii')}" if plot_png else None,
        "plot_alt": f"Deferral curves: mean {meta.get('metric', 'quality')} against average cost per prompt for "
                    + ", ".join(v.name for v in views) + ", the oracle, the best random mix of fixed candidates, "
                    "and each fixed candidate as a point",
        "routers": _routers_rows(report), "ratio_rule": describe_miss_rule(),
        "gallery": gallery_view(gallery), "all_figures": [(k, num(v)) for k, v in flat],
        "version": __version__, "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("catimage.evaluation", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(report: Mapping[str, Any], gallery: Gallery | None = None, plot_png: bytes | None = None,
                traces: Mapping[str, Sequence[PlanTrace]] | None = None) -> str:
    """The whole page as one string (pure: no files read except the gallery's image paths)."""
    return _environment().get_template(TEMPLATE).render(page_model(report, gallery, plot_png, traces))


def _plot_bytes(report: Mapping[str, Any], out: Path, plot: bytes | Path | None) -> bytes | None:
    """The plot to embed: given bytes or file, else deferral.png beside the report, else drawn now."""
    if isinstance(plot, (bytes, bytearray)):
        return bytes(plot)
    path = Path(plot) if plot is not None else out / "deferral.png"
    if path.is_file():
        return path.read_bytes()
    if not report.get("fixed") and not report.get("router"):
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return plot_deferral(report, Path(tmp) / "p.png").read_bytes()
    except (CatimageError, KeyError, TypeError, ValueError) as err:
        log.warning("could not draw the deferral plot for report.html (%s); the page shows none", err)
        return None


def write_html_report(
    report: Mapping[str, Any], out_dir: str | Path, gallery: Gallery | None = None, plot: bytes | Path | None = None,
    traces: Mapping[str, Sequence[PlanTrace]] | None = None,
) -> Path:
    """Write `out_dir/report.html` (self-contained) and return its path.

    `plot` defaults to the deferral.png that catimage.evaluation.report.write_report left in `out_dir`
    (drawn afresh when there is none); `gallery` adds the per-prompt gallery.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(render_html(report, gallery, _plot_bytes(report, out, plot), traces), encoding="utf-8")
    log.info("wrote %s", path)
    return path
