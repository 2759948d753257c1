"""Routing in the scene world: build the large world table once, then print what routing earns.

    python benchmarks/world_routing.py build [--prompts 1200] [--seeds 4]    # Ray Data, ~1 h on 2 cores
    python benchmarks/world_routing.py evaluate [--trials 10]                # seconds, from the shipped table
    python benchmarks/world_routing.py evaluate --policy both --estimators twoway-ridge [--decision-noise 0.1]
    python benchmarks/world_routing.py foreign [--prompts FILE] [--seeds 4]  # shipped router + cascade, new phrasing

`build` draws held-out world prompts (scenes no generator trained on, disjoint from the demo's),
runs the Ray Data build job over every candidate of catimage/data/world_pool.yaml x S seeds with
the `scene_score` and `sharpness` metrics, and writes the scores (no images) to
catimage/data/world_table.parquet, the table the package ships.

`evaluate` prints (1) the per-complexity table: mean scene_score of every candidate by the number
of objects in the prompt (read with the verifier's parser; the router never sees it), and (2) the
routing figures over re-drawn splits (`catimage evaluate` on the same table gives the same).

`evaluate --policy cascade|both [--decision-noise 0.1]` adds the cascade (catimage.evaluation.cascade):
plans simulated on the test prompts' own seeds, deciding on scene_decider when the table has it, else
on scene_score (an UPPER BOUND, said), optionally blurred by Gaussian noise as a stand-in decider.

`foreign` builds prompts written outside the grammar (default: benchmarks/world_foreign_prompts.txt,
hand-written in the world's vocabulary with other sentence shapes; S >= 4 seeds) and evaluates the
SHIPPED router (catimage/data/world_router) and the shipped cascade (catimage/data/world_cascade; until
one ships, a cascade fitted on the shipped table around the shipped router) on them, nothing refitted
on the new prompts. Its last line reads
`cascade: cost ratio to match <best fixed> <ratio or miss>; route: <ratio or miss>`.
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

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

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


def world_cascade_inputs(table_path: Path, candidates: list[str], args: argparse.Namespace, seed: int = 0):
    """The cascade's inputs as every command picks them (catimage.tables.draws.cascade_inputs: the pool's
    decision metric, scene_decider, and its cost, unless the flags say otherwise), plus Gaussian noise of sd
    `--decision-noise` on the decision scores when asked (a noisy stand-in decider, for the agreement study)."""
    from catimage.tables.draws import CascadeInputs, cascade_inputs
    from catimage.tables.pool import load_pool
    from catimage.tables.table import read_quality_table

    got = cascade_inputs(read_quality_table(table_path), load_pool(POOL), candidates, METRIC, args.decision_metric,
                         args.decision_cost)
    if args.decision_noise > 0:
        draws = got.draws
        draws.decision = draws.decision + np.random.default_rng(seed).normal(0.0, args.decision_noise, draws.decision.shape)
        draws.decision_metric = f"{draws.decision_metric}+N(0,{args.decision_noise:g})"
        got = CascadeInputs(draws, got.score_cost, got.notes)
    return got


def evaluate(args: argparse.Namespace) -> None:
    from catimage.evaluation.trials import EvaluateOptions, evaluate_table
    from catimage.features.registry import make_embedder
    from catimage.model.cascade_model import CascadeOptions
    from catimage.tables.table import load_pool_matrix

    console = Console(width=200)
    if args.policy == "route":
        complexity_table(console)
    pool, matrix, costs = load_pool_matrix(TABLE, POOL, metric=METRIC)
    inputs = None if args.policy == "route" else world_cascade_inputs(TABLE, matrix.candidates, args)
    draws = None if inputs is None else inputs.draws
    label = "" if inputs is None else f"; cascade decides on {draws.decision_metric}" + (
        " (UPPER BOUND: the judge decides)" if draws.upper_bound else "") + f", scorer cost {inputs.score_cost:g}"
    tab = Table(title=f"{args.policy} on the world table: {args.trials} re-drawn splits, test {args.test_frac:.0%}{label}")
    for col in ("estimator", "policy", "best fixed", "area over hull (mean, min)", "q@best cost",
                "cost ratio to match (mean; per split)", "APGR", "CPT50/80", "s"):
        tab.add_column(col, justify="right")
    embedder = make_embedder("minilm")  # one instance for every estimator: MiniLM loads once
    for name in args.estimators:
        start = time.perf_counter()
        options = EvaluateOptions(estimator=name, embedder=embedder, test_frac=args.test_frac, calibration_frac=0.1,
                                  seed=0, trials=args.trials, cost_unit=pool.cost_unit, bootstrap=args.bootstrap,
                                  policy=args.policy, score_cost=0.0 if inputs is None else inputs.score_cost,
                                  cascade=CascadeOptions(max_attempts=args.max_attempts,
                                                         router_means=args.draw_means == "router",
                                                         draw_estimator={"k": args.draw_k} if args.draw_k else {}))
        report = evaluate_table(matrix, costs, options, draws=draws)
        for policy, block in report["policies"].items():
            _policy_row(tab, name, policy, block, time.perf_counter() - start)
    console.print(tab)


def _policy_row(tab: Table, name: str, policy: str, block: dict, secs: float) -> None:
    areas = np.array([t["area_over_hull"] for t in block["per_trial"]])
    ratios = [t["cost_ratio_or_miss"] for t in block["per_trial"]]
    s, over = block["summary"], block["summary"]["trials"]
    tab.add_row(name, policy, s["best_fixed"], f"{areas.mean():+.4f}, {areas.min():+.4f}",
                f"{s['quality_at_best_fixed_cost']:.3f} vs {s['best_fixed_quality']:.3f}",
                f"{over['mean_cost_ratio_or_miss']:.3f} ({over['misses']} miss); " + ", ".join(f"{r:.3f}" for r in ratios),
                _num(over.get("mean_apgr")), f"{_num(over.get('mean_cpt_50'))}/{_num(over.get('mean_cpt_80'))}",
                f"{secs:.0f}")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio_text(summary: dict) -> str:
    return "miss" if summary["missed_best_fixed"] else f"{summary['cost_ratio_or_miss']:.3f}"


WORLD_CASCADE = DATA / "world_cascade"


def fit_shipped_cascade(router_dir: Path, args: argparse.Namespace):
    """A cascade fitted on the shipped table around the SHIPPED router (fit_cascade_around), deciding
    as the flags say (world_cascade_inputs)."""
    from catimage.model.cascade_model import CascadeOptions, fit_cascade_around
    from catimage.tables.table import load_pool_matrix

    _, matrix, costs = load_pool_matrix(TABLE, POOL, metric=METRIC)
    inputs = world_cascade_inputs(TABLE, matrix.candidates, args)
    model = fit_cascade_around(router_dir, matrix, costs, inputs, options=CascadeOptions(max_attempts=args.max_attempts))
    return model, inputs


def shipped_cascade(router_dir: Path, args: argparse.Namespace):
    """The shipped cascade (catimage/data/world_cascade) when it exists and no flag asks for another
    decider; else one fitted now as `ship-cascade` fits it."""
    from catimage.model.cascade_model import CascadeModel

    default = args.decision_metric is None and args.decision_noise == 0 and args.decision_cost is None
    if default and (WORLD_CASCADE / "cascade.json").is_file():
        return CascadeModel.load(WORLD_CASCADE), f"the shipped cascade {WORLD_CASCADE.relative_to(ROOT)}"
    model, _ = fit_shipped_cascade(router_dir, args)
    return model, f"a cascade fitted on {TABLE.name} around the shipped router"


def ship_cascade(args: argparse.Namespace) -> None:
    """Fit the world's cascade bundle and write it into the package (catimage/data/world_cascade)."""
    model, inputs = fit_shipped_cascade(Path(args.router), args)
    for note in inputs.notes:
        print(f"note: {note}")
    model.save(WORLD_CASCADE)
    size = sum(f.stat().st_size for f in WORLD_CASCADE.rglob("*") if f.is_file())
    print(f"wrote {WORLD_CASCADE} ({size / 1e6:.2f} MB): decides on {model.decision_metric} at {model.score_cost:g} "
          f"{model.cost_unit} per image, judged by {model.judge_metric}; {len(model.plans)} plans")


