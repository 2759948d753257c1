"""The `catimage` command line (Typer + rich).

Heavy imports (torch, diffusers, Ray) happen inside each command so that `catimage --help` and a bad
flag answer in well under a second. Every user error (`CatimageError`) is printed as one clear line
with exit code 2, never as a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Self

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from catimage.errors import CatimageError

app = typer.Typer(
    name="catimage",
    help="Route each text-to-image prompt to the cheapest generator that still draws it well.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:  # logs and CI: rich's 80-column default would squeeze the tables unreadable
    console = Console(width=140)
err_console = Console(stderr=True)


class TableFormatOpt(str, Enum):
    auto = "auto"
    table = "table"
    genai_bench = "genai-bench"
    agiqa_3k = "agiqa-3k"


class EstimatorOpt(str, Enum):
    auto = "auto"
    knn = "knn"
    transformer = "transformer"
    linear = "linear"
    twoway_knn = "twoway-knn"
    twoway_ridge = "twoway-ridge"
    ensemble = "ensemble"


class PolicyOpt(str, Enum):
    route = "route"
    cascade = "cascade"
    both = "both"


class EmbedderOpt(str, Enum):
    minilm = "minilm"
    clip = "clip"
    tfidf = "tfidf"
    combined = "combined"


def _make_embedder(name: str, cache: bool) -> Any:
    """The embedder, behind the on-disk embedding cache when asked. The combined embedder caches
    its text part itself (its TF-IDF part is refitted per split and must not be cached)."""
    from catimage.features.cache import CachedEmbedder
    from catimage.features.registry import make_embedder

    if name == "combined":
        return make_embedder("combined", cache=cache)
    return CachedEmbedder(make_embedder(name)) if cache else make_embedder(name)


class _StatusHandler(logging.Handler):
    """Shows library progress logs (fold / epoch / trial) on the live status line."""

    def __init__(self, status: Any, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.status, self.prefix = status, prefix

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            err_console.print(f"[yellow]{record.levelname.lower()}:[/] {record.getMessage()}")
        else:
            self.status.update(f"{self.prefix}: {record.getMessage()[:110]}")


class _progress:
    """Context: a rich status line fed by `catimage` INFO logs and by explicit progress lines."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __enter__(self) -> Self:
        self.status = console.status(f"[bold]{self.prefix}[/]")
        self.status.__enter__()
        self.handler = _StatusHandler(self.status, self.prefix)
        self.logger = logging.getLogger("catimage")
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self.handler)
        if self.logger.getEffectiveLevel() > logging.INFO:  # not --verbose: INFO feeds only the status line
            self.logger.setLevel(logging.INFO)
            self.logger.propagate = False
        return self

    def line(self, text: str) -> None:
        if " done in " in text:
            console.print(f"[dim]{self.prefix}:[/] {text}")
        self.status.update(f"{self.prefix}: {text}")

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        self.status.__exit__(*exc)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )


def _offline_defaults() -> None:
    """No hub is reachable in our deployments' build sandboxes; fail fast instead of retrying ~30 s."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parse_params(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CatimageError(f"{flag} must be a JSON object, e.g. '{{\"k\": 20}}': {err}") from None
    if not isinstance(value, dict):
        raise CatimageError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def _load_matrix(table_path: Path, pool_path: Path, fmt: TableFormatOpt, metric: str | None):
    from catimage.tables.table import load_pool_matrix

    return load_pool_matrix(table_path, pool_path, fmt.value, metric)


def _run(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except CatimageError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None


@app.command()
def evaluate(
    table: Annotated[Path | None, typer.Argument(help="Quality table: Parquet/CSV, genai_image.json or AGIQA-3K data.csv")] = None,
    pool: Annotated[Path | None, typer.Option("--pool", help="Pool YAML with the candidates' costs")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for report.json, report.md, deferral.png")] = None,
    fmt: Annotated[TableFormatOpt, typer.Option("--format")] = TableFormatOpt.auto,
    metric: Annotated[str | None, typer.Option(help="Quality column (default: the only one)")] = None,
    estimator: Annotated[
        list[EstimatorOpt],
        typer.Option(help="Repeat to compare estimators; auto = chosen by inner cross-validation on the routing objective"),
    ] = [EstimatorOpt.auto],  # noqa: B006
    embedder: Annotated[EmbedderOpt, typer.Option()] = EmbedderOpt.minilm,
    estimator_params: Annotated[str | None, typer.Option(help="JSON object of estimator params")] = None,
    test_frac: Annotated[float, typer.Option()] = 0.1,
    calibration_frac: Annotated[float, typer.Option()] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    trials: Annotated[int, typer.Option(min=1, help="Re-drawn splits for win rate / mean / std")] = 10,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples of the test prompts for intervals")] = 200,
    embed_cache: Annotated[bool, typer.Option(help="Reuse prompt embeddings from $CATIMAGE_CACHE/embeddings")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    logged: Annotated[Path | None, typer.Option("--logged", help="Served-traffic log folder: estimate off-policy what "
                                                "each --model would have earned on it (no TABLE, no --pool)")] = None,
    model: Annotated[list[Path] | None, typer.Option("--model", help="With --logged: a fitted router (repeat)")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="With --logged: decide at this lambda")] = None,
    budget: Annotated[float | None, typer.Option(help="With --logged: decide at each model's lambda for it")] = None,
    policy: Annotated[PolicyOpt, typer.Option(help="route (one blind draw), cascade (score each image, escalate) "
                                              "or both")] = PolicyOpt.route,
    decision_metric: Annotated[str | None, typer.Option(
        help="Cascade: the metric column a plan reads online to accept or escalate (default: the pool's "
             "decision_metric when the table has it, else the judge, --metric: then every cascade figure is an "
             "upper bound)")] = None,
    decision_cost: Annotated[float | None, typer.Option(
        help="Cascade: the decision scorer's cost per image, in the pool's cost unit (default: the pool's "
             "`cost` of that metric when it declares one, else 0, said in the report)")] = None,
    max_attempts: Annotated[int, typer.Option(min=1, max=6, help="Cascade: the most attempts a plan draws")] = 4,
) -> None:
    """Fit on the train split, evaluate on the test split: deferral curves, fixed points, oracle, hull.

    --policy cascade|both also evaluates plans (draw, score with --decision-metric, accept or escalate)
    by simulating them on the test prompts' own seed rows, judged by --metric.

    With --logged LOG --model DIR: off-policy evaluation of fitted routers on served traffic instead."""
    _setup_logging(verbose)
    _offline_defaults()
    if logged is not None:  # off-policy evaluation on served traffic: a separate path (catimage.evaluation.offpolicy)
        _run(_evaluate_logged, logged, model or [], metric, lam, budget, out, bootstrap or 1000, seed)
        return
    if table is None or pool is None or out is None:
        _run(_fail, "evaluate needs TABLE, --pool and --out (or --logged LOG --model MODEL for served traffic)")
    from catimage.evaluation.trials import EvaluateOptions
    from catimage.model.cascade_model import CascadeOptions

    options = EvaluateOptions(
        estimator_params=_run(_parse_params, estimator_params, "--estimator-params"), test_frac=test_frac,
        calibration_frac=calibration_frac, seed=seed, trials=trials, bootstrap=bootstrap, policy=policy.value,
        cascade=CascadeOptions(max_attempts=max_attempts),
    )
    _run(_evaluate, table, pool, out, fmt, metric, estimator, embedder, embed_cache, options, decision_metric, decision_cost)


def _evaluate(table, pool_path, out, fmt, metric, estimators, embedder, embed_cache, options, decision_metric=None,
              decision_cost=None):
    """`catimage evaluate TABLE`: each estimator's route and/or cascade policy over re-drawn splits."""
    from dataclasses import replace

    from catimage.evaluation.report import write_report
    from catimage.evaluation.trials import evaluate_table

    pool, matrix, costs = _load_matrix(table, pool_path, fmt, metric)
    draws, score_cost, notes = _cascade_inputs(table, fmt, pool, matrix, options, decision_metric, decision_cost)
    options = replace(options, cost_unit=pool.cost_unit, notes=(*pool.report_notes(), *notes), score_cost=score_cost)
    reports = {}
    for est in estimators:
        prefix = f"{est.value} + {embedder.value}"
        console.print(f"[bold]{prefix}[/]: {options.trials} trial(s) of {options.policy} on {matrix.n_prompts} prompts x "
                      f"{len(matrix.candidates)} candidates")
        with _progress(prefix) as prog:
            run = replace(options, estimator=est.value, embedder=_make_embedder(embedder.value, embed_cache))
            reports[est.value] = evaluate_table(matrix, costs, run, draws=draws, progress=prog.line)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(reports.values()))
    if len(reports) > 1:
        first = dict(first)
        first["routers"] = {k: {"router": r["router"], "summary": r["summary"]} for k, r in reports.items()}
    paths = write_report(first, out, gallery=_gallery(first, table, fmt), curves=reports if len(reports) > 1 else None)
    _print_summary(reports, pool.cost_unit)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _fail(message: str) -> None:
    raise CatimageError(message)


