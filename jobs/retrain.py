"""Ray job: retrain the router on served traffic and promote it only when it wins with confidence.

    python jobs/retrain.py --log LOG_URI --pool POOL.yaml --serving MODEL_DIR --out MODELS_DIR
        [--base-table TABLE [--judge scene_score]] [--metric scene_decider] [--budget B | --lambda L]
        [--holdout-frac 0.2]
    ray job submit --working-dir . -- python jobs/retrain.py --log s3://bucket/served ...

1. Read the served log (catimage.tables.served_log: hour=... Parquet partitions, any URI Ray Data
   reads) with Ray Data, plus an optional base quality table.
2. Hold out the newest share of requests, and every row of their prompts (`holdout_by_time`).
3. Fit a candidate on the rest with THE fit pipeline, the labels being the online decision scores
   (never the judge, which serving does not run): a router (`RouterModel.fit` -> `fit_router`), or
   with `--policy cascade` a cascade (`fit_cascade`, the serving cascade's plan set and scorer cost).
4. Off-policy evaluation on the held-out requests (`compare_policies`, doubly robust, paired
   bootstrap): the candidate's and the serving model's quality, cost and utility at the serving
   lambda, from the logged propensities.
5. `decide_promotion`: promote only on a confident utility win. The candidate is written to
   MODELS_DIR/<version>/ with `promotion.json` (decision, reasons, figures) beside it; a promoted
   one also becomes MODELS_DIR/serving.json ({"model_version", "path"}, replaced atomically), the
   pointer a Serve `reconfigure` reads.

With `--judge J` (and a base table scored by both J and the decision metric), the labels are put on
the judge's scale first (catimage.tables.judge_scale: the base table's rows keep J, logged rows take
their decision score plus their candidate's mean (J - decision) on the base table), and the held-out
rewards of step 4 likewise: a decider that over-scores one candidate no longer pulls the refit toward
it. Without it, a cascade is refitted on the decision metric alone (its "judge" is the decision metric:
the log holds nothing else), so its values are the decision metric's; off-policy evaluation of cascades is only as
good as the exploration over plans (docs/learning.md, Support).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pyarrow as pa

from catimage.errors import CatimageError, TableError

log = logging.getLogger("catimage.jobs.retrain")

SERVING_POINTER = "serving.json"


@dataclass
class RetrainConfig:
    """What the retrain job reads, fits and decides with."""

    log: str
    pool: Path
    serving: Path
    out: Path
    policy: str = "route"
    base_table: Path | None = None
    metric: str | None = None
    judge: str | None = None
    estimator: str = "auto"
    embedder: str = "minilm"
    holdout_frac: float = 0.2
    lam: float | None = None
    budget: float | None = None
    min_requests: int = 200
    min_gain: float = 0.0
    n_boot: int = 1000
    seed: int = 0
    version: str | None = None
    num_cpus: float | None = None
    address: str | None = None


@dataclass
class RetrainOutcome:
    version: str
    model_dir: str
    promoted: bool
    decision: dict[str, Any]
    n_training_rows: int
    n_heldout_requests: int
    pointer: str | None = None
    notes: list[str] = field(default_factory=list)


# --- reading (Ray Data) ---------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(num_cpus: float | None, address: str | None) -> Iterator[None]:
    """Use the running Ray, else $RAY_ADDRESS / --address, else a fresh local one (shut down after)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def read_log_with_ray(uri: str) -> pa.Table:
    """The whole served log as one Arrow table, read by Ray Data (hive partitions; half-written
    `.tmp` parts skipped)."""
    import ray
    import ray.data
    from ray.data.datasource.partitioning import Partitioning

    try:
        ds = ray.data.read_parquet(uri, partitioning=Partitioning("hive"), file_extensions=["parquet"])
        parts = [ray.get(ref) for ref in ds.to_arrow_refs()]
    except (FileNotFoundError, OSError, ValueError) as err:
        raise TableError(f"cannot read the served log at {uri}: {err}") from None
    parts = [p for p in parts if p.num_rows]
    if not parts:
        raise TableError(f"the served log at {uri} holds no rows yet; serve some traffic first")
    return pa.concat_tables(parts, promote_options="permissive")


# --- the retrain itself (no Ray below) ------------------------------------------------------------


