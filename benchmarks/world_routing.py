"""Routing in the scene world: build the large world table once, then print what routing earns.

    python benchmarks/world_routing.py build [--prompts 1200] [--seeds 4]    # Ray Data, ~1 h on 2 cores
    python benchmarks/world_routing.py evaluate [--trials 10]                # seconds, from the shipped table
    python benchmarks/world_routing.py foreign [--prompts FILE] [--seeds 4]  # the shipped router on new phrasing

`build` draws held-out world prompts (scenes no generator trained on, disjoint from the demo's),
runs the Ray Data build job over every candidate of catimage/data/world_pool.yaml x S seeds with
the `scene_score` and `sharpness` metrics, and writes the scores (no images) to
catimage/data/world_table.parquet, the table the package ships.

`evaluate` prints (1) the per-complexity table: mean scene_score of every candidate by the number
of objects in the prompt (read with the verifier's parser; the router never sees it), and (2) the
routing figures over re-drawn splits (`catimage evaluate` on the same table gives the same).

`foreign` builds prompts written outside the grammar (default: benchmarks/world_foreign_prompts.txt,
hand-written in the world's vocabulary with other sentence shapes) and routes them with the SHIPPED
router (catimage/data/world_router): does the gain hold on phrasing it was not fitted on?
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "catimage" / "data"
POOL = DATA / "world_pool.yaml"
TABLE = DATA / "world_table.parquet"
DEMO_PROMPTS = DATA / "world_demo_prompts.txt"
ROUTER = DATA / "world_router"
FOREIGN = Path(__file__).resolve().parent / "world_foreign_prompts.txt"
METRIC = "scene_score"
TABLE_SEED = 2027


def build(args: argparse.Namespace) -> None:
    from catimage.tables.build import BuildConfig
    from catimage.world import heldout_prompts
    from jobs.build_dataset import print_summary, run_build

    demo = [p for p in DEMO_PROMPTS.read_text().splitlines() if p.strip()]
    prompts = heldout_prompts(args.prompts, seed=TABLE_SEED, exclude=demo)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompt_file = work / "world_table_prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    result = run_build(BuildConfig(pool=POOL, prompts=prompt_file, output=work / "table", seeds=args.seeds,
                                   num_cpus=args.num_cpus), progress=True)
    print_summary(result, Console())
    if result.table_path is None:
        raise SystemExit("the build wrote no rows")
    table = pq.read_table(result.table_path)
    keep = [c for c in table.column_names if c != "image_path"]
    pq.write_table(table.select(keep), TABLE, compression="zstd")
    print(f"wrote {TABLE} ({table.num_rows} rows, {TABLE.stat().st_size / 1e6:.2f} MB)")


def complexity_table(console: Console) -> None:
    from catimage.tables.pool import load_pool
    from catimage.tables.table import aggregate, read_quality_table
    from catimage.world import parse

    pool = load_pool(POOL)
    matrix = aggregate(read_quality_table(TABLE), metric=METRIC, candidates=pool.names)
    costs = pool.cost_vector(matrix.candidates)
    objects = np.array([parse(p).n_objects for p in matrix.prompts])
    tab = Table(title=f"mean {METRIC} by objects in the prompt ({matrix.n_prompts} held-out prompts, "
                      f"S={int(np.median(matrix.count))} seeds; cost in {pool.cost_unit})")
    tab.add_column("candidate")
    tab.add_column("cost", justify="right")
    buckets = sorted(set(objects.tolist()))
    for b in buckets:
        tab.add_column(f"{b} obj (n={int((objects == b).sum())})", justify="right")
    tab.add_column("all", justify="right")
    for j, name in enumerate(matrix.candidates):
        tab.add_row(name, f"{costs[j]:.3g}", *[f"{np.nanmean(matrix.mean[objects == b, j]):.3f}" for b in buckets],
                    f"{np.nanmean(matrix.mean[:, j]):.3f}")
    console.print(tab)


def evaluate(args: argparse.Namespace) -> None:
    from catimage.evaluation.trials import evaluate_table
    from catimage.features.registry import make_embedder
    from catimage.tables.table import load_pool_matrix

    console = Console(width=200)
    complexity_table(console)
    pool, matrix, costs = load_pool_matrix(TABLE, POOL, metric=METRIC)
    tab = Table(title=f"routing on the world table: {args.trials} re-drawn splits, test {args.test_frac:.0%}")
    for col in ("estimator", "best fixed", "area over hull (mean, min)", "q@best cost", "cost ratio to match (miss = 1)",
                "splits above hull", "s"):
        tab.add_column(col, justify="right")
    embedder = make_embedder("minilm")  # one instance for every estimator: MiniLM loads once
    for name in args.estimators:
        start = time.perf_counter()
        report = evaluate_table(matrix, costs, name, {}, embedder, test_frac=args.test_frac,
                                calibration_frac=0.1, seed=0, trials=args.trials, cost_unit=pool.cost_unit)
        areas = np.array([t["area_over_hull"] for t in report["per_trial"]])
        s, over = report["summary"], report["summary"]["trials"]
        tab.add_row(name, s["best_fixed"], f"{areas.mean():+.4f}, {areas.min():+.4f}",
                    f"{s['quality_at_best_fixed_cost']:.3f} vs {s['best_fixed_quality']:.3f}",
                    f"{over['mean_cost_ratio_or_miss']:.3f} ({over['misses']} miss)", f"{int((areas > 0).sum())}/{len(areas)}",
                    f"{time.perf_counter() - start:.0f}")
    console.print(tab)


def foreign(args: argparse.Namespace) -> None:
    from catimage.evaluation.figures import evaluate_predictions
    from catimage.model.router_model import RouterModel
    from catimage.tables.build import BuildConfig
    from catimage.tables.table import load_pool_matrix
    from jobs.build_dataset import print_summary, run_build

    out = Path(args.work) / f"foreign-{Path(args.prompts).stem}"
    result = run_build(BuildConfig(pool=POOL, prompts=Path(args.prompts), output=out, seeds=args.seeds,
                                   num_cpus=args.num_cpus), progress=True)
    print_summary(result, Console())
    pool, matrix, costs = load_pool_matrix(result.table_path, POOL, metric=METRIC)
    router = RouterModel.load(args.router)
    ev = evaluate_predictions(router.predict(matrix.prompts), matrix.mean, costs, matrix.candidates)
    s = ev.summary
    print(f"{matrix.n_prompts} prompts from {args.prompts}, S={args.seeds}, router {args.router}")
    print(f"best fixed {s['best_fixed']} ({s['best_fixed_quality']:.3f} at cost {s['best_fixed_cost']:.3g} {pool.cost_unit}); "
          f"router at that cost {s['quality_at_best_fixed_cost']:.3f}; cost ratio to match "
          f"{s['cost_ratio_or_miss']:.3f}{' (a miss)' if s['missed_best_fixed'] else ''}; area over hull {s['area_over_hull']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the large world table with Ray Data and ship its scores")
    b.add_argument("--prompts", type=int, default=1200)
    b.add_argument("--seeds", type=int, default=4)
    b.add_argument("--num-cpus", type=float, default=None)
    b.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "catimage-world-table"))
    e = sub.add_parser("evaluate", help="per-complexity and routing figures from the shipped table")
    e.add_argument("--trials", type=int, default=10)
    e.add_argument("--test-frac", type=float, default=0.2)
    e.add_argument("--estimators", nargs="+", default=["knn", "linear", "transformer"])
    f = sub.add_parser("foreign", help="build prompts written outside the grammar and route them with the shipped router")
    f.add_argument("--prompts", default=str(FOREIGN))
    f.add_argument("--seeds", type=int, default=4)
    f.add_argument("--router", default=str(ROUTER))
    f.add_argument("--num-cpus", type=float, default=None)
    f.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "catimage-world-table"))
    args = parser.parse_args()
    {"build": build, "evaluate": evaluate, "foreign": foreign}[args.command](args)


if __name__ == "__main__":
    main()
