"""The main job on the embedded default: the whole catimage loop on one machine, nothing downloaded.

local Ray -> the scene-world pool (two trained generators at several step counts and guidance
scales, shipped in the package) -> Ray Data build job on fresh held-out prompts (images kept) -> fit
of the router (twoway-ridge in-process by default; `--estimator transformer` fits on Ray Train)
on the shipped world table (1,000+ prompts x every candidate x 4 seeds, scores only) ->
evaluation of route AND cascade over re-drawn splits (the cascade decides on the world's learned
decider `scene_decider` when the table has it, and is judged by scene_score) + the fitted router on
the fresh prompts it never saw -> report.{json,md,html} + deferral.png -> Ray Serve app -> requests at
two budgets (each policy the app offers) -> clean shutdown.

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
from concurrent.futures import Future, ThreadPoolExecutor
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
    except Exception as err:
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


@dataclass
class DemoConfig:
    """Every choice of one demo run, resolved (paths of the embedded world filled in)."""

    out: Path
    pool_path: Path
    prompts_path: Path
    table_path: Path | None  # None: fit and evaluate on this run's build
    seeds: int
    metric: str | None
    estimator: str
    embedder: str
    port: int
    num_cpus: int
    max_epochs: int
    trials: int
    decision_metric: str | None  # None: the learned decider when the table has it, else the judge (upper bound)


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
    decision_metric: str | None = None,
) -> DemoResult:
    """Run every stage; raise `CatimageError` with a next step on anything the user can fix.

    The router is fitted and evaluated on `table_path`: by default the shipped world table when the
    pool is the embedded world pool, else the table this run builds.
    """
    from catimage.tables.pool import load_pool

    world = pool_path is None
    pool_path = Path(pool_path) if pool_path else embedded(WORLD_POOL)
    pool = load_pool(pool_path)
    port = free_port() if port is None else port
    check_port_free(port)
    config = DemoConfig(
        out=Path(out), pool_path=pool_path, prompts_path=Path(prompts_path) if prompts_path else embedded(WORLD_PROMPTS),
        table_path=Path(table_path) if table_path else (embedded(WORLD_TABLE) if world else None), seeds=seeds,
        metric=metric or (pool.metrics[0].name if pool.metrics else None), estimator=estimator, embedder=embedder,
        port=port, num_cpus=num_cpus, max_epochs=max_epochs, trials=trials, decision_metric=decision_metric,
    )
    return _run_stages(config, pool, console or Console())


def _run_stages(config: DemoConfig, pool: Any, console: Console) -> DemoResult:
    from catimage.tables.build import BuildConfig
    from jobs.build_dataset import print_summary, run_build
    from jobs.train_estimator import run_train

    timings: dict[str, float] = {}
    model_dir = config.out / "model"
    console.rule("[bold]catimage demo")
    console.print(f"pool [bold]{config.pool_path}[/] ({', '.join(pool.names)}), fresh prompts [bold]{config.prompts_path}[/], "
                  f"S={config.seeds}, metric {config.metric}, estimator {config.estimator} + {config.embedder}")
    with local_ray(config.num_cpus):
        with _stage(console, "1/5 build a quality table of fresh prompts (Ray Data)", timings):
            build = run_build(BuildConfig(pool=config.pool_path, prompts=config.prompts_path, output=config.out / "table",
                                          seeds=config.seeds, save_images="png"), progress=False)
        print_summary(build, console)
        if build.table_path is None:
            raise CatimageError(f"the build wrote no rows; see the errors table {build.errors_path}")
        fit_table = config.table_path or build.table_path
        where = "Ray Train" if config.estimator == "transformer" else "in-process"
        with _stage(console, f"2/5 fit the router ({config.estimator}, {where}) and its cascade on {fit_table.name}",
                    timings):
            run_train(fit_table, config.pool_path, model_dir, estimator=config.estimator, embedder=config.embedder,
                      metric=config.metric, num_workers=1, max_epochs=config.max_epochs)
            cascade_dir = fit_cascade_bundle(fit_table, config.pool_path, model_dir, config.out / "cascade",
                                             config.metric, config.decision_metric)
        serving_dir = cascade_dir if "cascade" in served_policies() else model_dir
        deployed = _start_serve(serving_dir, config.pool_path, config.port)
        with _stage(console, f"3/5 evaluate route and cascade ({config.trials} re-drawn splits; the router on the fresh "
                             "prompts), the Serve app starting beside it", timings):
            ev = _evaluate(fit_table, build.table_path, config.pool_path, model_dir, config.out, config.metric,
                           config.estimator, config.embedder, config.max_epochs, config.trials, config.decision_metric)
        decisions = _serve_and_ask(console, timings, deployed, serving_dir, config.port, _budgets(ev.report))
    _print_final(console, build.table_path, model_dir, ev, decisions, sum(timings.values()))
    return DemoResult(config.out, build.table_path, model_dir, ev.paths, decisions, timings)


def fit_cascade_bundle(fit_table: Path, pool_path: Path, router_dir: Path, out: Path, metric: str | None,
                       decision_metric: str | None) -> Path:
    """The cascade bundle the Serve app runs: the router just fitted, plus the per-draw model and plans
    fitted on the same table (fit_cascade_around). Serving it offers both policies."""
    from catimage.model.cascade_model import fit_cascade_around
    from catimage.tables.draws import cascade_inputs
    from catimage.tables.table import load_pool_matrix, read_quality_table

    pool, matrix, costs = load_pool_matrix(fit_table, pool_path, metric=metric)
    inputs = cascade_inputs(read_quality_table(fit_table), pool, matrix.candidates, matrix.metric, decision_metric)
    fit_cascade_around(router_dir, matrix, costs, inputs).save(out)
    return out


def _budgets(report: dict[str, Any]) -> tuple[float, float]:
    """A tight and a loose budget: 1/8 and 1/2 of always using the best fixed candidate (at least the
    cheapest candidate's cost), so the demo shows the choice move with the budget."""
    summary = report["summary"]
    cheapest = min(p["cost"] for p in report["fixed"])
    best = float(summary["best_fixed_cost"])
    return max(best / 8, cheapest), max(best / 2, cheapest)


@dataclass
class Evaluation:
    """What stage 3 hands on: the report, its files, and the notes printed at the end."""

    report: dict[str, Any]
    paths: dict[str, Path]


def _evaluate(fit_table: Path, fresh_table: Path, pool_path: Path, model_dir: Path, report_dir: Path,
              metric: str | None, estimator: str, embedder: str, max_epochs: int, trials: int,
              decision_metric: str | None = None) -> Evaluation:
    """Route and cascade on re-drawn splits of the fit table, then the fitted router on the fresh build
    (which it never saw); the report's files, its gallery and the cascade's plans at work."""
    from catimage.evaluation.report import write_report
    from catimage.evaluation.trials import EvaluateOptions, evaluate_table
    from catimage.features.registry import make_embedder
    from catimage.model.router_model import RouterModel
    from catimage.tables.draws import cascade_inputs
    from catimage.tables.table import load_pool_matrix, read_quality_table

    pool, matrix, costs = load_pool_matrix(fit_table, pool_path, metric=metric)
    cascade = cascade_inputs(read_quality_table(fit_table), pool, matrix.candidates, matrix.metric, decision_metric)
    params = {"max_epochs": max_epochs} if estimator == "transformer" else {}
    report = evaluate_table(matrix, costs, EvaluateOptions(
        estimator=estimator, estimator_params=params, embedder=make_embedder(embedder), test_frac=0.2,
        calibration_frac=0.1, seed=0, trials=trials, cost_unit=pool.cost_unit,
        notes=(*pool.report_notes(), *cascade.notes), policy="both", score_cost=cascade.score_cost,
    ), draws=cascade.draws)
    router = RouterModel.load(model_dir)
    if fresh_table != fit_table:
        _fresh_prompts(report, router, fresh_table, pool_path, metric, costs, fit_table.name)
    gallery = _gallery(report, router, fresh_table, fit_table, metric)
    traces = _trace_images(report, pool)
    return Evaluation(report, write_report(report, report_dir, gallery=gallery, traces=traces))


def _fresh_prompts(report: dict[str, Any], router: Any, fresh_table: Path, pool_path: Path, metric: str | None,
                   costs: np.ndarray, fit_name: str) -> None:
    """The fitted router on the prompts this run built (none of which it saw), into report['fresh_prompts']."""
    from catimage.evaluation.figures import evaluate_predictions
    from catimage.evaluation.jsonable import to_jsonable
    from catimage.tables.table import load_pool_matrix

    _, fresh, _ = load_pool_matrix(fresh_table, pool_path, metric=metric)
    keep = np.isfinite(fresh.mean).all(axis=1)
    result = evaluate_predictions(router.predict([fresh.prompts[i] for i in np.flatnonzero(keep)]),
                                  fresh.mean[keep], costs, fresh.candidates)
    report["fresh_prompts"] = to_jsonable({"n_prompts": int(keep.sum()), "summary": result.summary})
    report["meta"]["notes"].append(
        f"'fresh_prompts': the router fitted on {fit_name} routing {int(keep.sum())} prompts built by this run, none "
        "of which it saw; the gallery shows them."
    )


def _gallery(report: dict[str, Any], router: Any, fresh_table: Path, fit_table: Path, metric: str | None) -> Any:
    from catimage.evaluation.gallery import gallery_from_router
    from catimage.tables.table import read_quality_table

    return gallery_from_router(
        read_quality_table(fresh_table), router, {f"budget {b:.3g}": b for b in _budgets(report)}, metric=metric,
        note="Prompts built by this run; the router never saw them." if fresh_table != fit_table else
        "Prompts of the fitted table (the router was trained on most of them).",
    )


def _trace_images(report: dict[str, Any], pool: Any) -> dict[str, list[Any]] | None:
    """The cascade's traced attempts drawn again: each candidate's shipped generator at the build's seed
    (generation_seed(prompt_id, seed)); the world generators are deterministic per seed, so these are
    the images the table scored, and each is scored again by the judge to say so (a note in the report).
    None (no images) for a pool whose candidates are not world generators."""
    import io

    from catimage.evaluation.gallery import plan_traces
    from catimage.generators import make_generator
    from catimage.generators.base import generation_seed
    from catimage.metrics import make_scorer

    traces = plan_traces(report, "cascade")
    wanted = sorted({(t.prompt_id, t.prompt, a.candidate, a.seed) for t in traces for a in t.attempts if t.prompt_id})
    if not wanted or not all(str(getattr(pool.get(c).generator, "model", "")).startswith("world:") for _, _, c, _ in wanted):
        return None
    images: dict[tuple, bytes] = {}
    judge = report["meta"]["metric"]
    scorer, agree = make_scorer(judge, device="cpu"), 0
    table_judge = {(t.prompt_id, a.candidate, a.seed): a.judge for t in traces for a in t.attempts}
    for cand in sorted({c for _, _, c, _ in wanted}):
        items = [w for w in wanted if w[2] == cand]
        drawn = make_generator(pool.get(cand).generator, device="cpu").generate(
            [p for _, p, _, _ in items], [generation_seed(pid, s) for pid, _, _, s in items])
        scores = scorer.score([p for _, p, _, _ in items], drawn)
        for (pid, prompt, _, seed), img, score in zip(items, drawn, scores):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            images[(pid, prompt, cand, seed)] = buf.getvalue()
            expected = table_judge[(pid, cand, seed)]
            agree += expected is not None and abs(float(score) - expected) < 1e-6
    report["meta"]["notes"].append(
        f"Plans at work: the {len(wanted)} traced images were drawn again from the shipped generators at the build's "
        f"seeds; {agree} of {len(wanted)} score exactly as in the table ({judge}).")
    return {"cascade": plan_traces(report, "cascade", images=lambda pid, prompt, cand, seed:
                                   images.get((pid, prompt, cand, seed)))}


def served_policies() -> tuple[str | None, ...]:
    """The policies the demo asks the Serve app for: route and cascade once a request carries a
    `policy` field (serve.schemas.GenerateRequest), else (None,): requests without one, routed."""
    from serve.schemas import GenerateRequest

    return ("route", "cascade") if "policy" in GenerateRequest.model_fields else (None,)


def request_body(prompt: str, budget: float, policy: str | None) -> dict[str, Any]:
    """One POST /v1/generate body; `policy` only when the app takes one."""
    body: dict[str, Any] = {"prompt": prompt, "budget": budget, "seed": 0, "return": "png_base64"}
    if policy is not None:
        body["policy"] = policy
    return body


def _ask(client: Any, budgets: tuple[float, float], policies: tuple[str | None, ...]) -> list[dict[str, Any]]:
    decisions = []
    for policy in policies:
        for budget in budgets:
            for prompt in DEMO_REQUESTS:
                resp = client.post("/v1/generate", json=request_body(prompt, budget, policy))
                if resp.status_code != 200:
                    raise CatimageError(f"the Serve app answered {resp.status_code}: {resp.text}")
                body = resp.json()
                decisions.append({"policy": policy or "route", "budget": budget, "prompt": prompt,
                                  **{k: body.get(k) for k in ("candidate", "cost", "lambda", "predicted_quality", "fallback")},
                                  "attempts": len(body.get("attempts") or []) or 1,
                                  "image_bytes": len(body.get("image") or "") * 3 // 4})
    return decisions


def _start_serve(serving_dir: Path, pool_path: Path, port: int) -> Future:
    """Deploy the Serve app in a background thread and return at once: each replica spends seconds
    importing torch and diffusers and loading its model, which runs beside stage 3 (the driver's own
    evaluation) instead of after it. The app's arguments are checked here, before anything starts."""
    from ray import serve

    from serve.app import build_app
    from serve.schemas import AppArgs

    app = build_app(AppArgs(model_dir=str(serving_dir), pool=str(pool_path)))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    executor = ThreadPoolExecutor(1, thread_name_prefix="serve-run")
    deployed = executor.submit(serve.run, app, name="catimage", route_prefix="/")
    executor.shutdown(wait=False)  # the thread ends with serve.run (or with Ray, if the demo stops first)
    return deployed


def _serve_and_ask(console, timings, deployed: Future, serving_dir: Path, port: int, budgets) -> list[dict[str, Any]]:
    import httpx
    from ray import serve

    policies = served_policies()
    with _stage(console, f"4/5 the Serve app ready on 127.0.0.1:{port} (the rest of its start-up)", timings):
        deployed.result()
        _wait_healthy(f"http://127.0.0.1:{port}/healthz")
    with (_stage(console, f"5/5 requests at two budgets ({', '.join(p or 'routed' for p in policies)})", timings),
          httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client):
        decisions = _ask(client, budgets, policies)
        pool_status = client.get("/v1/pool").json()
    _print_decisions(console, decisions, metric_name(serving_dir))
    replicas = {c["name"]: c.get("replicas") for c in pool_status.get("candidates", [])}
    console.print(f"GET /v1/pool replicas: {replicas}")
    with _stage(console, "shut down Serve and Ray", timings):
        serve.shutdown()
    return decisions


def _print_decisions(console: Console, decisions: list[dict[str, Any]], metric: str) -> None:
    names = list(decisions[0]["predicted_quality"] or {}) if decisions else []
    several = len({d["policy"] for d in decisions}) > 1
    table = Table(title=f"requests (POST /v1/generate); q̂ = predicted {metric}")
    cols = (*(("policy", "attempts") if several else ()), "budget", "λ", "prompt", "chosen", "cost",
            *[f"q̂ {n}" for n in names], "PNG bytes")
    for col in cols:
        if col == "prompt":
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=40)
        else:
            table.add_column(col, no_wrap=True, justify="left" if col in ("chosen", "policy") else "right")
    for d in decisions:
        q = d["predicted_quality"] or {}
        lam = f"{d['lambda']:.3g}" if isinstance(d.get("lambda"), (int, float)) else "n/a"
        table.add_row(*((d["policy"], str(d["attempts"])) if several else ()), f"{d['budget']:.3g}", lam, d["prompt"],
                      str(d["candidate"]), f"{d['cost']:.3g}", *[f"{q.get(n, float('nan')):.3f}" for n in names],
                      str(d["image_bytes"]))
    console.print(table)
    console.print("why: each prompt goes to argmax_m q̂_m(x) − λ·c_m; λ is the smallest value whose average cost on "
                  "held-out prompts meets the budget, so the tighter budget pushes prompts to cheaper candidates.")


def metric_name(model_dir: Path) -> str:
    import json

    router_dir = Path(model_dir) / "router" if (Path(model_dir) / "cascade.json").is_file() else Path(model_dir)
    return json.loads((router_dir / "router.json").read_text()).get("metric", "quality")


def _wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise CatimageError(f"the Serve app did not become healthy at {url} within {timeout_s:.0f} s")


def policy_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per policy: what decides, what judges, the cost ratio to match the best fixed candidate
    in each re-drawn split (a miss marked), their mean and the splits above the mixture hull."""
    from catimage.evaluation.figures import policy_views

    rows = []
    for view in policy_views(report):
        per = view.per_trial
        ratios = ", ".join(f"{t['cost_ratio_or_miss']:.2f}" + (" (miss)" if t.get("missed_best_fixed") else "")
                           for t in per)
        mean = (view.summary.get("trials") or {}).get("mean_cost_ratio_or_miss")
        above = sum(1 for t in per if (t.get("area_over_hull") or 0) > 0)
        rows.append([view.name, view.decision_metric, view.judge_metric + (" (UPPER BOUND)" if view.upper_bound else ""),
                     ratios, _fmt(mean), f"{above}/{len(per)}"])
    return rows


def _print_final(console: Console, table_path: Path, model_dir: Path, ev: Evaluation, decisions: list[dict[str, Any]],
                 seconds: float) -> None:
    from catimage.evaluation.figures import describe_miss_rule

    report, summary = ev.report, ev.report["summary"]
    console.rule("[bold]summary")
    files = Table(show_header=False)
    files.add_column("what")
    files.add_column("value", overflow="fold")
    for key, path in (("quality table", table_path), ("model directory", model_dir), *ev.paths.items()):
        files.add_row(key, str(path))
    console.print(files)
    best = summary.get("best_fixed")
    trials = summary.get("trials") or {}
    side = Table(title=f"route and cascade on {trials.get('n', '?')} re-drawn splits of the world table; cost ratio to "
                       f"match {best} ({describe_miss_rule(trials.get('miss_ratio'))})")
    for col in ("policy", "decides on", "judged by", "cost ratio in each split", "mean", "splits above hull"):
        side.add_column(col, overflow="fold")
    for row in policy_rows(report):
        side.add_row(*row)
    console.print(side)
    fresh = (report.get("fresh_prompts") or {}).get("summary")
    if fresh:
        console.print(f"fresh prompts (the router never saw them): area over the hull {_fmt(fresh.get('area_over_hull'))}, "
                      f"cost ratio to match {fresh.get('best_fixed')} {_fmt(fresh.get('cost_ratio_or_miss'))}"
                      + (" (a miss)" if fresh.get("missed_best_fixed") else ""))
    for (policy, budget), chosen in _chosen(decisions).items():
        console.print(f"{policy} at budget {budget:.3g}: {', '.join(chosen)}")
    console.print(f"total seconds {seconds:.0f}")
    for note in report.get("meta", {}).get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _chosen(decisions: list[dict[str, Any]]) -> dict[tuple[str, float], list[str]]:
    out: dict[tuple[str, float], list[str]] = {}
    for d in decisions:
        out.setdefault((d["policy"], d["budget"]), []).append(str(d["candidate"]))
    return out


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