def training_table(train_rows: pa.Table, metric: str, base: pa.Table | None, judge: str | None = None,
                   base_name: str = "the base table") -> pa.Table:
    """Logged rows (scored ones) plus the base table's rows, on the quality-table columns only; with
    `judge`, the judge column too (null on logged rows: `on_judge_scale` fills it)."""
    from catimage.tables.served_log import training_rows

    keep = ["prompt_id", "prompt", "candidate", "seed", metric]
    parts = []
    if train_rows.num_rows:
        logged = training_rows(train_rows, "served log (training part)").select(keep)
        if judge is not None:
            logged = logged.append_column(judge, pa.nulls(logged.num_rows, pa.float64()))
        parts.append(logged)
    if base is not None:
        for name, role in ((metric, "the decision metric the log holds"), (judge, "the judge (--judge)")):
            if name is not None and name not in base.column_names:
                raise CatimageError(f"{base_name} has no {name!r} column ({role})")
        cols = keep + ([judge] if judge is not None else [])
        parts.append(base.select(cols).cast(parts[0].schema if parts else base.select(cols).schema))
    if not parts:
        raise CatimageError("nothing to train on: every logged prompt is held out and no base table was given")
    return pa.concat_tables(parts)


def judge_scale_of(config: RetrainConfig, base: pa.Table | None, metric: str) -> Any:
    """The base table's per-candidate offsets from `metric` to the judge (None without --judge)."""
    from catimage.tables.judge_scale import fit_judge_scale

    if config.judge is None:
        return None
    if base is None:
        raise CatimageError("--judge needs --base-table: a table scored by both the judge and the decision metric")
    return fit_judge_scale(base, metric, config.judge)


def _lambda(config: RetrainConfig, serving: Any, logged_lam: np.ndarray) -> tuple[float, str]:
    if config.lam is not None:
        return float(config.lam), "given"
    if config.budget is not None:
        return float(serving.lambda_for_budget(config.budget)), f"the serving model's lambda for budget {config.budget}"
    finite = logged_lam[np.isfinite(logged_lam)]
    if finite.size:
        return float(np.median(finite)), "the median lambda the serving policy logged"
    return 0.0, "0 (no lambda, budget or logged lambda)"


def retrain_on_log(log_table: pa.Table, config: RetrainConfig) -> RetrainOutcome:
    """Fit, evaluate off-policy, decide and write; see the module docstring."""
    from catimage.evaluation.offpolicy import (
        cascade_target,
        compare_policies,
        holdout_by_time,
        logged_requests,
        router_target,
    )
    from catimage.model.cascade_model import CascadeModel
    from catimage.model.promotion import PromotionRule, decide_promotion, write_promotion
    from catimage.model.router_model import RouterModel
    from catimage.tables.judge_scale import on_judge_scale
    from catimage.tables.pool import load_pool
    from catimage.tables.served_log import decision_metric
    from catimage.tables.table import aggregate, read_quality_table

    metric = decision_metric(log_table, config.metric)
    base = None if config.base_table is None else read_quality_table(config.base_table)
    scale = judge_scale_of(config, base, metric)
    label = metric if scale is None else config.judge
    train_rows, held = holdout_by_time(log_table, config.holdout_frac)
    table = training_table(train_rows, metric, base, config.judge, f"the base table {config.base_table}")
    if scale is not None:
        table = on_judge_scale(table, scale)
        held = on_judge_scale(held, scale)
    pool = load_pool(config.pool)
    present = set(table.column("candidate").to_pylist())
    matrix = aggregate(table, metric=label, candidates=[n for n in pool.names if n in present])
    costs = pool.select(matrix.candidates).cost_vector(matrix.candidates)
    log.info("fitting a %s policy (%s) on %d rows (%d prompts x %d candidates)", config.policy, config.estimator,
             table.num_rows, matrix.n_prompts, len(matrix.candidates))
    if config.policy == "cascade":
        serving = CascadeModel.load(config.serving)
        candidate = _fit_cascade(table, matrix, metric, costs, pool.cost_unit, serving, config)
        target = cascade_target
    elif config.policy == "route":
        serving = RouterModel.load(config.serving)
        candidate = RouterModel.fit(matrix, costs, pool.cost_unit, config.embedder, None, config.estimator, None,
                                    seed=config.seed, notes=[f"retrained on served traffic ({label}) by jobs/retrain.py"])
        target = router_target
    else:
        raise CatimageError(f"--policy must be route or cascade, got {config.policy!r}")
    logged = logged_requests(held, label)
    lam, lam_source = _lambda(config, serving, logged.lam)
    evidence = compare_policies(logged, target(candidate, logged, lam, "candidate"),
                                target(serving, logged, lam, "serving"), lam, n_boot=config.n_boot,
                                seed=config.seed)
    decision = decide_promotion(evidence, PromotionRule(min_requests=config.min_requests, min_gain=config.min_gain,
                                                        budget=config.budget))
    version = config.version or "v" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    model_dir = Path(config.out) / version
    candidate.save(model_dir)
    extra = {"model_version": version, "serving_model": str(config.serving), "decision_metric": metric,
             "label": label, "judge_scale": None if scale is None else scale.to_dict(),
             "lambda_source": lam_source, "training_rows": table.num_rows, "training_prompts": matrix.n_prompts,
             "log": str(config.log), "base_table": None if config.base_table is None else str(config.base_table)}
    write_promotion(decision, model_dir, **extra)
    pointer = _point_serving_at(Path(config.out), version, model_dir) if decision.promote else None
    return RetrainOutcome(version, str(model_dir), decision.promote, {**decision.to_dict(), **extra}, table.num_rows,
                          logged.n, None if pointer is None else str(pointer))