def _cascade_inputs(table, fmt, pool, matrix, options, decision_metric, decision_cost):
    """(draws, decision scorer cost, report notes) for --policy cascade|both; (None, 0, ()) for route."""
    if options.policy == "route":
        if decision_metric is not None or decision_cost is not None:
            raise CatimageError("--decision-metric / --decision-cost apply to --policy cascade or both")
        return None, 0.0, ()
    from catimage.tables.draws import cascade_inputs
    from catimage.tables.table import read_quality_table

    got = cascade_inputs(read_quality_table(table, fmt.value), pool, matrix.candidates, matrix.metric,
                         decision_metric, decision_cost)
    return got.draws, got.score_cost, got.notes


def _evaluate_logged(log_dir: Path, models: list[Path], metric: str | None, lam: float | None, budget: float | None,
                     out: Path | None, n_boot: int, seed: int) -> None:
    """`catimage evaluate --logged`: IPS / SNIPS / DR estimates of each router beside what serving realised."""
    from catimage.evaluation.offpolicy import evaluate_logged
    from catimage.model.router_model import RouterModel
    from catimage.tables.served_log import read_served_log

    if not models:
        raise CatimageError("--logged needs at least one --model DIR (a fitted router) to evaluate")
    if lam is not None and budget is not None:
        raise CatimageError("give --lambda or --budget, not both")
    report = evaluate_logged(read_served_log(str(log_dir)), {str(m): RouterModel.load(m) for m in models},
                             metric=metric, lam=lam, budget=budget, n_boot=n_boot, seed=seed)
    for name, res in report["policies"].items():
        tab = Table(title=f"{name} on {res['n_requests']} logged requests at lambda {res['lambda']:.4g} (quality = "
                          f"decision metric {res['decision_metric']}; effective sample size "
                          f"{res['effective_sample_size']:.0f}; 95% bootstrap intervals)")
        for col in ("estimate", "quality", "cost", "utility"):
            tab.add_column(col, justify="right")
        rows = {"serving (realised)": res["logging_policy_realised"], **res["estimates"]}
        for label, figs in rows.items():
            tab.add_row(label, *[f"{figs[q]['value']:.4g} [{_fmt(figs[q]['low'])}, {_fmt(figs[q]['high'])}]"
                                 for q in ("quality", "cost", "utility")])
        console.print(tab)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "offpolicy.json").write_text(json.dumps(report, indent=2))
        console.print(f"wrote {out / 'offpolicy.json'}")


def _gallery(report: dict, table: Path, fmt: Any) -> Any:
    """report.html's gallery when the table has images (a build folder): trial 0's test prompts at a
    tight and a loose budget (1/8 and 1/2 of the best fixed candidate's cost, at least the cheapest)."""
    from catimage.evaluation.gallery import gallery_from_report
    from catimage.tables.table import read_quality_table

    raw = read_quality_table(table, fmt.value)
    if "image_path" not in raw.column_names:
        return None
    best, cheapest = report["summary"]["best_fixed_cost"], min(report["meta"]["costs"])
    budgets = {f"budget {b:.3g}": b for b in (max(best / 8, cheapest), max(best / 2, cheapest))}
    return gallery_from_report(report, raw, budgets)


