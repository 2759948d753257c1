"""The deferral plot (deferral.png): each policy's curve (route, cascade, or several routers), the
oracle, the mixture hull and the fixed candidates, on one pair of axes. matplotlib's object API with
the Agg canvas: no pyplot global state.

Every curve's legend entry names what decides and what judges, and says "upper bound" when the
decision metric is the judge (catimage.evaluation.figures.PolicyView.label); the notes are listed
once, on the page, never under the axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catimage.evaluation.figures import policy_views
from catimage.policy.routing import curve_arrays, interpolate_curve

LOG_SCALE_SPAN = 100.0  # costs spanning more than this factor are plotted on a log axis


def _dense(points: Sequence[Any], log_x: bool, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Points to draw a linearly interpolated curve faithfully (straight segments bend on a log axis)."""
    xs, ys = curve_arrays(points)
    if not log_x or xs.size < 2 or xs[0] <= 0:
        return xs, ys
    grid = np.unique(np.concatenate([xs, np.geomspace(xs[0], xs[-1], n)]))
    return grid, np.asarray(interpolate_curve(points, grid))


def _wants_log(costs: np.ndarray) -> bool:
    pos = costs[costs > 0]
    return bool(pos.size == costs.size and pos.size >= 2 and pos.max() / pos.min() > LOG_SCALE_SPAN)


def curves_to_draw(report: Mapping[str, Any], curves: Mapping[str, Mapping[str, Any]] | None) -> dict[str, list]:
    """Legend label -> curve points: the given routers (`curves`, label -> report with a `router`), else
    every policy of the report, each labelled with its decision metric and judge."""
    if curves:
        judge = (report.get("meta") or {}).get("metric", "quality")
        return {f"router {label} (decides on its predicted {judge})": list(rep.get("router") or [])
                for label, rep in curves.items()}
    return {view.label: view.curve for view in policy_views(report) if view.curve}


def plot_deferral(
    report: Mapping[str, Any],
    path: str | Path,
    *,
    curves: Mapping[str, Mapping[str, Any]] | None = None,
    log_x: bool | None = None,
    title: str | None = None,
) -> Path:
    """One figure: the report's policies (or `curves`), its routing oracle, hull and fixed points.

    x = average cost per prompt in the pool's cost unit (log axis when the costs span more than
    100x and all are positive, unless `log_x` says otherwise), shown up to a little beyond the
    dearest fixed candidate: a curve that goes on (a cascade drawing many images) is marked at the
    edge with where it ends. y = mean judge score.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta = report.get("meta") or {}
    fixed = report.get("fixed") or []
    costs = np.array([p["cost"] for p in fixed], dtype=np.float64)
    log_x = _wants_log(costs) if log_x is None else log_x
    right = float(costs.max()) if costs.size else None
    fig = Figure(figsize=(8, 6.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if report.get("oracle"):
        _draw(ax, report["oracle"], log_x, right, color="0.45", lw=1.2, ls=":",
              label="routing oracle (routes on the test labels' means; bounds routing only)")
    if report.get("hull"):
        ax.plot(*_dense(report["hull"], log_x), color="tab:gray", lw=1.5, ls="--",
                label="best random mix of fixed candidates")
    for k, (label, points) in enumerate(curves_to_draw(report, curves).items()):
        _draw(ax, points, log_x, right, color=f"C{k}", lw=2, label=label)
    if right is not None and right > float(costs.min()):
        lo = float(costs.min())
        ax.set_xlim(lo * 0.9 if log_x else lo - 0.03 * (right - lo), right * 1.25 if log_x else right + 0.25 * (right - lo))
    _mark_beyond(ax, report, curves)
    _fixed_points(ax, fixed)
    _label_axes(fig, ax, meta, log_x, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _draw(ax: Any, points: Sequence[Any], log_x: bool, right: float | None, **style: Any) -> None:
    """A curve, held flat beyond its lambda = 0 point up to the dearest fixed candidate's cost."""
    xs, ys = _dense(points, log_x)
    ax.plot(xs, ys, **style)
    if right is not None and xs.size and xs[-1] < right:
        ax.plot([xs[-1], right], [ys[-1], ys[-1]], color=style.get("color"), lw=1, ls=style.get("ls", "-"), alpha=0.4)


def _mark_beyond(ax: Any, report: Mapping[str, Any], curves: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Where a curve leaves the axes on the right, say at what cost and quality it ends."""
    edge = ax.get_xlim()[1]
    for k, points in enumerate(curves_to_draw(report, curves).values()):
        xs, ys = curve_arrays(points)
        if xs.size and xs[-1] > edge:
            q_edge = float(interpolate_curve(points, edge))
            ax.annotate(f"goes on to {ys[-1]:.3g}\nat cost {xs[-1]:.3g}", (edge, q_edge), textcoords="offset points",
                        xytext=(-4, -6), ha="right", va="top", fontsize=8, color=f"C{k}")


def _fixed_points(ax: Any, fixed: Sequence[Mapping[str, Any]]) -> None:
    """Each fixed candidate as a labelled point; a label that would sit on its cheaper neighbour's goes above."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float]] = []
    for p in sorted(fixed, key=lambda p: p["cost"]):
        fx, fy = (p["cost"] - x0) / (x1 - x0), (p["quality"] - y0) / (y1 - y0)
        crowded = any(abs(fx - px) < 0.12 and abs(fy - py) < 0.04 for px, py in placed)
        ax.scatter([p["cost"]], [p["quality"]], color="black", zorder=5, s=22)
        ax.annotate(p["candidate"], (p["cost"], p["quality"]), textcoords="offset points",
                    xytext=(4, 6) if crowded else (4, -10), fontsize=8)
        placed.append((fx, fy))


def _label_axes(fig: Any, ax: Any, meta: Mapping[str, Any], log_x: bool, title: str | None) -> None:
    """Axis labels and title name the judge; the legend sits below the axes, where it hides no point."""
    judge = meta.get("metric", "quality")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"average cost per prompt ({meta.get('cost_unit', 'cost')}{', log scale' if log_x else ''})")
    ax.set_ylabel(f"mean {judge} (judge; test prompts)")
    ax.set_title(title or f"Deferral curves judged by {judge} ({meta.get('n_test', '?')} test prompts)")
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=1, frameon=False)
