"""Routing quality of every estimator on the shared rated sets, with intervals (prints; asserts nothing).

    python benchmarks/routing_quality.py [--trials 10] [--data ../shared/data] [--sets genai-bench agiqa-3k]
        [--estimators knn linear transformer twoway-knn twoway-ridge ensemble auto] [--embedders minilm combined]

For each set (GenAI-Bench: human alignment ratings 1-5; AGIQA-3K: quality MOS) and each estimator x
embedder, `catimage.evaluation.trials.evaluate_table` (what `catimage evaluate` runs) fits on >= 10 re-drawn
splits (10 % test, 10 % calibration, the rest training; every hyper-parameter chosen inside the
training prompts) and prints the mean over trials of: area over the prompt-agnostic hull, gain and
cost ratio at the best fixed candidate's cost (a trial that never reaches it counts as the worst
ratio), each with a 95 % interval (the wider of the bias-corrected bootstrap over test prompts and
mean +- t * std / sqrt(T) over trials, as the report's verdict uses) and the std over trials; then the
split-half label-noise figures of the set. Costs are the ASSUMED illustrative costs of
configs/*_pool.yaml, not measurements. `--markdown` also prints README-ready table rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rated_sets import SETS, SHARED_DATA, load_set
from rich.console import Console
from rich.table import Table

from catimage.evaluation.confidence import combined_interval
from catimage.evaluation.noise import label_noise
from catimage.evaluation.trials import EvaluateOptions, evaluate_table
from catimage.features.cache import CachedEmbedder
from catimage.features.registry import make_embedder

ESTIMATORS = ("knn", "linear", "transformer", "twoway-knn", "twoway-ridge", "ensemble", "auto")
EMBEDDERS = ("minilm",)


def _embedder(name: str):
    if name == "combined":
        return make_embedder("combined")  # caches its MiniLM part itself
    return CachedEmbedder(make_embedder(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument("--embedders", nargs="+", default=list(EMBEDDERS))
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--markdown", action="store_true", help="also print README-ready Markdown rows")
    args = parser.parse_args()
    console = Console(width=240)
    md_rows = []
    for set_name in args.sets:
        pool, matrix, costs, metric = load_set(set_name, args.data)
        table = Table(title=f"{set_name}: {matrix.n_prompts} prompts x {len(matrix.candidates)} candidates, metric "
                      f"{metric}, {args.trials} trials, costs ASSUMED ({pool.cost_unit}); mean over trials [95% interval: "
                      "the wider of the test-prompt bootstrap and mean +- t std/sqrt(T)] (std over trials)")
        for col in ("estimator", "embedder", "best fixed", "area over hull", "gain at best fixed cost",
                    "cost ratio to match best (misses)", "win rate", "s"):
            table.add_column(col, justify="right")
        for emb_name in args.embedders:
            embedder = _embedder(emb_name)
            for est in args.estimators:
                start = time.perf_counter()
                report = evaluate_table(matrix, costs, EvaluateOptions(
                    estimator=est, embedder=embedder, test_frac=0.1, calibration_frac=0.1, seed=0, trials=args.trials,
                    cost_unit=pool.cost_unit, bootstrap=args.bootstrap))
                t = report["summary"]["trials"]
                secs = time.perf_counter() - start
                row = [est, emb_name, str(report["summary"]["best_fixed"]), _cell(t, "area_over_hull", True),
                       _cell(t, "gain_at_best_fixed_cost", True),
                       _cell(t, "cost_ratio_or_miss", False) + f" ({t.get('misses', 0)})",
                       f"{t.get('win_rate', 0):.1f}", f"{secs:.0f}"]
                table.add_row(*row)
                md_rows.append([set_name, *row[:-1]])
                console.print(f"[dim]{set_name} {est}+{emb_name}: {secs:.0f} s; "
                              f"{report['meta'].get('estimator_selection') or ''}[/]")
        console.print(table)
        noise = label_noise(matrix, costs)
        if noise.get("available"):
            console.print(
                f"{set_name} label noise: oracle area over hull {noise['oracle_area_full_means']:+.3f} on full means, "
                f"{noise['oracle_area_split_half']:+.3f} routed on one half of the ratings and scored on the other "
                f"({noise['noise_share_of_oracle_lead']:.0%} of the oracle's lead is label noise); interaction "
                f"split-half r = {noise['interaction_split_half_corr']:.2f}, reliability of full means "
                f"{noise['interaction_reliability_full_means']:.2f}")
        else:
            console.print(f"{set_name} label noise: {noise['reason']}")
    if args.markdown:
        print("| set | estimator | embedder | best fixed | area over hull | gain at best fixed cost | cost ratio (misses) | win rate |")
        print("|---|---|---|---|---|---|---|---|")
        for r in md_rows:
            print("| " + " | ".join(r) + " |")


def _cell(trials: dict, key: str, signed: bool) -> str:
    mean, std = trials.get(f"mean_{key}"), trials.get(f"std_{key}")
    lo, hi = combined_interval(trials, key)
    if mean is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.2f}"
    ci = f" [{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None else ""
    return f"{fmt.format(mean)}{ci} (±{std or 0:.3f})"


if __name__ == "__main__":
    main()
