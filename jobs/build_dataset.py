"""Ray Data job: build the quality table (prompt x candidate x seed -> image -> metric scores).

Run it directly, on a cluster, or through the CLI::

    python jobs/build_dataset.py --pool configs/tiny_pool.yaml --prompts prompts.txt --output out/ --seeds 2
    ray job submit --working-dir . -- python jobs/build_dataset.py --pool ... --output /shared/out
    catimage build ...            # calls run_build()

Pipeline (streaming, one Ray Data plan):

    pending work rows (resume: keys already complete are skipped)
      -> per candidate: map_batches(GenerateStage) actor pool   (CPUs, GPUs, memory from the candidate's `build:`)
      -> union
      -> per pool metric: map_batches(ScoreStage) actor pool   (resources from the MetricSpec)
      -> write_parquet(OUTPUT/parts/run-<id>/)                  (a fresh folder per run)
    then, on the driver: consolidate all parts -> OUTPUT/quality.parquet + OUTPUT/errors.parquet

Before anything starts, the pool's demand (every actor pool's CPUs, GPUs and `memory` at once, and
each actor against the largest node) is checked against the cluster: a build that could never be
placed fails at once, saying what is missing, unless an autoscaler can add nodes or
--wait-for-resources says they will join.

On a cluster, OUTPUT (and --image-dir, unless a URI) must be storage that the driver and every
worker see (NFS or similar): the workers write the parts, the driver merges them. `catimage` must
be importable on the workers (installed, or shipped by --working-dir). With no address, a private
local Ray is started (`address="local"`), never one that another `ray start` left running.

Images travel between stages as PNG bytes (never pixel arrays) and are dropped before the write.
A row whose generation or scoring keeps failing is kept with its error and lands in errors.parquet.
The per-row logic lives in `catimage.tables.build` (pure, tested without Ray); this file only wires Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from pydantic import ValidationError
from ray.data import DataContext

from catimage.errors import CatimageError
from catimage.generators.base import Generator
from catimage.metrics.base import Scorer
from catimage.tables.build import (
    BuildConfig,
    BuildResult,
    GenerateStage,
    ScoreStage,
    StageDemand,
    build_demand,
    consolidate,
    describe_demand,
    done_keys,
    expand_work,
    keys_of,
    missing_resources,
    new_run_dir,
    pending,
    read_prompts,
    record_lost,
    split_blocks,
    write_run_manifest,
)
from catimage.tables.pool import MEASURED_COST_UNIT, Pool

log = logging.getLogger("catimage.jobs.build")

GeneratorFactory = Callable[..., Generator]  # (spec, device=...) -> Generator
ScorerFactory = Callable[..., Scorer]  # (spec, device=...) -> Scorer
# CPUs asked for the (fused) write task: small, so that actor pools never starve it (NOTES.md).
WRITE_NUM_CPUS = 0.1
LOST_REASON = "lost: its block failed after Ray's retries (worker crash?); re-run the same command to retry it"


def _device(explicit: str | None, num_gpus: float) -> str:
    """An actor without GPUs must not grab one that happens to be on its node."""
    return explicit or ("cuda" if num_gpus > 0 else "cpu")


def _map_actors(ds: ray.data.Dataset, udf: type, kwargs: dict[str, Any], res: Any, remote_args: dict[str, Any]) -> ray.data.Dataset:
    """One fixed-size actor pool stage over Arrow batches (the callable class loads its model once).

    `res` is a candidate's `build:` block or a metric spec: batch size, pool size (`concurrency`),
    CPUs, GPUs and `memory` (bytes Ray reserves per actor, so a node never gets more than fit).
    """
    if res.memory:
        remote_args = {**remote_args, "memory": int(res.memory)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return ds.map_batches(
            udf,
            fn_constructor_kwargs=kwargs,
            batch_size=res.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=res.concurrency),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus or None,  # always with batch_size, as GPU stages must be
            **remote_args,
        )


def build_plan(
    todo: pa.Table,
    pool: Pool,
    config: BuildConfig,
    measure_cost: bool,
    generator_factory: GeneratorFactory | None = None,
    scorer_factory: ScorerFactory | None = None,
    seed_fn: Callable[[str, int], int] | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Data plan for the pending rows (nothing runs until it is written): one generator
    actor pool per candidate with rows, their union, then one scorer actor pool per metric."""
    # Bounded (Ray Data's default is -1: forever), so a row that kills its worker every time ends as
    # lost rows in the errors table instead of looping. Ray 2.60 has no named parameter for these
    # yet, hence the remote-args route (deprecated for removal in 2.64; silenced in `_map_actors`).
    restart_args = {"max_restarts": config.max_actor_restarts, "max_task_retries": config.max_actor_restarts}
    shared = {"max_retries": config.max_retries, "measure_cost": measure_cost, "image_root": config.image_root(),
              "image_format": "webp" if config.save_images == "webp" else "png", "factory": generator_factory,
              "seed_fn": seed_fn}
    branches = []
    cand_col = todo.column("candidate").to_pylist()
    for cand in pool.candidates:
        rows = todo.filter(pa.array([c == cand.name for c in cand_col]))
        if rows.num_rows == 0:
            continue
        # One block per generator batch, so every actor of the pool has work from the start.
        ds = ray.data.from_arrow(split_blocks(rows, cand.build.batch_size))
        device = _device(getattr(cand.generator, "device", None), cand.build.num_gpus)
        branches.append(_map_actors(ds, GenerateStage, {**shared, "spec": cand.generator, "device": device},
                                    cand.build, restart_args))
    ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    for i, spec in enumerate(pool.metrics):
        kwargs = {"spec": spec, "device": _device(None, spec.num_gpus), "max_retries": config.max_retries,
                  "drop_image": i == len(pool.metrics) - 1, "factory": scorer_factory}
        ds = _map_actors(ds, ScoreStage, kwargs, spec, restart_args)
    return ds


