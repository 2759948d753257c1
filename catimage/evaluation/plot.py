"""The deferral plot (deferral.png): each router's curve, the oracle, the mixture hull and the fixed
candidates. matplotlib's object API with the Agg canvas: no pyplot global state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catimage.policy.routing import curve_arrays, interpolate_curve

LOG_SCALE_SPAN = 100.0  # costs spanning more than this factor are plotted on a log axis


def _dense(points: Sequence[Any], log_x: bool, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Points to draw a linearly interpolated curve faithfully (straight segments bend on a log axis)."""
    xs, ys = curve_arrays(points)
    if not log_x or xs.size < 2 or xs[0] <= 0:
        return xs, ys
    grid = np.unique(np.concatenate([xs, np.geomspace(xs[0], xs[-1], n)]))
    return grid, np.asarray(interpolate_curve(points, grid))


def plot_deferral(
    reports: Mapping[str, Mapping[str, Any]], path: str | Path, log_x: bool | None = None, title: str | None = None
) -> Path:
    """One figure: each report's router curve, plus the first report's oracle, hull and fixed points.

    x = average cost per prompt in the pool's cost unit (log axis when the costs span more than
    100x and all are positive, unless `log_x` says otherwise); y = quality in the metric's units.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not reports:
        raise ValueError("plot_deferral needs at least one report")
    first = next(iter(reports.values()))
    meta = first.get("meta", {})
    fixed = first.get("fixed", [])
    costs = np.array([p["cost"] for p in fixed], dtype=np.float64) if fixed else np.zeros(0)
    if log_x is None:
        pos = costs[costs > 0]
        log_x = bool(pos.size == costs.size and pos.size >= 2 and pos.max() / pos.min() > LOG_SCALE_SPAN)

    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if first.get("oracle"):
        ax.plot(*_dense(first["oracle"], log_x), color="0.45", lw=1.2, ls=":", label="oracle (test labels)")
    if first.get("hull"):
        hx, hy = _dense(first["hull"], log_x)
        ax.plot(hx, hy, color="tab:gray", lw=1.5, ls="--", label="best random mix of fixed candidates")
    right = float(costs.max()) if costs.size else None
    for k, (label, rep) in enumerate(reports.items()):
        if rep.get("router"):
            rx, ry = _dense(rep["router"], log_x)
            ax.plot(rx, ry, lw=2, color=f"C{k}", label=f"router: {label}")
            if right is not None and rx[-1] < right:  # beyond its lambda=0 cost the router stays flat
                ax.plot([rx[-1], right], [ry[-1], ry[-1]], lw=1, color=f"C{k}", alpha=0.4)
    for p in fixed:
        ax.scatter([p["cost"]], [p["quality"]], color="black", zorder=5, s=22)
        ax.annotate(p["candidate"], (p["cost"], p["quality"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    unit = meta.get("cost_unit", "cost")
    ax.set_xlabel(f"average cost per prompt ({unit}{', log scale' if log_x else ''})")
    ax.set_ylabel(f"mean {meta.get('metric', 'quality')} (test prompts)")
    ax.set_title(title or f"Deferral curves: {meta.get('metric', 'quality')} vs cost ({meta.get('n_test', '?')} test prompts)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