def _print_summary(reports: dict[str, dict], cost_unit: str) -> None:
    for name, report in reports.items():
        for policy, block in (report.get("policies") or {"route": report}).items():
            _print_policy(f"{policy}: {name}", block, cost_unit)
        selection = report.get("meta", {}).get("estimator_selection")
        if selection:
            console.print(f"[bold]selection (trial 0):[/] {selection}")
        noise = report.get("noise", {})
        if noise.get("available"):
            console.print(
                f"[bold]label noise:[/] the oracle's area over the hull is {_fmt(noise['oracle_area_full_means'])} on "
                f"full means but {_fmt(noise['oracle_area_split_half'])} routing on one half of the samples and scoring "
                f"on the other; interaction reliability (split-half, Spearman-Brown) "
                f"{_fmt(noise['interaction_reliability_full_means'])}"
            )
    for note in next(iter(reports.values())).get("meta", {}).get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _print_policy(title: str, block: dict, cost_unit: str) -> None:
    """One policy's Table 1 (mean over trials with intervals), RouteLLM figures and verdict."""
    from catimage.evaluation.confidence import combined_interval

    summary = block["summary"]
    trials = summary.get("trials", {})
    decides = block.get("decision_metric")
    bound = " — UPPER BOUND (the judge decides)" if block.get("upper_bound") else ""
    tab = Table(title=f"{title} (costs in {cost_unit}{'; decides on ' + decides if decides else ''}{bound}); mean over "
                      f"{trials.get('n')} trial(s) [95% interval: the wider of the test-prompt bootstrap and the "
                      "over-trials t interval] (spread: std over trials)")
    tab.add_column("figure")
    tab.add_column("value", justify="right")
    tab.add_row("best fixed candidate", str(summary.get("best_fixed")))
    for key, label in (("area_over_hull", "area over hull"), ("gain_at_best_fixed_cost", "gain at best fixed cost"),
                       ("quality_at_best_fixed_cost", "quality at best fixed cost"),
                       ("cost_ratio_or_miss", "cost ratio to match best (misses counted)"),
                       ("oracle_gain_fraction", "oracle gain fraction")):
        lo, hi = combined_interval(trials, key)
        interval = f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else ""
        tab.add_row(label, f"{_fmt(trials.get(f'mean_{key}'))}{interval} (±{_fmt(trials.get(f'std_{key}'))})")
    for key, label in (("apgr", "APGR (RouteLLM)"), ("cpt_50", "CPT(50%)"), ("cpt_80", "CPT(80%)")):
        tab.add_row(label, _fmt(trials.get(f"mean_{key}")))
    tab.add_row("win rate / misses", f"{_fmt(trials.get('win_rate'))} / {trials.get('misses', 0)}")
    console.print(tab)
    for line in summary.get("verdict", []):
        console.print(f"[bold]verdict:[/] {line}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


@app.command()
def fit(
    table: Annotated[Path, typer.Argument(help="Quality table (as for evaluate)")],
    pool: Annotated[Path, typer.Option("--pool")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write")],
    fmt: Annotated[TableFormatOpt, typer.Option("--format")] = TableFormatOpt.auto,
    metric: Annotated[str | None, typer.Option()] = None,
    estimator: Annotated[EstimatorOpt, typer.Option()] = EstimatorOpt.auto,
    embedder: Annotated[EmbedderOpt, typer.Option()] = EmbedderOpt.minilm,
    estimator_params: Annotated[str | None, typer.Option(help="JSON object of estimator params")] = None,
    calibration_frac: Annotated[float, typer.Option(help="Held out for lambda calibration only")] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    policy: Annotated[PolicyOpt, typer.Option(help="route: a router bundle; cascade: a cascade bundle (router + "
                                              "per-draw model + plans) that Serve runs as route or cascade")] = PolicyOpt.route,
    decision_metric: Annotated[str | None, typer.Option(help="Cascade: the metric a plan reads online (default: "
                                                      "the pool's decision_metric, else the judge: upper bound)")] = None,
    decision_cost: Annotated[float | None, typer.Option(help="Cascade: the scorer's cost per image (default: the "
                                                        "pool's cost of that metric)")] = None,
    max_attempts: Annotated[int, typer.Option(min=1, max=6, help="Cascade: the most attempts a plan draws")] = 4,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fit a router (or a cascade) in-process on the whole table (minus a calibration split); write a model directory."""
    _setup_logging(verbose)
    _offline_defaults()

    def _fit() -> None:
        if policy is PolicyOpt.both:
            _fail("catimage fit writes one bundle: --policy route or cascade (a cascade bundle also routes)")
        pool_obj, matrix, costs = _load_matrix(table, pool, fmt, metric)
        router_args = {"estimator": estimator.value, "estimator_params": _parse_params(estimator_params, "--estimator-params"),
                       "embedder": _make_embedder(embedder.value, True), "notes": pool_obj.report_notes()}
        with _progress(f"fitting {estimator.value} ({policy.value}) on {matrix.n_prompts} prompts"):
            if policy is PolicyOpt.cascade:
                model = _fit_cascade(table, fmt, pool_obj, matrix, costs, decision_metric, decision_cost, max_attempts,
                                     calibration_frac, seed, router_args)
                router = model.router
            else:
                from catimage.model.router_model import RouterModel

                split_args = {"calibration_frac": calibration_frac, "seed": seed}
                model = router = RouterModel.fit(matrix, costs, pool_obj.cost_unit, embedder.value, {}, estimator.value,
                                                 router_args["estimator_params"], notes=router_args["notes"],
                                                 embedder=router_args["embedder"], **split_args)
        model.save(out)
        console.print(f"wrote {policy.value} model to {out} ({len(router.candidates)} candidates, metric {router.metric})")
        if router.selection:
            console.print(f"[bold]selection:[/] {router.selection}")

    _run(_fit)


def _fit_cascade(table, fmt, pool, matrix, costs, decision_metric, decision_cost, max_attempts, calibration_frac,
                 seed, router_args):
    """A cascade bundle on the whole table: the same decision metric and scorer cost as `evaluate` picks."""
    from catimage.model.cascade_model import CascadeModel, CascadeOptions
    from catimage.tables.draws import cascade_inputs
    from catimage.tables.table import read_quality_table

    got = cascade_inputs(read_quality_table(table, fmt.value), pool, matrix.candidates, matrix.metric,
                         decision_metric, decision_cost)
    for note in got.notes:
        console.print(f"[yellow]note:[/] {note}")
    return CascadeModel.fit(matrix, got.draws, costs, pool.cost_unit, score_cost=got.score_cost,
                            options=CascadeOptions(max_attempts=max_attempts), calibration_frac=calibration_frac,
                            seed=seed, **router_args)


@app.command("route")
def route_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from `catimage fit` or `catimage train`")],
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts")],
    budget: Annotated[float | None, typer.Option(help="Average cost budget, in the pool's cost unit")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="Use this lambda instead of a budget")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the chosen candidate, the predicted quality of every candidate, and the cost per prompt."""
    _offline_defaults()

    def _route() -> None:
        from catimage.model.router_model import RouterModel

        if any(not p.strip() for p in prompts):
            raise CatimageError("empty prompt: give non-empty prompt text")
        model = RouterModel.load(model_dir)
        decisions = model.decide(prompts, budget=budget, lam=lam)
        if as_json:
            console.print_json(json.dumps([d.to_dict() for d in decisions]))
            return
        tab = Table(title=f"lambda = {decisions[0].lam:.4g} (cost in {model.cost_unit}, quality in {model.metric})")
        tab.add_column("prompt", overflow="fold")
        tab.add_column("chosen")
        tab.add_column("cost", justify="right")
        for name in model.candidates:
            tab.add_column(f"q̂ {name}", justify="right")
        for d in decisions:
            tab.add_row(d.prompt, d.candidate, f"{d.cost:.4g}", *[f"{d.predicted[c]:.3f}" for c in model.candidates])
        console.print(tab)

    _run(_route)


@app.command("add-candidate")
def add_candidate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from `catimage fit` or `catimage train`")],
    table: Annotated[Path, typer.Option("--table", help="Rows of the new candidate(s) on a few prompts (any table format)")],
    pool: Annotated[Path, typer.Option("--pool", help="Pool YAML declaring the new candidate (its cost)")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write (the router plus the new candidate)")],
    fmt: Annotated[TableFormatOpt, typer.Option("--format")] = TableFormatOpt.auto,
    candidate: Annotated[list[str] | None, typer.Option("--candidate", help="Add only these (repeat); default: every new one")] = None,
) -> None:
    """Add a generator to a fitted router from a few labelled prompts, without retraining.

    The new candidate's quality is modelled as the router's predicted level plus a ridge fit, on
    its labelled prompts, of how it departs from the existing candidates and prompt clusters (see
    catimage/add_candidate.py). Rows of the existing candidates for the same prompts, when present,
    sharpen the fit. 25-100 labelled prompts, spread over the kinds of prompts served, are typical.
    """
    _offline_defaults()

    def _add() -> None:
        from catimage.model.add_candidate import add_from_table
        from catimage.model.router_model import RouterModel
        from catimage.tables.pool import load_pool
        from catimage.tables.table import read_quality_table

        model = RouterModel.load(model_dir)
        added = add_from_table(model, read_quality_table(table, fmt.value), load_pool(pool), names=candidate)
        model.save(out)
        for a in added:
            console.print(f"added [bold]{a.name}[/] (cost {a.cost:.4g} {model.cost_unit}) from {a.n_labels} labelled "
                          f"prompts (ridge penalty {a.alpha:.3g}, chosen by leave-one-out)")
        console.print(f"wrote model to {out} ({len(model.candidates)} candidates: {', '.join(model.candidates)})")

    _run(_add)


@app.command()
def cost(
    pool: Annotated[Path, typer.Argument(help="Pool YAML whose diffusers candidates to count")],
    out: Annotated[Path | None, typer.Option(help="Write the pool with counted costs here (default: print only)")] = None,
    unit: Annotated[str, typer.Option(help="tflops or gflops (meta-device FLOP count) or seconds (measured here)")] = "tflops",
    images: Annotated[int, typer.Option(min=1, help="Images per candidate when measuring seconds")] = 2,
) -> None:
    """Count TFLOPs per image (torch FLOP counter on the meta device) or measure seconds per image.

    With --out, the pool is saved in the counted unit; a pool that would then mix units (a candidate
    that cannot be counted keeps a cost in the old unit) is refused before anything is counted.
    """
    _offline_defaults()

    def _cost() -> None:
        from catimage.tables.cost import count_pool_costs, counted_candidates, write_pool_costs
        from catimage.tables.pool import load_pool

        pool_obj = load_pool(pool)
        if out is None:
            costs = count_pool_costs(pool_obj, unit=unit, n_images=images)
        else:
            saved = write_pool_costs(pool, out, unit=unit, n_images=images)
            costs = {name: float(saved.get(name).cost) for name in counted_candidates(saved)}
        tab = Table(title=f"cost per image ({unit})")
        tab.add_column("candidate")
        tab.add_column(unit, justify="right")
        for name in pool_obj.names:
            tab.add_row(name, f"{costs[name]:.4g}" if name in costs else f"(declared {pool_obj.cost_unit}: not counted)")
        console.print(tab)
        if out is not None:
            console.print(f"wrote {out}")

    _run(_cost)


@app.command()
def build(
    pool: Annotated[Path, typer.Option("--pool", help="Pool YAML (candidates' generator blocks + metrics)")],
    prompts: Annotated[Path, typer.Option("--prompts", help="txt / csv / tsv / parquet / jsonl of prompts")],
    out: Annotated[Path, typer.Option("--out", help="Output directory of the quality table (resumable)")],
    seeds: Annotated[int, typer.Option(min=1, help="Samples S per (prompt, candidate)")] = 2,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts")] = None,
    candidates: Annotated[list[str] | None, typer.Option("--candidate", help="Build only these (repeat)")] = None,
    save_images: Annotated[str, typer.Option(help="none, png or webp (stored under OUT/images)")] = "none",
    measure_cost: Annotated[bool | None, typer.Option(help="Record seconds per image in the `cost` column")] = None,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs for a local Ray (ignored with RAY_ADDRESS)")] = None,
    wait_for_resources: Annotated[bool, typer.Option(
        help="Start even when the cluster lacks the CPUs/GPUs/memory the pool's build blocks ask for (nodes will "
             "join); default: fail at once")] = False,
) -> None:
    """Build the quality table on Ray Data: prompts x candidates x seeds -> images -> metrics -> Parquet.

    Re-running with the same --out resumes: rows already written are skipped, none is written twice.
    A cluster that cannot hold the pool's actor pools is refused before anything starts.
    """
    _offline_defaults()

    def _build() -> None:
        from pydantic import ValidationError

        from catimage.tables.build import BuildConfig
        from jobs.build_dataset import print_summary, run_build

        try:
            config = BuildConfig(
                pool=pool, prompts=prompts, output=out, seeds=seeds, limit=limit, candidates=candidates or None,
                save_images=save_images, measure_cost=measure_cost, num_cpus=num_cpus,
                wait_for_resources=wait_for_resources,
            )
        except ValidationError as err:
            raise CatimageError(f"bad build options: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}") from None
        print_summary(run_build(config), console)

    _run(_build)


@app.command()
def train(
    table: Annotated[Path, typer.Argument(help="Quality table")],
    pool: Annotated[Path, typer.Option("--pool")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write")],
    estimator: Annotated[EstimatorOpt, typer.Option()] = EstimatorOpt.transformer,
    embedder: Annotated[EmbedderOpt, typer.Option()] = EmbedderOpt.minilm,
    metric: Annotated[str | None, typer.Option()] = None,
    num_workers: Annotated[int, typer.Option(help="Ray Train workers")] = 1,
    use_gpu: Annotated[bool, typer.Option()] = False,
    max_epochs: Annotated[int, typer.Option()] = 50,
) -> None:
    """Fit the estimator as a Ray Train job (transformer) or in-process (every other estimator)."""
    _offline_defaults()

    def _train() -> None:
        from jobs.train_estimator import run_train

        run_train(
            table_path=table, pool_path=pool, out_dir=out, estimator=estimator.value, embedder=embedder.value,
            metric=metric, num_workers=num_workers, use_gpu=use_gpu, max_epochs=max_epochs,
        )
        console.print(f"wrote model to {out}")

    _run(_train)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the table, model and report go")] = Path("runs/demo"),
    pool: Annotated[Path | None, typer.Option("--pool", help="Default: the embedded scene-world pool")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Fresh prompts to build; default: the embedded world demo prompts")] = None,
    table: Annotated[Path | None, typer.Option("--table", help="Table to fit and evaluate the router on; default: the shipped world table (world pool) or this run's build")] = None,
    seeds: Annotated[int, typer.Option(min=1)] = 2,
    trials: Annotated[int, typer.Option(min=1, help="Re-drawn splits of the evaluation")] = 5,
    metric: Annotated[str | None, typer.Option(help="Default: the pool's first metric")] = None,
    estimator: Annotated[EstimatorOpt, typer.Option(
        help="twoway-ridge: what `auto` picks on the world table; transformer: fitted on Ray Train")] = EstimatorOpt.twoway_ridge,
    embedder: Annotated[EmbedderOpt, typer.Option()] = EmbedderOpt.minilm,
    port: Annotated[int | None, typer.Option(help="HTTP port of the Serve app (default: a free one)")] = None,
    num_cpus: Annotated[int, typer.Option(min=1, help="CPUs of the local Ray")] = 2,
) -> None:
    """The whole loop on one machine: build (Ray Data), fit (Ray Train for the transformer), evaluate, serve (Ray Serve)."""
    _setup_logging(False)
    _offline_defaults()

    def _demo() -> None:
        from jobs.demo import run_demo

        run_demo(out, pool, prompts, seeds=seeds, metric=metric, estimator=estimator.value,
                 embedder=embedder.value, port=port, num_cpus=num_cpus, console=console, table_path=table,
                 trials=trials)

    _run(_demo)


def main() -> None:  # pragma: no cover - console-script shim
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