@contextlib.contextmanager
def ray_session(config: BuildConfig) -> Iterator[None]:
    """Use the running Ray, else connect to `--address`/$RAY_ADDRESS, else start a local one (no dashboard).

    Only a Ray started here is shut down here.
    """
    if ray.is_initialized():
        yield
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # address="local": always a fresh local instance, never a cluster some other `ray start`
        # on this machine left in /tmp/ray/ray_current_cluster (ray.init() alone would join it).
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[DataContext]:
    """Tune the driver's DataContext for this run and put it back afterwards."""
    ctx = DataContext.get_current()
    saved = (ctx.max_errored_blocks, ctx.enable_progress_bars)
    # A block that fails past Ray's actor retries is recorded as lost rows (errors table) instead of
    # aborting hours of work; the next run retries those rows since they are not complete.
    ctx.max_errored_blocks = -1
    ctx.enable_progress_bars = progress
    try:
        yield ctx
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars = saved


def check_cluster_fits(pool: Pool, config: BuildConfig) -> None:
    """Fail at once when the running cluster cannot hold the build's actor pools, instead of letting
    Ray Data wait forever ("pending: 48 CPU, 11.75 GPU"): unless it can grow (an autoscaler is
    configured) or `config.wait_for_resources` says nodes will join."""
    stages = [*build_demand(pool), StageDemand("write parquet", 1, WRITE_NUM_CPUS, 0.0, 0.0)]
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = {k: max((float(n.get(k, 0.0)) for n in nodes), default=0.0) for k in ("CPU", "GPU", "memory")}
    problems = missing_resources(stages, ray.cluster_resources(), largest)
    if not problems:
        return
    if config.wait_for_resources or _cluster_can_grow():
        log.warning("the cluster lacks resources for this build (%s); waiting for nodes to join", "; ".join(problems))
        return
    raise CatimageError(
        f"this Ray cluster cannot run the build of {config.pool}: {'; '.join(problems)}. The pool asks for "
        f"{describe_demand(stages)}. Run it on a cluster that has them (--address or RAY_ADDRESS), lower the "
        "`build:` resources (num_cpus, num_gpus, memory, concurrency) in the pool, build fewer candidates at once "
        "(--candidate), or pass --wait-for-resources if nodes will join"
    )