def _fit_cascade(table: pa.Table, matrix: Any, metric: str, costs: np.ndarray, cost_unit: str, serving: Any,
                 config: RetrainConfig) -> Any:
    """A cascade stopping on the decision metric and valuing draws by the matrix's metric (the judge's
    scale with --judge, else the decision metric itself), with the serving cascade's plan set (same
    thresholds, so plans keep their names in the log) and scorer cost."""
    from catimage.model.cascade_model import CascadeOptions, fit_cascade
    from catimage.tables.draws import draws_from_table
    from catimage.tables.table import split_prompts

    draws = draws_from_table(table, matrix.candidates, metric, matrix.metric)
    split = split_prompts(matrix.n_prompts, test_frac=0.0, calibration_frac=0.1, seed=config.seed)
    options = CascadeOptions(**{**serving.options.to_dict(), "plan_thresholds": tuple(serving.plan_thresholds.tolist())})
    return fit_cascade(matrix, draws, costs, cost_unit, split.train, split.calibration, score_cost=serving.score_cost,
                       options=options, estimator=config.estimator, embedder=config.embedder)


def _point_serving_at(out: Path, version: str, model_dir: Path) -> Path:
    """Replace OUT/serving.json atomically: a reader sees the old pointer or the new one, never half."""
    pointer = out / SERVING_POINTER
    tmp = out / f".{SERVING_POINTER}.tmp"
    tmp.write_text(json.dumps({"model_version": version, "path": str(model_dir.resolve())}, indent=2))
    os.replace(tmp, pointer)
    return pointer


def run_retrain(config: RetrainConfig) -> RetrainOutcome:
    """Read the log with Ray Data, then retrain, evaluate and decide (`retrain_on_log`)."""
    with ray_session(config.num_cpus, config.address):
        log_table = read_log_with_ray(config.log)
    return retrain_on_log(log_table, config)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, help="served log root (local folder, s3://, gs://, ...)")
    p.add_argument("--pool", required=True, type=Path, help="pool YAML (candidates' costs)")
    p.add_argument("--serving", required=True, type=Path, help="model directory being served now")
    p.add_argument("--out", required=True, type=Path, help="models folder: OUT/<version>/ and OUT/serving.json")
    p.add_argument("--policy", choices=("route", "cascade"), default="route",
                   help="what --serving is and what to refit: a router, or a cascade (router + plans)")
    p.add_argument("--base-table", type=Path, default=None, help="a quality table to train on beside the log")
    p.add_argument("--metric", default=None, help="the decision metric (default: the log's only score)")
    p.add_argument("--judge", default=None, help="learn on this metric's scale: the base table's judge column; "
                   "logged decision scores are shifted by their candidate's mean (judge - decision) there")
    p.add_argument("--estimator", default="auto")
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--holdout-frac", type=float, default=0.2, help="newest share of requests held out for evaluation")
    p.add_argument("--lambda", dest="lam", type=float, default=None)
    p.add_argument("--budget", type=float, default=None, help="average cost to hold (sets lambda, guards cost)")
    p.add_argument("--min-requests", type=int, default=200)
    p.add_argument("--min-gain", type=float, default=0.0, help="utility gain the interval's lower end must exceed")
    p.add_argument("--bootstrap", dest="n_boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", default=None, help="name of the new model (default: v<UTC time>)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of a local Ray (ignored with --address)")
    p.add_argument("--address", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.lam is not None and args.budget is not None:
        print("error: give --lambda or --budget, not both", file=sys.stderr)
        return 2
    try:
        outcome = run_retrain(RetrainConfig(**vars(args)))
    except CatimageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    verdict = "PROMOTED" if outcome.promoted else "refused"
    print(f"{outcome.version}: {verdict} ({outcome.n_heldout_requests} held-out requests); wrote {outcome.model_dir}")
    for reason in outcome.decision["reasons"]:
        print(f"  {reason}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
