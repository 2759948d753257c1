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
from typing import Annotated, Any

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
    knn = "knn"
    transformer = "transformer"
    linear = "linear"


class EmbedderOpt(str, Enum):
    minilm = "minilm"
    clip = "clip"
    tfidf = "tfidf"


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
    from catimage.table import load_pool_matrix

    return load_pool_matrix(table_path, pool_path, fmt.value, metric)


def _run(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except CatimageError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None


@app.command()
def evaluate(
    table: Annotated[Path, typer.Argument(help="Quality table: Parquet/CSV, genai_image.json or AGIQA-3K data.csv")],
    pool: Annotated[Path, typer.Option("--pool", help="Pool YAML with the candidates' costs")],
    out: Annotated[Path, typer.Option("--out", help="Directory for report.json, report.md, deferral.png")],
    fmt: Annotated[TableFormatOpt, typer.Option("--format")] = TableFormatOpt.auto,
    metric: Annotated[str | None, typer.Option(help="Quality column (default: the only one)")] = None,
    estimator: Annotated[list[EstimatorOpt], typer.Option(help="Repeat to compare estimators")] = [EstimatorOpt.knn],  # noqa: B006
    embedder: Annotated[EmbedderOpt, typer.Option()] = EmbedderOpt.minilm,
    estimator_params: Annotated[str | None, typer.Option(help="JSON object of estimator params")] = None,
    test_frac: Annotated[float, typer.Option()] = 0.1,
    val_frac: Annotated[float, typer.Option()] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    trials: Annotated[int, typer.Option(min=1, help="Re-drawn splits for win rate / mean / std")] = 5,
    embed_cache: Annotated[bool, typer.Option(help="Reuse prompt embeddings from $CATIMAGE_CACHE/embeddings")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fit on the train split, evaluate on the test split: deferral curves, fixed points, oracle, hull."""
    _setup_logging(verbose)
    _offline_defaults()
    _run(_evaluate, table, pool, out, fmt, metric, estimator, embedder, estimator_params, test_frac, val_frac, seed,
         trials, embed_cache)


def _evaluate(table, pool_path, out, fmt, metric, estimators, embedder, estimator_params, test_frac, val_frac, seed,
              trials, embed_cache):
    from catimage.embed import CachedEmbedder, make_embedder
    from catimage.evaluation import evaluate_table
    from catimage.report import plot_deferral, write_report

    pool, matrix, costs = _load_matrix(table, pool_path, fmt, metric)
    params = _parse_params(estimator_params, "--estimator-params")
    reports = {}
    for est in estimators:
        with console.status(f"[bold]{est.value}[/] + {embedder.value}: {trials} trial(s) on {matrix.n_prompts} prompts"):
            report = evaluate_table(
                matrix, costs, est.value, params,
                CachedEmbedder(make_embedder(embedder.value)) if embed_cache else make_embedder(embedder.value),
                test_frac=test_frac, val_frac=val_frac, seed=seed, trials=trials,
                cost_unit=pool.cost_unit, notes=pool.report_notes(),
            )
        reports[est.value] = report
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(reports.values()))
    if len(reports) > 1:
        first = dict(first)
        first["routers"] = {k: {"router": r["router"], "summary": r["summary"]} for k, r in reports.items()}
    paths = write_report(first, out)
    if len(reports) > 1:
        plot_deferral(reports, out / "deferral.png")
    _print_summary(reports, pool.cost_unit)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _print_summary(reports: dict[str, dict], cost_unit: str) -> None:
    for name, report in reports.items():
        summary = report["summary"]
        tab = Table(title=f"router: {name} (costs in {cost_unit})")
        tab.add_column("figure")
        tab.add_column("value", justify="right")
        for key in ("best_fixed", "quality_at_best_fixed_cost", "cost_ratio_to_match_best_fixed", "area_over_hull", "oracle_gain_fraction"):
            tab.add_row(key, _fmt(summary.get(key)))
        trials = summary.get("trials", {})
        for key, value in trials.items():
            tab.add_row(f"trials.{key}", _fmt(value))
        console.print(tab)
    for note in next(iter(reports.values())).get("meta", {}).get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


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
    estimator: Annotated[EstimatorOpt, typer.Option()] = EstimatorOpt.knn,
    embedder: Annotated[EmbedderOpt, typer.Option()] = EmbedderOpt.minilm,
    estimator_params: Annotated[str | None, typer.Option(help="JSON object of estimator params")] = None,
    val_frac: Annotated[float, typer.Option(help="Held out for early stopping and lambda calibration")] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fit a router in-process on the whole table (minus a calibration split); write a model directory."""
    _setup_logging(verbose)
    _offline_defaults()

    def _fit() -> None:
        from catimage.router_model import RouterModel

        pool_obj, matrix, costs = _load_matrix(table, pool, fmt, metric)
        with console.status(f"fitting {estimator.value} on {matrix.n_prompts} prompts"):
            model = RouterModel.fit(
                matrix, costs, pool_obj.cost_unit, embedder.value, {}, estimator.value,
                _parse_params(estimator_params, "--estimator-params"), val_frac=val_frac, seed=seed,
                notes=pool_obj.report_notes(),
            )
        model.save(out)
        console.print(f"wrote model to {out} ({len(model.candidates)} candidates, metric {model.metric})")

    _run(_fit)


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
        from catimage.router_model import RouterModel

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


@app.command()
def cost(
    pool: Annotated[Path, typer.Argument(help="Pool YAML whose diffusers candidates to count")],
    out: Annotated[Path | None, typer.Option(help="Write the pool with counted costs here (default: print only)")] = None,
    unit: Annotated[str, typer.Option(help="tflops or gflops (meta-device FLOP count) or seconds (measured here)")] = "tflops",
    images: Annotated[int, typer.Option(help="Images per candidate when measuring seconds")] = 2,
) -> None:
    """Count TFLOPs per image (torch FLOP counter on the meta device) or measure seconds per image."""
    _offline_defaults()

    def _cost() -> None:
        from catimage.cost import count_pool_costs
        from catimage.pool import load_pool

        pool_obj = load_pool(pool)
        costs = count_pool_costs(pool_obj, unit=unit, n_images=images)
        tab = Table(title=f"cost per image ({unit})")
        tab.add_column("candidate")
        tab.add_column(unit, justify="right")
        for name in pool_obj.names:
            tab.add_row(name, f"{costs[name]:.4g}" if name in costs else "(declared: not counted)")
        console.print(tab)
        if out is not None:
            pool_obj.with_costs(costs).model_copy(update={"cost_unit": unit}).save(out)
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
) -> None:
    """Build the quality table on Ray Data: prompts x candidates x seeds -> images -> metrics -> Parquet.

    Re-running with the same --out resumes: rows already written are skipped, none is written twice.
    """
    _offline_defaults()

    def _build() -> None:
        from pydantic import ValidationError

        from jobs.build_dataset import print_summary, run_build

        from catimage.build import BuildConfig

        try:
            config = BuildConfig(
                pool=pool, prompts=prompts, output=out, seeds=seeds, limit=limit, candidates=candidates or None,
                save_images=save_images, measure_cost=measure_cost, num_cpus=num_cpus,
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
    """Fit the estimator as a Ray Train job (Transformer) or in-process (knn, linear)."""
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
    estimator: Annotated[EstimatorOpt, typer.Option()] = EstimatorOpt.transformer,
    embedder: Annotated[EmbedderOpt, typer.Option()] = EmbedderOpt.minilm,
    port: Annotated[int | None, typer.Option(help="HTTP port of the Serve app (default: a free one)")] = None,
    num_cpus: Annotated[int, typer.Option(min=1, help="CPUs of the local Ray")] = 2,
) -> None:
    """The whole loop on one machine: build (Ray Data), train (Ray Train), evaluate, serve (Ray Serve)."""
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