def _cluster_can_grow() -> bool:
    """True when an autoscaler may add nodes (Ray Data's own test; a private helper, hence guarded)."""
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        return bool(is_autoscaling_enabled())
    except Exception:  # noqa: BLE001 - a Ray version without it: assume a fixed cluster
        return False


def run_build(
    config: BuildConfig,
    *,
    generator_factory: GeneratorFactory | None = None,
    scorer_factory: ScorerFactory | None = None,
    seed_fn: Callable[[str, int], int] | None = None,
    progress: bool = True,
    passes: int = 2,
) -> BuildResult:
    """Build (or resume) the quality table described by `config`; return what was done.

    `passes`: how many times rows lost to failures (a killed node, a worker that died past Ray's
    retries) are retried within this run before they are left in the errors table.

    `generator_factory` / `scorer_factory` replace `make_generator` / `make_scorer` (a test or a
    custom backend); they are shipped to Ray workers, so they must be picklable.
    """
    start = time.perf_counter()
    pool = config.load_pool()
    metrics = [m.name for m in pool.metrics]
    work = _work_rows(config, pool)
    output = Path(config.output)
    todo = pending(work, done_keys(output, metrics))
    measure = config.wants_cost(pool)
    _warn_if_measured_seconds_cannot_be_used(pool, measure)
    log.info("build: %d rows (prompts x %d candidates x %d seeds); %d already complete, %d to do",
             work.num_rows, len(pool.names), config.seeds, work.num_rows - todo.num_rows, todo.num_rows)
    run_dir = None
    if todo.num_rows:
        with ray_session(config), _data_context(progress):
            check_cluster_fits(pool.select(_candidates_of(todo, pool)), config)
            plan = functools.partial(build_plan, pool=pool, config=config, measure_cost=measure,
                                     generator_factory=generator_factory, scorer_factory=scorer_factory, seed_fn=seed_fn)
            run_dir = _run_passes(plan, work, todo, output, config, metrics, passes)
    quality, errors = consolidate(output, metrics, order=work)
    todo_keys = set(keys_of(todo))
    return BuildResult(
        table_path=(output / "quality.parquet") if quality.num_rows else None,
        errors_path=output / "errors.parquet",
        run_dir=run_dir,
        total_keys=work.num_rows,
        already_done=work.num_rows - todo.num_rows,
        attempted=todo.num_rows,
        written=sum(1 for k in keys_of(quality) if k in todo_keys),
        errors=errors.num_rows,
        table_rows=quality.num_rows,
        seconds=time.perf_counter() - start,
    )


def _candidates_of(rows: pa.Table, pool: Pool) -> list[str]:
    """The pool's candidates that have rows in `rows`, in pool order (only their actor pools start)."""
    present = set(rows.column("candidate").to_pylist())
    return [n for n in pool.names if n in present]


def _work_rows(config: BuildConfig, pool: Pool) -> pa.Table:
    """Every (prompt, candidate, seed) row this config asks for."""
    prompts = read_prompts(config.prompts)
    if config.limit is not None:
        prompts = prompts.slice(0, config.limit)
    return expand_work(prompts, pool.names, config.seeds)


def _warn_if_measured_seconds_cannot_be_used(pool: Pool, measure: bool) -> None:
    """Measured seconds stand in for undeclared costs only in a seconds pool (`Pool.cost_vector`
    refuses the mix at fit/evaluate time): say so now, not after the build."""
    undeclared = [c.name for c in pool.candidates if c.cost is None]
    if measure and undeclared and pool.cost_unit != MEASURED_COST_UNIT:
        log.warning(
            "candidates %s declare no cost and the pool counts cost in %s, but the build measures %s: fit and "
            "evaluate will refuse this pool until their costs are declared in %s (e.g. `catimage cost POOL.yaml "
            "--unit %s --out POOL.yaml`)", undeclared, pool.cost_unit, MEASURED_COST_UNIT, pool.cost_unit, pool.cost_unit,
        )