def foreign(args: argparse.Namespace) -> None:
    from catimage.evaluation.cascade import evaluate_cascade_trial, usable_prompts
    from catimage.evaluation.figures import evaluate_predictions
    from catimage.features.stage import embed_features
    from catimage.model.router_model import RouterModel
    from catimage.tables.build import BuildConfig
    from catimage.tables.table import load_pool_matrix
    from jobs.build_dataset import print_summary, run_build

    if args.seeds < 4:
        raise SystemExit("foreign needs --seeds >= 4: a cascade's attempts each draw a fresh seed")
    out = Path(args.work) / f"foreign-{Path(args.prompts).stem}-s{args.seeds}"
    result = run_build(BuildConfig(pool=POOL, prompts=Path(args.prompts), output=out, seeds=args.seeds,
                                   num_cpus=args.num_cpus), progress=True)
    print_summary(result, Console())
    pool, matrix, costs = load_pool_matrix(result.table_path, POOL, metric=METRIC)
    router = RouterModel.load(args.router)
    inputs = world_cascade_inputs(Path(result.table_path), matrix.candidates, args, seed=1)
    draws = inputs.draws
    keep = np.isfinite(matrix.mean).all(axis=1) & usable_prompts(draws, 4)
    prompts = [matrix.prompts[i] for i in np.flatnonzero(keep)]
    route = evaluate_predictions(router.predict(prompts), matrix.mean[keep], costs, matrix.candidates).summary
    model, what = shipped_cascade(Path(args.router), args)
    X = embed_features(model.router.embedder, prompts, "pooled")
    cascade = evaluate_cascade_trial(model, draws.subset(np.flatnonzero(keep)), X, costs, bootstrap=0, seed=0,
                                     n_traces=0).result.summary
    bound = " (UPPER BOUND: the judge decides)" if draws.upper_bound else ""
    print(f"{int(keep.sum())} prompts from {args.prompts}, S={args.seeds}; router {args.router}; {what}; the cascade "
          f"decides on {draws.decision_metric}{bound}, scorer cost {model.score_cost:g} {pool.cost_unit}")
    for name, s in (("route", route), ("cascade", cascade)):
        print(f"{name}: best fixed {s['best_fixed']} ({s['best_fixed_quality']:.3f} at {s['best_fixed_cost']:.3g} "
              f"{pool.cost_unit}); at that cost {s['quality_at_best_fixed_cost']:.3f}; area over hull {s['area_over_hull']:+.4f}")
    print(f"cascade: cost ratio to match {cascade['best_fixed']} {_ratio_text(cascade)}; route: {_ratio_text(route)}")


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
    e.add_argument("--bootstrap", type=int, default=200)
    f = sub.add_parser("foreign", help="build prompts written outside the grammar; the shipped router and cascade on them")
    f.add_argument("--prompts", default=str(FOREIGN))
    f.add_argument("--seeds", type=int, default=4)
    f.add_argument("--router", default=str(ROUTER))
    c = sub.add_parser("ship-cascade", help="fit the world cascade around the shipped router; write catimage/data/world_cascade")
    c.add_argument("--router", default=str(ROUTER))
    for p in (e, f, c):
        p.add_argument("--policy", choices=("route", "cascade", "both"), default="route" if p is e else "both")
        p.add_argument("--decision-metric", default=None,
                       help="what the cascade reads online (default: the pool's decision metric, scene_decider, when the table has "
                            "it, else scene_score: an upper bound)")
        p.add_argument("--decision-noise", type=float, default=0.0,
                       help="add N(0, sd) to the decision scores: a noisy stand-in for a learned decider")
        p.add_argument("--decision-cost", type=float, default=None,
                       help="the decision scorer's cost per image in GFLOPs (default: the pool's cost of that metric)")
        p.add_argument("--max-attempts", type=int, default=4)
        p.add_argument("--draw-k", type=int, default=None,
                       help="fix the draw estimator's k (default: chosen by leave-one-out); a k above the training "
                            "prompts gives every prompt the global per-draw law (a prompt-agnostic baseline)")
        p.add_argument("--draw-means", choices=("knn", "router"), default="knn",
                       help="a draw's mean judge score: the draw estimator's own k-NN means (default) or the router's "
                            "predictions with the k-NN pass laws moved under them")
    f.add_argument("--num-cpus", type=float, default=None)
    f.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "catimage-world-table"))
    args = parser.parse_args()
    {"build": build, "evaluate": evaluate, "foreign": foreign, "ship-cascade": ship_cascade}[args.command](args)


if __name__ == "__main__":
    main()
