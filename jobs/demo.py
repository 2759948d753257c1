"""The main job on the embedded default: the whole catimage loop on one machine, nothing downloaded.

local Ray -> the scene-world pool (two trained generators at several step counts and guidance
scales, shipped in the package) -> Ray Data build job on fresh held-out prompts (images kept) -> fit
of the router (twoway-ridge in-process by default; `--estimator transformer` fits on Ray Train)
on the shipped world table (1,000+ prompts x every candidate x 4 seeds, scores only) ->
evaluation over re-drawn splits + the fitted router on the fresh prompts it never saw ->
report.{json,md,html} + deferral.png -> Ray Serve app -> routed requests at two budgets -> clean
shutdown.

With another pool (`--pool`), the router is fitted and evaluated on the freshly built table instead
(or on `--table`). `catimage demo` calls `run_demo`; it is also runnable as `python jobs/demo.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from catimage.errors import CatimageError

log = logging.getLogger(__name__)

DEMO_REQUESTS = (
    "a red circle",
    "two small blue squares on a white background",
    "a yellow triangle to the left of a green circle above a purple square",
)
WORLD_POOL, WORLD_PROMPTS, WORLD_TABLE = "world_pool.yaml", "world_demo_prompts.txt", "world_table.parquet"


def embedded(name: str) -> Path:
    """A file shipped inside the package (works from any working directory, no ../shared needed)."""
    return Path(str(resources.files("catimage") / "data" / name))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise CatimageError(
                f"port {port} on {host} is already in use; pass another with --port, or omit --port to pick a free one"
            ) from None


@dataclass
class DemoResult:
    """What the demo did and where its files are."""

    out: Path
    table: Path
    model: Path
    report: dict[str, Path]
    decisions: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _stage(console: Console, name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(f"[bold cyan]{name}[/] ..."):
        yield
    timings[name] = time.perf_counter() - start
    console.print(f"[green]done[/] {name} [dim]({timings[name]:.1f} s)[/]")


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A private local Ray for the demo (no dashboard), always shut down, Serve included."""
    import ray

    if ray.is_initialized():
        raise CatimageError("a Ray session is already running in this process; the demo starts its own")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The demo prints its own stage lines; Ray's INFO chatter would drown them.
    for name in ("ray", "ray.data", "ray.serve", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as err:  # noqa: BLE001 - Ray raises many kinds; the user needs one message
        raise CatimageError(
            f"Ray could not start ({type(err).__name__}: {err}). Check free memory and /tmp space, and that no "
            "stale Ray is running (`ray stop`)."
        ) from err
    try:
        yield
    finally:
        from ray import serve

        with contextlib.suppress(Exception):
            if serve.status().applications:
                serve.shutdown()
        ray.shutdown()


def run_demo(
    out: Path,
    pool_path: Path | None = None,
    prompts_path: Path | None = None,
    seeds: int = 2,
    metric: str | None = None,
    estimator: str = "twoway-ridge",
    embedder: str = "minilm",
    port: int | None = None,
    num_cpus: int = 2,
    max_epochs: int = 40,
    console: Console | None = None,
    table_path: Path | None = None,
    trials: int = 5,
) -> DemoResult:
    """Run every stage; raise `CatimageError` with a next step on anything the user can fix.

    The router is fitted and evaluated on `table_path`: by default the shipped world table when the
    pool is the embedded world pool, else the table this run builds.
    """
    from catimage.tables.build import BuildConfig
    from catimage.tables.pool import load_pool
    from jobs.build_dataset import print_summary, run_build
    from jobs.train_estimator import run_train

    console = console or Console()
    out = Path(out)
    world = pool_path is None
    pool_path = Path(pool_path) if pool_path else embedded(WORLD_POOL)
    prompts_path = Path(prompts_path) if prompts_path else embedded(WORLD_PROMPTS)
    if table_path is None and world:
        table_path = embedded(WORLD_TABLE)
    pool = load_pool(pool_path)
    metric = metric or (pool.metrics[0].name if pool.metrics else None)
    if port is None:
        port = free_port()
    check_port_free(port)
    timings: dict[str, float] = {}
    build_dir, model_dir, report_dir = out / "table", out / "model", out
    console.rule("[bold]catimage demo")
    console.print(
        f"pool [bold]{pool_path}[/] ({', '.join(pool.names)}), fresh prompts [bold]{prompts_path}[/], S={seeds}, "
        f"metric {metric}, estimator {estimator} + {embedder}"
    )
    with local_ray(num_cpus):
        with _stage(console, "1/5 build a quality table of fresh prompts (Ray Data)", timings):
            build = run_build(BuildConfig(pool=pool_path, prompts=prompts_path, output=build_dir, seeds=seeds,
                                          save_images="png"), progress=False)
        print_summary(build, console)
        if build.table_path is None:
            raise CatimageError(f"the build wrote no rows; see the errors table {build.errors_path}")
        fit_table = Path(table_path) if table_path else build.table_path

        where = "Ray Train" if estimator == "transformer" else "in-process"
        with _stage(console, f"2/5 fit the router ({estimator}) on {fit_table.name} ({where})", timings):
            run_train(fit_table, pool_path, model_dir, estimator=estimator, embedder=embedder, metric=metric,
                      num_workers=1, max_epochs=max_epochs)

        with _stage(console, f"3/5 evaluate ({trials} re-drawn splits, and on the fresh prompts)", timings):
            report, paths = _evaluate(fit_table, build.table_path, pool_path, model_dir, report_dir, metric,
                                      estimator, embedder, max_epochs, trials)

        decisions = _serve_and_ask(console, timings, model_dir, pool_path, pool, port, _budgets(report))

    timings_total = sum(timings.values())
    _print_final(console, out, build.table_path, model_dir, paths, report, decisions, timings_total)
    return DemoResult(out, build.table_path, model_dir, paths, decisions, timings)


def _budgets(report: dict[str, Any]) -> tuple[float, float]:
    """A tight and a loose budget: 1/8 and 1/2 of always using the best fixed candidate (at least the
    cheapest candidate's cost), so the demo shows the choice move with the budget."""
    summary = report["summary"]
    cheapest = min(p["cost"] for p in report["fixed"])
    best = float(summary["best_fixed_cost"])
    return max(best / 8, cheapest), max(best / 2, cheapest)


def _evaluate(fit_table: Path, fresh_table: Path, pool_path: Path, model_dir: Path, report_dir: Path,
              metric: str | None, estimator: str, embedder: str, max_epochs: int, trials: int) -> tuple[dict[str, Any], dict[str, Path]]:
    """Re-drawn splits of the fit table, then the fitted router on the fresh build (which it never saw)."""
    from catimage.evaluation.figures import evaluate_predictions
    from catimage.evaluation.gallery import gallery_from_router
    from catimage.evaluation.jsonable import to_jsonable
    from catimage.evaluation.report import write_report
    from catimage.evaluation.trials import EvaluateOptions, evaluate_table
    from catimage.features.registry import make_embedder
    from catimage.model.router_model import RouterModel
    from catimage.tables.table import load_pool_matrix, read_quality_table

    pool, matrix, costs = load_pool_matrix(fit_table, pool_path, metric=metric)
    params = {"max_epochs": max_epochs} if estimator == "transformer" else {}
    report = evaluate_table(matrix, costs, EvaluateOptions(
        estimator=estimator, estimator_params=params, embedder=make_embedder(embedder), test_frac=0.2,
        calibration_frac=0.1, seed=0, trials=trials, cost_unit=pool.cost_unit, notes=tuple(pool.report_notes()),
    ))
    router = RouterModel.load(model_dir)
    budgets = _budgets(report)
    if fresh_table != fit_table:
        _, fresh, _ = load_pool_matrix(fresh_table, pool_path, metric=metric)
        keep = np.isfinite(fresh.mean).all(axis=1)
        result = evaluate_predictions(router.predict([fresh.prompts[i] for i in np.flatnonzero(keep)]),
                                      fresh.mean[keep], costs, fresh.candidates)
        report["fresh_prompts"] = to_jsonable({"n_prompts": int(keep.sum()), "summary": result.summary})
        report["meta"]["notes"].append(
            f"'fresh_prompts': the router fitted on {fit_table.name} routing {int(keep.sum())} prompts built by this "
            "run, none of which it saw; the gallery shows them."
        )
    gallery = gallery_from_router(
        read_quality_table(fresh_table), router, {f"budget {b:.3g}": b for b in budgets}, metric=metric,
        note="Prompts built by this run; the router never saw them." if fresh_table != fit_table else
        "Prompts of the fitted table (the router was trained on most of them).",
    )
    return report, write_report(report, report_dir, gallery=gallery)


def _serve_and_ask(console, timings, model_dir, pool_path, pool, port, budgets) -> list[dict[str, Any]]:
    import httpx
    from ray import serve

    from serve.app import build_app
    from serve.schemas import AppArgs

    decisions: list[dict[str, Any]] = []
    with _stage(console, f"4/5 start the Serve app on 127.0.0.1:{port}", timings):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(AppArgs(model_dir=str(model_dir), pool=str(pool_path))), name="catimage",
                  route_prefix="/", blocking=False)
        _wait_healthy(f"http://127.0.0.1:{port}/healthz")
    with _stage(console, "5/5 routed requests at two budgets", timings):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for budget in budgets:
                for prompt in DEMO_REQUESTS:
                    resp = client.post("/v1/generate", json={"prompt": prompt, "budget": budget, "seed": 0, "return": "png_base64"})
                    if resp.status_code != 200:
                        raise CatimageError(f"the Serve app answered {resp.status_code}: {resp.text}")
                    body = resp.json()
                    decisions.append({"budget": budget, "prompt": prompt, **{k: body.get(k) for k in
                                      ("candidate", "cost", "lambda", "predicted_quality", "fallback")},
                                      "image_bytes": len(body.get("image") or "") * 3 // 4})
            pool_status = client.get("/v1/pool").json()
    names = list(decisions[0]["predicted_quality"] or {}) if decisions else []
    table = Table(title=f"routed requests (POST /v1/generate); q̂ = predicted {metric_name(model_dir)}")
    for col in ("budget", "λ", "prompt", "chosen", "cost", *[f"q̂ {n}" for n in names], "PNG bytes"):
        if col == "prompt":
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=40)
        else:
            table.add_column(col, no_wrap=True, justify="left" if col == "chosen" else "right")
    for d in decisions:
        q = d["predicted_quality"] or {}
        table.add_row(f"{d['budget']:.3g}", f"{d['lambda']:.3g}", d["prompt"], d["candidate"], f"{d['cost']:.3g}",
                      *[f"{q.get(n, float('nan')):.3f}" for n in names], str(d["image_bytes"]))
    console.print(table)
    console.print("why: each prompt goes to argmax_m q̂_m(x) − λ·c_m; λ is the smallest value whose average cost on "
                  "held-out prompts meets the budget, so the tighter budget pushes prompts to cheaper candidates.")
    replicas = {c["name"]: c.get("replicas") for c in pool_status.get("candidates", [])}
    console.print(f"GET /v1/pool replicas: {replicas}")
    with _stage(console, "shut down Serve and Ray", timings):
        serve.shutdown()
    return decisions


def metric_name(model_dir: Path) -> str:
    import json

    return json.loads((Path(model_dir) / "router.json").read_text()).get("metric", "quality")


def _wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise CatimageError(f"the Serve app did not become healthy at {url} within {timeout_s:.0f} s")


def _print_final(console, out, table_path, model_dir, paths, report, decisions, seconds) -> None:
    summary = report["summary"]
    console.rule("[bold]summary")
    tab = Table(show_header=False)
    tab.add_column("what")
    tab.add_column("value", overflow="fold")
    tab.add_row("quality table", str(table_path))
    tab.add_row("model directory", str(model_dir))
    for key, path in paths.items():
        tab.add_row(key, str(path))
    tab.add_row("best fixed candidate", str(summary.get("best_fixed")))
    tab.add_row("router quality at its cost", _fmt(summary.get("quality_at_best_fixed_cost")))
    tab.add_row("area over the mixture hull", _fmt(summary.get("area_over_hull")))
    trials = summary.get("trials") or {}
    if trials.get("n", 0) > 1:
        per = report.get("per_trial", [])
        above = sum(1 for t in per if (t.get("area_over_hull") or 0) > 0)
        tab.add_row(f"splits above the hull ({trials['n']} re-drawn)", f"{above}/{len(per)}")
        tab.add_row(f"cost ratio to match the best (mean; {trials.get('misses', 0)} split(s) never match, counted as 1)",
                    _fmt(trials.get("mean_cost_ratio_or_miss")))
    fresh = (report.get("fresh_prompts") or {}).get("summary")
    if fresh:
        tab.add_row("fresh prompts: area over the hull", _fmt(fresh.get("area_over_hull")))
        tab.add_row("fresh prompts: cost ratio to match the best", _fmt(fresh.get("cost_ratio_or_miss")))
    by_budget: dict[float, list[str]] = {}
    for d in decisions:
        by_budget.setdefault(d["budget"], []).append(d["candidate"])
    for budget, chosen in by_budget.items():
        tab.add_row(f"chosen at budget {budget:.3g}", ", ".join(chosen))
    tab.add_row("total seconds", f"{seconds:.0f}")
    console.print(tab)
    for note in report.get("meta", {}).get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        run_demo(args.out, port=args.port)
    except CatimageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