def _run_passes(
    plan: Callable[[pa.Table], ray.data.Dataset],
    work: pa.Table,
    todo: pa.Table,
    output: Path,
    config: BuildConfig,
    metrics: list[str],
    passes: int,
) -> Path | None:
    """Write `todo` through the plan; redo rows lost to failed blocks up to `passes` times.

    A pass writes its own fresh run folder; rows lost to a dead node or worker (their block failed
    past Ray's retries) are pending again, so the next pass redoes exactly those. consolidate()
    keeps one row per key whatever the passes wrote. Returns the last run folder.
    """
    run_dir = None
    for attempt in range(1, passes + 1):
        remaining = pending(work, done_keys(output, metrics)) if attempt > 1 else todo
        if remaining.num_rows == 0:
            break
        run_dir = new_run_dir(output)
        write_run_manifest(run_dir, config, metrics, remaining.num_rows)
        plan(remaining).write_parquet(str(run_dir), ray_remote_args={"num_cpus": WRITE_NUM_CPUS})
        lost = record_lost(remaining, run_dir, LOST_REASON)
        if not lost:
            break
        log.warning("%d row(s) were lost to failed blocks (pass %d of %d)%s", lost, attempt, passes,
                    "; retrying them" if attempt < passes else "; they are in the errors table")
    return run_dir


def print_summary(result: BuildResult, console: Any | None = None) -> None:
    """A rich table of what the run did (rows written, errors, seconds)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title="catimage build", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("work rows (prompts x candidates x seeds)", str(result.total_keys))
    table.add_row("already complete before this run", str(result.already_done))
    table.add_row("attempted in this run", str(result.attempted))
    table.add_row("written in this run", str(result.written))
    table.add_row("rows in the errors table", str(result.errors))
    table.add_row("rows in the quality table", str(result.table_rows))
    table.add_row("seconds", f"{result.seconds:.1f}")
    if result.attempted:
        table.add_row("images / s (this run)", f"{result.attempted / max(result.seconds, 1e-9):.2f}")
    table.add_row("quality table", str(result.table_path or "(none yet)"))
    table.add_row("errors table", str(result.errors_path))
    console.print(table)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True, type=Path, help="pool YAML (candidates, build resources, metrics)")
    p.add_argument("--prompts", required=True, type=Path, help=".txt, .csv, .tsv, .parquet or .jsonl")
    p.add_argument("--output", required=True, type=Path, help="build folder (resumable; re-run to continue)")
    p.add_argument("--seeds", type=int, default=1, help="samples per (prompt, candidate)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--candidates", default=None, help="comma-separated subset of the pool's candidates")
    p.add_argument("--save-images", choices=["none", "png", "webp"], default="none")
    p.add_argument("--image-dir", default=None, help="folder or URI for images (default OUTPUT/images)")
    p.add_argument("--measure-cost", action=argparse.BooleanOptionalAction, default=None,
                   help="record seconds per image in `cost` (default: when a candidate has no declared cost)")
    p.add_argument("--max-retries", type=int, default=2, help="solo retries of a row whose batch failed")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a local Ray (ignored with --address)")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local)")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")
    p.add_argument("--passes", type=int, default=2, help="passes over rows lost to failed nodes/workers (>= 1)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="start even when the cluster lacks the pool's resources (nodes will join); default: fail at once")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = BuildConfig(
            pool=args.pool,
            prompts=args.prompts,
            output=args.output,
            seeds=args.seeds,
            limit=args.limit,
            candidates=[c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else None,
            save_images=args.save_images,
            image_dir=args.image_dir,
            measure_cost=args.measure_cost,
            max_retries=args.max_retries,
            num_cpus=args.num_cpus,
            address=args.address,
            wait_for_resources=args.wait_for_resources,
        )
        if args.passes < 1:
            raise CatimageError("--passes must be at least 1")
        result = run_build(config, progress=not args.no_progress, passes=args.passes)
    except ValidationError as err:
        print(f"error: invalid arguments: {err}", file=sys.stderr)
        return 2
    except CatimageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
