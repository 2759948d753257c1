"""A visual report: one self-contained `report.html` beside report.md, for looking at what the router did.

The page holds the headline figures of an evaluation (whatever the report's summary has), the
deferral plot, the fixed candidates, and a gallery: one row per prompt, one column per candidate,
each cell the candidate's image, its measured score and the router's predicted quality, with the
candidate the router chose at each budget ringed in that budget's colour and labelled in words.

Why one file with everything embedded (data: URIs, inline CSS, no JavaScript, a Content-Security-
Policy that forbids anything else): it can be mailed, attached to an issue or opened from a
laptop's downloads folder and still show every image. Images larger than `EMBED_MAX_PX` are
downscaled before embedding so that a gallery of real 1024 px images stays a few MB; small images
(the tiny demo pool draws 32-64 px) are upscaled by the browser with `image-rendering: pixelated`
so their pixels stay visible rather than blurred.

Inputs are the report dict of catimage.evaluation (read tolerantly: a summary key that is missing
is simply not shown, an unknown one still appears under "All summary figures") and an optional
`Gallery`, which `gallery_from_router` (a fitted RouterModel + the quality table) or
`gallery_from_predictions` (predictions and choices you already have) builds from the pipeline's
own objects.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catimage import __version__
from catimage.errors import CatimageError
from catimage.evaluation.gallery import BUDGET_COLOURS, Gallery, GalleryCell, GalleryRow
from catimage.evaluation.plot import plot_deferral

log = logging.getLogger(__name__)

THUMB_PX = 128  # CSS box of every gallery image: 4x a 32 px and 2x a 64 px image, so pixels stay square
RING_PX = 5  # width of one budget's highlight ring around a chosen image
EMBED_MAX_PX = 320  # larger images are downscaled to this (longest side) before embedding
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# --- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Embedded:
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


def embed_image(image: bytes | Path | str, max_px: int = EMBED_MAX_PX) -> _Embedded | None:
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
    return _Embedded(f"data:{_MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}", width, height)


# --- formatting -------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 4) -> str:
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
        return f"[{_num(value[0], digits)}, {_num(value[1], digits)}]"
    if isinstance(value, (list, tuple)):
        return ", ".join(_num(v, digits) for v in value)
    return str(value)


def _signed(value: Any, digits: int = 3) -> str:
    if not _finite(value):
        return "n/a"
    value = 0.0 if abs(value) < 1e-12 else float(value)  # summation-order noise is not a gain
    return f"{value:+.{digits}g}"


def _interval(summary: Mapping[str, Any], key: str) -> str:
    """' (95% CI lo to hi)' when the summary carries an interval for `key` in a form we recognise."""
    for holder, name in ((summary, f"{key}_ci"), (summary.get("ci") or {}, key), (summary.get("intervals") or {}, key)):
        value = holder.get(name) if isinstance(holder, Mapping) else None
        if isinstance(value, Mapping):
            value = [value.get("lo", value.get("low")), value.get("hi", value.get("high"))]
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(v) for v in value):
            return f"interval {_num(value[0])} to {_num(value[1])}"
    return ""


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


# --- the page -------------------------------------------------------------------------------------

_CSS = f"""
:root {{ color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa;
  --accent: #0b5cad; {' '.join(f'--b{i}: {c};' for i, c in enumerate(BUDGET_COLOURS))} }}
* {{ box-sizing: border-box; }}
body {{ margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--fg); background: #fff; }}
header {{ background: var(--soft); border-bottom: 1px solid var(--line); }}
.wrap {{ max-width: 1240px; margin: 0 auto; padding: 20px 28px; }}
h1 {{ font-size: 24px; margin: 0 0 4px; font-weight: 650; }}
h2 {{ font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }}
.sub, .muted, figcaption, caption {{ color: var(--muted); }}
.sub {{ margin: 0; font-size: 14px; }}
.notes {{ margin: 18px 0 0; padding: 10px 16px; background: #fff8e5; border: 1px solid #f0d58c;
  border-left: 5px solid #d4a72c; border-radius: 6px; }}
.notes strong {{ display: block; margin-bottom: 2px; }}
.notes ul {{ margin: 0; padding-left: 20px; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; margin: 18px 0 0; }}
.card {{ border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; margin: 0; }}
.card dt {{ font-size: 13px; color: var(--muted); }}
.card dd {{ margin: 2px 0 0; font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }}
.card dd small {{ display: block; font-size: 13px; font-weight: 400; color: var(--muted); }}
figure.plot {{ margin: 0; }}
figure.plot img {{ max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
table.data th, table.data td {{ padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; }}
table.data th:first-child, table.data td:first-child {{ text-align: left; }}
table.data thead th {{ background: var(--soft); font-weight: 600; }}
caption {{ text-align: left; padding: 0 0 6px; font-size: 13px; }}
.scroll {{ overflow-x: auto; }}
.legend {{ display: flex; flex-wrap: wrap; gap: 8px 24px; margin: 4px 0 12px; padding: 0; list-style: none; }}
.swatch {{ display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -2px; margin-right: 6px; }}
table.gallery th, table.gallery td {{ border-bottom: 1px solid var(--line); vertical-align: top; }}
table.gallery thead th {{ background: var(--soft); padding: 8px 6px; font-weight: 600; text-align: center;
  max-width: {THUMB_PX + 20}px; overflow-wrap: anywhere; }}
table.gallery thead th:first-child {{ text-align: left; padding-left: 4px; }}
table.gallery thead th .muted {{ display: block; font-weight: 400; font-size: 12px; }}
table.gallery th.prompt {{ width: 220px; min-width: 160px; padding: 14px 12px 14px 4px; text-align: left; font-weight: 400; }}
table.gallery th.prompt code {{ display: block; color: var(--muted); font-size: 11px; margin-top: 4px; }}
table.gallery td {{ padding: 16px 10px 12px; text-align: center; min-width: {THUMB_PX + 20}px; }}
.frame {{ width: {THUMB_PX}px; height: {THUMB_PX}px; margin: 0 auto; background: #eceff3;
  display: flex; align-items: center; justify-content: center; }}
.frame img {{ width: {THUMB_PX}px; height: {THUMB_PX}px; object-fit: contain; display: block; }}
.frame img.px {{ image-rendering: pixelated; }}
.frame .none {{ font-size: 12px; color: var(--muted); padding: 8px; }}
.figs {{ margin: {2 * RING_PX + 6}px 0 0; font-size: 13px; line-height: 1.4; }}
.figs .k {{ color: var(--muted); }}
.figs b {{ font-weight: 700; }}
.tag {{ display: inline-block; margin: 5px 0 0; padding: 0 7px; border-radius: 10px; font-size: 11.5px;
  font-weight: 600; color: #111; border: 2px solid; background: #fff; white-space: nowrap; }}
details {{ margin: 28px 0; }}
summary {{ cursor: pointer; font-weight: 600; }}
footer {{ color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); margin-top: 36px; }}
"""


def _headline(report: Mapping[str, Any]) -> str:
    """Cards for the summary figures that exist; nothing is invented for the ones that do not."""
    s = report.get("summary") or {}
    meta = report.get("meta") or {}
    unit = meta.get("cost_unit", "cost")
    cards: list[tuple[str, str, str]] = []
    if "best_fixed" in s:
        parts = [f"cost {_num(s['best_fixed_cost'])} {_e(unit)}" if _finite(s.get("best_fixed_cost")) else "",
                 f"quality {_num(s['best_fixed_quality'])}" if _finite(s.get("best_fixed_quality")) else ""]
        cards.append(("Best fixed candidate", _e(s["best_fixed"]), ", ".join(p for p in parts if p)))
    if "quality_at_best_fixed_cost" in s:
        detail = f"{_signed(s.get('gain_at_best_fixed_cost'))} vs the best fixed candidate"
        extra = _interval(s, "gain_at_best_fixed_cost")
        cards.append(("Router quality at that cost", _num(s["quality_at_best_fixed_cost"]),
                      detail + (f"; gain {extra}" if extra else "")))
    if "area_over_hull" in s:
        extra = _interval(s, "area_over_hull")
        cards.append(("Mean gain over the mixture hull", _signed(s["area_over_hull"]),
                      "router minus best random mix of fixed candidates" + (f"; {extra}" if extra else "")))
    if "cost_ratio_or_miss" in s:
        ratio = s["cost_ratio_or_miss"]
        detail = (f"router matches {_e(s.get('best_fixed', 'it'))} at {_num(100 * ratio, 3)}% of its cost"
                  if not s.get("missed_best_fixed") else "the router never reaches its quality (a miss)")
        cards.append(("Cost ratio to match it", f"{_num(ratio, 3)}×" if _finite(ratio) else "n/a", detail))
    if "oracle_gain_fraction" in s:
        cards.append(("Share of the oracle's gain", _num(s["oracle_gain_fraction"], 3),
                      f"oracle quality at that cost {_num(s.get('oracle_quality_at_best_fixed_cost'))}"))
    trials = s.get("trials") if isinstance(s.get("trials"), Mapping) else {}
    if trials.get("n"):
        parts = []
        for key, name in (("gain_at_best_fixed_cost", "gain"), ("area_over_hull", "area")):
            mean, std = trials.get(f"mean_{key}"), trials.get(f"std_{key}")
            if mean is not None:
                parts.append(f"{name} {_signed(mean)}" + (f" ± {_num(std, 2)}" if _finite(std) else ""))
        cards.append(("Trials (re-drawn splits)", f"{_num(trials.get('n'))}",
                      f"win rate {_num(trials.get('win_rate'), 3)}" + ("; " + "; ".join(parts) if parts else "")))
    if not cards:
        return '<p class="muted">This report has no summary figures.</p>'
    items = "".join(f'<div class="card"><dt>{label}</dt><dd>{value}<small>{detail}</small></dd></div>'
                    for label, value, detail in cards)
    return f'<dl class="cards">{items}</dl>'


def _subtitle(report: Mapping[str, Any]) -> str:
    meta = report.get("meta") or {}
    parts = []
    if "estimator" in meta:
        emb = (meta.get("embedder") or {}).get("name") if isinstance(meta.get("embedder"), Mapping) else meta.get("embedder")
        parts.append(f"router <strong>{_e(meta['estimator'])}</strong>" + (f" on {_e(emb)} embeddings" if emb else ""))
    if "n_test" in meta:
        parts.append(f"{_e(meta['n_test'])} test prompts" + (f" of {_e(meta['n_prompts'])}" if "n_prompts" in meta else ""))
    if meta.get("candidates"):
        parts.append(f"{len(meta['candidates'])} candidates")
    parts.append(f"quality in {_e(meta.get('metric', 'metric'))} units, cost in {_e(meta.get('cost_unit', 'the pool unit'))}")
    return " · ".join(parts)


def _notes(report: Mapping[str, Any]) -> str:
    notes = list((report.get("meta") or {}).get("notes") or [])
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f'<aside class="notes" aria-label="Read first"><strong>Read first</strong><ul>{items}</ul></aside>'


def _plot(plot_png: bytes | None, report: Mapping[str, Any]) -> str:
    if not plot_png:
        return '<p class="muted">No deferral plot: the report has no curves to draw.</p>'
    meta = report.get("meta") or {}
    uri = f"data:image/png;base64,{base64.b64encode(plot_png).decode('ascii')}"
    alt = (f"Deferral curves: mean {meta.get('metric', 'quality')} against average cost per prompt for the router, "
           "the oracle, the best random mix of fixed candidates, and each fixed candidate as a point")
    return (f'<figure class="plot"><img src="{uri}" alt="{_e(alt)}"><figcaption>Higher and further left is better. '
            "The router earns its keep where its curve lies above the dashed mixture hull.</figcaption></figure>")


def _candidates_table(report: Mapping[str, Any]) -> str:
    fixed = [p for p in report.get("fixed") or [] if isinstance(p, Mapping) and "candidate" in p]
    if not fixed:
        return ""
    s = report.get("summary") or {}
    meta = report.get("meta") or {}
    on_hull = {h.get("candidate") for h in report.get("hull") or [] if isinstance(h, Mapping)}
    gains = s.get("gain_at_fixed_cost") if isinstance(s.get("gain_at_fixed_cost"), Mapping) else {}
    ratios = (s.get("cost_ratio_or_miss_by_candidate") if isinstance(s.get("cost_ratio_or_miss_by_candidate"), Mapping)
              else {})
    rows = []
    for p in sorted(fixed, key=lambda p: p.get("cost") if _finite(p.get("cost")) else math.inf):
        c = p["candidate"]
        rows.append(
            f"<tr><td>{_e(c)}</td><td>{_num(p.get('cost'))}</td><td>{_num(p.get('quality'))}</td>"
            f"<td>{'yes' if c in on_hull else ''}</td><td>{_signed(gains.get(c))}</td><td>{_num(ratios.get(c), 3)}</td></tr>"
        )
    head = (f"<tr><th scope=\"col\">candidate</th><th scope=\"col\">cost ({_e(meta.get('cost_unit', 'cost'))})</th>"
            f"<th scope=\"col\">mean {_e(meta.get('metric', 'quality'))}</th><th scope=\"col\">on hull</th>"
            "<th scope=\"col\">router gain at its cost</th><th scope=\"col\">router cost ratio to match</th></tr>")
    return (f'<h2 id="candidates">Fixed candidates</h2><div class="scroll"><table class="data"><caption>Always sending '
            f"every test prompt to one candidate, against the router at that candidate's cost.</caption><thead>{head}</thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _routers_table(report: Mapping[str, Any]) -> str:
    routers = report.get("routers")
    if not isinstance(routers, Mapping) or not routers:
        return ""
    rows = []
    for label, sub in routers.items():
        s = (sub or {}).get("summary") or {}
        tr = s.get("trials") if isinstance(s.get("trials"), Mapping) else {}
        rows.append(f"<tr><td>{_e(label)}</td><td>{_num(s.get('quality_at_best_fixed_cost'))}</td>"
                    f"<td>{_signed(s.get('area_over_hull'))}</td><td>{_num(s.get('cost_ratio_or_miss'), 3)}</td>"
                    f"<td>{_num(tr.get('win_rate'), 3)}</td></tr>")
    head = ("<tr><th scope=\"col\">router</th><th scope=\"col\">quality at best fixed cost</th><th scope=\"col\">area over hull"
            "</th><th scope=\"col\">cost ratio to match</th><th scope=\"col\">win rate</th></tr>")
    return (f'<h2 id="routers">Routers compared</h2><div class="scroll"><table class="data"><thead>{head}</thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _all_figures(report: Mapping[str, Any]) -> str:
    flat: list[tuple[str, Any]] = []
    _flatten("", report.get("summary") or {}, flat)
    if not flat:
        return ""
    rows = "".join(f"<tr><td><code>{_e(k)}</code></td><td>{_e(_num(v))}</td></tr>" for k, v in flat)
    return (f'<details><summary>All summary figures ({len(flat)})</summary><div class="scroll"><table class="data">'
            f'<thead><tr><th scope="col">key</th><th scope="col">value</th></tr></thead><tbody>{rows}</tbody></table>'
            "</div></details>")


def _ring(indices: Sequence[int]) -> str:
    """Nested box-shadow rings, one per budget that chose this cell, innermost = first budget."""
    rings = [f"0 0 0 {RING_PX * (k + 1)}px var(--b{i})" for k, i in enumerate(indices)]
    return f' style="box-shadow: {", ".join(rings)}"' if rings else ""


def _row_best(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if len(finite) > 1 else None


def _figure(name: str, value: float | None, best: float | None) -> str:
    text = _num(value, 3)
    if best is not None and value is not None and value == best:
        text = f"<b>{text}</b>"
    return f'<span class="k">{name}</span> {text}'


def _gallery_cell(row: GalleryRow, cell: GalleryCell, gallery: Gallery) -> str:
    labels = [b.label for b in gallery.budgets]
    picked = [i for i, label in enumerate(labels) if row.chosen.get(label) == cell.candidate]
    embedded = embed_image(cell.image) if cell.image is not None else None
    if embedded:
        pixelated = ' class="px"' if max(embedded.width, embedded.height) < THUMB_PX else ""
        alt = f"{cell.candidate}'s image for: {row.prompt[:120]}"
        inner = (f'<img src="{embedded.uri}" alt="{_e(alt)}" width="{THUMB_PX}" height="{THUMB_PX}"{pixelated}'
                 f' title="{embedded.width}×{embedded.height} px">')
    else:
        inner = f'<span class="none">{"image not readable" if cell.image is not None else "no image"}</span>'
    best_mean = _row_best([c.mean_score for c in row.cells])
    best_pred = _row_best([c.predicted for c in row.cells])
    figs = []
    if cell.score is not None:
        figs.append(_figure("score", cell.score, None))
    if cell.mean_score is not None and (cell.n_samples > 1 or cell.score is None):
        figs.append(_figure(f"mean of {cell.n_samples}", cell.mean_score, best_mean))
    if cell.score is None and cell.mean_score is None:
        figs.append('<span class="k">no score</span>')
    figs.append(_figure("predicted", cell.predicted, best_pred))
    tags = "".join(f'<br><span class="tag" style="border-color: var(--b{i})">chosen at {_e(labels[i])}</span>'
                   for i in picked)
    return f'<td><div class="frame"{_ring(picked)}>{inner}</div><div class="figs">{"<br>".join(figs)}{tags}</div></td>'


def _budget_legend(gallery: Gallery) -> str:
    items = []
    costs = dict(zip(gallery.candidates, gallery.costs)) if gallery.costs is not None else {}
    for i, b in enumerate(gallery.budgets):
        text = f"chosen at <strong>{_e(b.label)}</strong>"
        if b.value is not None:
            text += f": average-cost budget {_num(b.value)} {_e(gallery.cost_unit)}"
        if b.lam is not None:
            text += f", λ = {_num(b.lam, 3)}"
        spent = [costs[r.chosen[b.label]] for r in gallery.rows if b.label in r.chosen] if costs else []
        if spent:
            text += f"; the choices below cost {_num(float(np.mean(spent)))} on average"
        items.append(f'<li><span class="swatch" style="background: var(--b{i})"></span>{text}</li>')
    return f'<ul class="legend">{"".join(items)}</ul>'


def _gallery(gallery: Gallery | None) -> str:
    if gallery is None:
        return ""
    shown = len(gallery.rows)
    total = gallery.n_total if gallery.n_total is not None else shown
    intro = (f"<p>{shown} prompt{'s' if shown != 1 else ''}" + (f" (of {total})" if total > shown else "") +
             f". Each cell: the candidate's image, its <em>score</em> ({_e(gallery.metric)}; the mean over samples when "
             f"there are several) and the router's <em>predicted</em> quality. Bold: the row's best mean score "
             f"and best prediction. A ring and a label mark the candidate the router chose at each budget.</p>")
    note = f'<p class="muted">{_e(gallery.note)}</p>' if gallery.note else ""
    costs = gallery.costs or [None] * len(gallery.candidates)
    head = '<th scope="col">prompt</th>' + "".join(
        f'<th scope="col">{_e(c)}<span class="muted">{"cost " + _num(k) if k is not None else ""}</span></th>'
        for c, k in zip(gallery.candidates, costs))
    body = []
    for row in gallery.rows:
        pid = f"<code>{_e(row.prompt_id)}</code>" if row.prompt_id else ""
        cells = "".join(_gallery_cell(row, cell, gallery) for cell in row.cells)
        body.append(f'<tr><th scope="row" class="prompt">{_e(row.prompt)}{pid}</th>{cells}</tr>')
    return (f'<h2 id="gallery">Gallery: what the router chose</h2>{intro}{note}{_budget_legend(gallery)}'
            f'<div class="scroll"><table class="gallery"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def render_html(report: Mapping[str, Any], gallery: Gallery | None = None, plot_png: bytes | None = None) -> str:
    """The whole page as one string (pure: no files read except the gallery's image paths)."""
    meta = report.get("meta") or {}
    title = f"catimage evaluation: {meta.get('metric', 'quality')} vs cost ({meta.get('cost_unit', 'cost')})"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><div class="wrap"><h1>{_e(title)}</h1><p class="sub">{_subtitle(report)}</p></div></header>
<main class="wrap">
{_notes(report)}
<h2 id="summary">Summary (trial 0)</h2>
{_headline(report)}
<h2 id="plot">Deferral curve</h2>
{_plot(plot_png, report)}
{_routers_table(report)}
{_candidates_table(report)}
{_gallery(gallery)}
{_all_figures(report)}
</main>
<footer><div class="wrap">Written by catimage {_e(__version__)} on {when}. One self-contained file: every image is
embedded; no scripts, no external resources.</div></footer>
</body>
</html>
"""


def _plot_bytes(report: Mapping[str, Any], out: Path, plot: bytes | Path | None) -> bytes | None:
    """The plot to embed: given bytes or file, else deferral.png beside the report, else drawn now."""
    if isinstance(plot, (bytes, bytearray)):
        return bytes(plot)
    path = Path(plot) if plot is not None else out / "deferral.png"
    if path.is_file():
        return path.read_bytes()
    if not report.get("fixed") and not report.get("router"):
        return None
    meta = report.get("meta") or {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return plot_deferral({str(meta.get("estimator", "router")): report}, Path(tmp) / "p.png").read_bytes()
    except (CatimageError, KeyError, TypeError, ValueError) as err:
        log.warning("could not draw the deferral plot for report.html (%s); the page shows none", err)
        return None


def write_html_report(
    report: Mapping[str, Any], out_dir: str | Path, gallery: Gallery | None = None, plot: bytes | Path | None = None
) -> Path:
    """Write `out_dir/report.html` (self-contained) and return its path.

    `plot` defaults to the deferral.png that catimage.evaluation.report.write_report left in `out_dir`
    (drawn afresh when there is none); `gallery` adds the per-prompt gallery.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(render_html(report, gallery, _plot_bytes(report, out, plot)), encoding="utf-8")
    log.info("wrote %s", path)
    return path
