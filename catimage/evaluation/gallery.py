"""The gallery of report.html as data: one row per prompt, one cell per candidate (its image, its
measured score and the router's predicted quality) and the candidate chosen at each budget.

Build one from the pipeline's objects (`gallery_from_router`, `gallery_from_report`) or from
predictions (`gallery_from_predictions`); catimage.evaluation.html renders it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catimage.errors import CatimageError
from catimage.policy.routing import calibrate_lambda, route
from catimage.tables.table import aggregate, metric_columns, split_prompts, validate_table

if TYPE_CHECKING:
    from catimage.model.router_model import RouterModel

DEFAULT_MAX_ROWS = 30
# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies, and none is a
# pure primary, so a ring never blends into a saturated image.
BUDGET_COLOURS = ("#E69F00", "#009E73", "#CC79A7", "#56B4E9")


@dataclass(frozen=True)
class GalleryCell:
    """One candidate's result for one prompt.

    `image` is encoded bytes (PNG, WebP, JPEG) or a local file path; None shows a placeholder.
    `score` is the shown image's own score; `mean_score` the mean over this prompt's `n_samples`
    samples of the candidate (what the estimator learns, so the figure to hold `predicted` against).
    """

    candidate: str
    image: bytes | Path | str | None = None
    score: float | None = None
    predicted: float | None = None
    mean_score: float | None = None
    n_samples: int = 0


@dataclass(frozen=True)
class GalleryRow:
    """One prompt: a cell per candidate (in the gallery's order) and the choice at each budget."""

    prompt: str
    cells: tuple[GalleryCell, ...]
    chosen: Mapping[str, str]  # budget label -> chosen candidate
    prompt_id: str | None = None


@dataclass(frozen=True)
class Budget:
    """A budget the gallery shows choices for: its label, value (cost unit) and lambda, when known."""

    label: str
    value: float | None = None
    lam: float | None = None


@dataclass
class Gallery:
    """Rows to show, the candidates' order and costs, and the budgets (each gets a colour)."""

    candidates: list[str]
    rows: list[GalleryRow]
    budgets: list[Budget]
    costs: list[float] | None = None
    metric: str = "quality"
    cost_unit: str = "cost"
    note: str | None = None  # where the prompts come from, e.g. whether the router saw them in training
    n_total: int | None = None  # prompts available before `max_rows` cut the list

    def __post_init__(self) -> None:
        labels = [b.label for b in self.budgets]
        if len(set(labels)) != len(labels):
            raise CatimageError(f"budget labels must be distinct, got {labels}")
        if len(labels) > len(BUDGET_COLOURS):
            raise CatimageError(f"a gallery shows at most {len(BUDGET_COLOURS)} budgets, got {len(labels)}")
        if self.costs is not None and len(self.costs) != len(self.candidates):
            raise CatimageError(f"{len(self.candidates)} candidates but {len(self.costs)} costs")
        for row in self.rows:
            names = [c.candidate for c in row.cells]
            if names != list(self.candidates):
                raise CatimageError(f"gallery row {row.prompt[:40]!r} has cells {names}, expected {self.candidates}")
            bad = {k: v for k, v in row.chosen.items() if k not in labels or v not in self.candidates}
            if bad:
                raise CatimageError(f"gallery row {row.prompt[:40]!r}: unknown budget or candidate in choices {bad}")


# --- building a gallery from the pipeline's objects ---------------------------------------------


def _samples_by_key(table: pa.Table, prompt_ids: Sequence[str], metric: str) -> tuple[dict, dict]:
    """{(prompt_id, candidate): [(seed, score, image_path)]} for the given prompts, and their texts."""
    wanted = pa.array(list(prompt_ids), pa.string())
    sub = table.filter(pc.is_in(table.column("prompt_id"), value_set=wanted))
    cols = sub.column_names
    n = sub.num_rows
    seeds = sub.column("seed").to_pylist() if "seed" in cols else list(range(n))
    paths = sub.column("image_path").to_pylist() if "image_path" in cols else [None] * n
    samples: dict[tuple[str, str], list[tuple[int, float, str | None]]] = {}
    texts: dict[str, str] = {}
    for pid, prompt, cand, seed, score, path in zip(
        sub.column("prompt_id").to_pylist(), sub.column("prompt").to_pylist(), sub.column("candidate").to_pylist(),
        seeds, sub.column(metric).to_pylist(), paths,
    ):
        texts.setdefault(pid, prompt)
        samples.setdefault((pid, cand), []).append((int(seed) if seed is not None else 0, score, path))
    return samples, texts


def _cell(candidate: str, samples: list[tuple[int, float, str | None]], predicted: float | None) -> GalleryCell:
    """The lowest-seed sample that has an image is shown; the mean covers every finite score."""
    scores = [s for _, s, _ in samples if s is not None and math.isfinite(s)]
    with_image = sorted((t for t in samples if t[2]), key=lambda t: t[0])
    shown = with_image[0] if with_image else None
    return GalleryCell(
        candidate=candidate,
        image=shown[2] if shown else None,
        score=shown[1] if shown else None,
        predicted=predicted,
        mean_score=float(np.mean(scores)) if scores else None,
        n_samples=len(scores),
    )


def _pick_metric(table: pa.Table, metric: str | None) -> str:
    metrics = metric_columns(table)
    if metric is None:
        if len(metrics) != 1:
            raise CatimageError(f"the table has metrics {metrics}; say which one the gallery shows (metric=...)")
        return metrics[0]
    if metric not in metrics:
        raise CatimageError(f"metric {metric!r} is not a numeric column of the table; choose one of {metrics}")
    return metric


def gallery_from_predictions(
    table: pa.Table,
    prompt_ids: Sequence[str],
    pred: Any,
    candidates: Sequence[str],
    chosen: Mapping[str, Sequence[int | str]],
    *,
    budgets: Sequence[Budget] | None = None,
    costs: Sequence[float] | None = None,
    metric: str | None = None,
    cost_unit: str = "cost",
    note: str | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> Gallery:
    """A gallery from what the caller already has.

    `pred` is (n, M) predicted quality in metric units for `prompt_ids` (n) and `candidates` (M);
    `chosen` maps a budget label to n choices (candidate indices or names). `budgets` describes the
    labels (value, lambda) when known. Images, scores and prompt texts come from `table`.
    """
    table = validate_table(table)
    metric = _pick_metric(table, metric)
    candidates = list(candidates)
    pred = np.asarray(pred, dtype=np.float64)
    n = len(prompt_ids)
    if pred.shape != (n, len(candidates)):
        raise CatimageError(f"predictions have shape {pred.shape}, expected ({n}, {len(candidates)}): one row per prompt id")
    picks: dict[str, list[str]] = {}
    for label, values in chosen.items():
        values = list(values)
        if len(values) != n:
            raise CatimageError(f"budget {label!r} has {len(values)} choices for {n} prompts")
        picks[label] = [candidates[int(v)] if not isinstance(v, str) else v for v in values]
    if budgets is None:
        budgets = [Budget(label) for label in chosen]
    keep = n if max_rows is None else min(n, max_rows)
    ids = list(prompt_ids)[:keep]
    samples, texts = _samples_by_key(table, ids, metric)
    missing = [p for p in ids if p not in texts]
    if missing:
        raise CatimageError(f"{len(missing)} prompt id(s) are not in the quality table, e.g. {missing[0]!r}")
    rows = []
    for i, pid in enumerate(ids):
        cells = tuple(
            _cell(c, samples.get((pid, c), []), float(pred[i, j]) if math.isfinite(pred[i, j]) else None)
            for j, c in enumerate(candidates)
        )
        rows.append(GalleryRow(texts[pid], cells, {label: picks[label][i] for label in picks}, pid))
    return Gallery(
        candidates, rows, list(budgets), costs=[float(c) for c in costs] if costs is not None else None,
        metric=metric, cost_unit=cost_unit, note=note, n_total=n,
    )


def gallery_from_router(
    table: pa.Table,
    router: RouterModel,
    budgets: Mapping[str, float],
    *,
    prompt_ids: Sequence[str] | None = None,
    metric: str | None = None,
    note: str | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> Gallery:
    """Predict and route `prompt_ids` (default: the table's prompts in order) at each labelled budget.

    The router's own calibration turns each budget into lambda (`RouterModel.lambda_for_budget`),
    exactly as `catimage route` and the Serve app do; the table supplies images and scores.
    Only the first `max_rows` prompts are predicted.
    """
    table = validate_table(table)
    if prompt_ids is None:
        prompt_ids = list(dict.fromkeys(table.column("prompt_id").to_pylist()))
    ids = list(prompt_ids)[: len(prompt_ids) if max_rows is None else max_rows]
    _, texts = _samples_by_key(table, ids, _pick_metric(table, metric or router.metric))
    missing = [p for p in ids if p not in texts]
    if missing:
        raise CatimageError(f"{len(missing)} prompt id(s) are not in the quality table, e.g. {missing[0]!r}")
    pred = router.predict([texts[p] for p in ids])
    marks, chosen = [], {}
    for label, value in budgets.items():
        lam = router.lambda_for_budget(value)
        marks.append(Budget(label, float(value), lam))
        chosen[label] = route(pred, router.costs, lam)
    gallery = gallery_from_predictions(
        table, ids, pred, router.candidates, chosen, budgets=marks, costs=list(router.costs),
        metric=metric or router.metric, cost_unit=router.cost_unit, note=note, max_rows=None,
    )
    gallery.n_total = len(prompt_ids)
    return gallery


def gallery_from_report(
    report: Mapping[str, Any],
    table: pa.Table,
    budgets: Mapping[str, float],
    *,
    note: str | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> Gallery:
    """The gallery of an evaluation's trial 0: its test prompts, the predictions it measured, and the
    choice at each labelled budget. Lambda for a budget comes from trial 0's held-out calibration
    prompts (`test_predictions.calibration_pred`), as the router bundle's `lambda_for_budget` and
    every other figure set it, never from the test predictions themselves (which would let the
    gallery meet each budget exactly on the very prompts it shows). `table` supplies images and
    per-sample scores."""
    tests = report.get("test_predictions") or {}
    meta = report.get("meta") or {}
    if not tests.get("prompt_ids"):
        raise CatimageError("the report has no test_predictions (written by catimage.evaluation.trials.evaluate_table)")
    if tests.get("calibration_pred") is None:
        raise CatimageError("the report's test_predictions lack calibration_pred (trial 0's calibration prompts): "
                            "re-run `catimage evaluate` with this version to map budgets to lambda")
    pred = np.asarray(tests["pred"], dtype=np.float64)
    calibration = np.asarray(tests["calibration_pred"], dtype=np.float64)
    costs = np.asarray(meta["costs"], dtype=np.float64)
    marks, chosen = [], {}
    for label, value in budgets.items():
        lam = calibrate_lambda(calibration, costs, value)
        marks.append(Budget(label, float(value), lam))
        chosen[label] = route(pred, costs, lam)
    return gallery_from_predictions(
        table, tests["prompt_ids"], pred, meta["candidates"], chosen, budgets=marks, costs=list(costs),
        metric=meta.get("metric"), cost_unit=meta.get("cost_unit", "cost"),
        note=note or "Trial 0's test prompts (never seen by the router that predicted them); lambda for each "
        "budget set on trial 0's held-out calibration prompts.",
        max_rows=max_rows,
    )


def report_test_prompt_ids(report: Mapping[str, Any], table: pa.Table) -> list[str]:
    """Trial 0's test prompts of an evaluation, re-drawn from the report's meta (seed, fractions).

    catimage.evaluation splits the `aggregate` order of the table with `split_prompts`; doing the
    same here names the prompts the report's figures were measured on.
    """
    meta = report.get("meta") or {}
    need = [k for k in ("seed", "test_frac", "calibration_frac", "metric") if k not in meta]
    if need:
        raise CatimageError(f"the report's meta lacks {need}; cannot re-draw its test split")
    matrix = aggregate(table, meta["metric"], meta.get("candidates"))
    split = split_prompts(matrix.n_prompts, test_frac=meta["test_frac"], calibration_frac=meta["calibration_frac"], seed=meta["seed"])
    return [matrix.prompt_ids[i] for i in split.test]


# --- plans at work: a cascade's attempts, each with both scores -----------------------------------

ImageSource = Callable[[str, str, str, int], "bytes | Path | str | None"]


@dataclass(frozen=True)
class TraceAttempt:
    """One image a plan drew: its decision score (what the policy read), the judge's score, and whether
    the plan accepted it (decision score >= threshold) and returned it."""

    candidate: str
    seed: int
    decision: float | None
    judge: float | None
    accepted: bool
    returned: bool
    cost: float | None = None
    image: bytes | Path | str | None = None


@dataclass(frozen=True)
class PlanTrace:
    """Every attempt of one prompt's plan (from report.json's `policies.<name>.traces`)."""

    prompt: str
    prompt_id: str | None
    plan: str
    attempts: tuple[TraceAttempt, ...]
    budget: float | None = None
    lam: float | None = None


def table_images(table: pa.Table) -> ImageSource:
    """An image source that finds (prompt_id, candidate, seed) in a quality table's `image_path`."""
    if "image_path" not in table.column_names or "seed" not in table.column_names:
        return lambda *_: None
    paths = {
        (pid, cand, int(seed)): path
        for pid, cand, seed, path in zip(table.column("prompt_id").to_pylist(), table.column("candidate").to_pylist(),
                                         table.column("seed").to_pylist(), table.column("image_path").to_pylist())
        if path and seed is not None
    }
    return lambda pid, _prompt, cand, seed: paths.get((pid, cand, int(seed)))


def plan_traces(report: Mapping[str, Any], policy: str = "cascade", images: ImageSource | None = None) -> list[PlanTrace]:
    """The traced plans of `policy` in a report, each attempt's image from `images` when given
    (prompt_id, prompt, candidate, seed -> image or None)."""
    block = (report.get("policies") or {}).get(policy) or {}
    out = []
    for t in block.get("traces") or []:
        pid, prompt = t.get("prompt_id"), str(t.get("prompt", ""))
        attempts = tuple(
            TraceAttempt(str(a["candidate"]), int(a["seed"]), _opt(a.get("decision")), _opt(a.get("judge")),
                         bool(a.get("accepted")), bool(a.get("returned")), _opt(a.get("cost")),
                         images(pid, prompt, str(a["candidate"]), int(a["seed"])) if images and pid else None)
            for a in t.get("attempts") or []
        )
        out.append(PlanTrace(prompt, pid, str(t.get("label") or t.get("plan")), attempts, _opt(t.get("budget")),
                             _opt(t.get("lambda"))))
    return out


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)
