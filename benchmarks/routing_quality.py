"""Routing quality of every estimator x embedder on the shared rated sets (prints; asserts nothing).

    .venv/bin/python benchmarks/routing_quality.py [--trials 5] [--data ../shared/data]

For each set (GenAI-Bench: human alignment ratings; AGIQA-3K: quality MOS) and each estimator x
embedder, it fits on train splits, evaluates on test splits and prints the report summary: the
best fixed candidate, router quality at that candidate's cost, cost ratio to match it, area over
the prompt-agnostic hull, the fraction of the oracle's gain captured, and the trial statistics.
Costs are the ASSUMED illustrative costs of configs/*_pool.yaml, not measurements.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from catimage.embed import make_embedder  # noqa: E402
from catimage.evaluation import evaluate_table  # noqa: E402
from catimage.pool import load_pool  # noqa: E402
from catimage.table import aggregate, read_quality_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETS = {
    "genai-bench": ("genai-bench-527/genai_image.json", "configs/genai_bench_pool.yaml", "quality"),
    "agiqa-3k": ("agiqa-3k/data.csv", "configs/agiqa3k_pool.yaml", "mos_quality"),
}
ESTIMATORS = ("knn", "linear", "transformer")
EMBEDDERS = ("minilm", "tfidf", "clip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument("--embedders", nargs="+", default=list(EMBEDDERS))
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    args = parser.parse_args()
    console = Console(width=220)
    for set_name in args.sets:
        rel, pool_file, metric = SETS[set_name]
        pool = load_pool(ROOT / pool_file)
        matrix = aggregate(read_quality_table(args.data / rel), metric=metric, candidates=pool.names)
        costs = pool.cost_vector(matrix.candidates)
        table = Table(title=f"{set_name}: {matrix.n_prompts} prompts x {len(matrix.candidates)} candidates, "
                      f"metric {metric}, {args.trials} trials, costs ASSUMED ({pool.cost_unit})")
        for col in ("estimator", "embedder", "best fixed", "q@best cost (trial 0)", "cost ratio to match",
                    "area over hull", "oracle gain frac", "win rate", "q@best mean±std", "area mean±std", "s"):
            table.add_column(col, justify="right")
        for emb_name in args.embedders:
            # The clip embedder needs CLIP weights; without a local checkpoint it is randomly
            # initialised, which measures nothing: say so rather than print a meaningless row.
            if emb_name == "clip" and not os.environ.get("CATIMAGE_CLIP_PRETRAINED"):
                console.print("[yellow]clip embedder skipped:[/] no CLIP weights can be downloaded here; set "
                              "CATIMAGE_CLIP_PRETRAINED to a local open_clip checkpoint (ViT-B-32) to include it")
                continue
            params = ({"model": os.environ.get("CATIMAGE_CLIP_MODEL", "ViT-B-32"),
                       "pretrained": os.environ["CATIMAGE_CLIP_PRETRAINED"]} if emb_name == "clip" else {})
            embedder = make_embedder(emb_name, **params)
            for est in args.estimators:
                start = time.perf_counter()
                report = evaluate_table(matrix, costs, est, {}, embedder, test_frac=0.1, val_frac=0.1, seed=0,
                                        trials=args.trials, cost_unit=pool.cost_unit)
                s, t = report["summary"], report["summary"]["trials"]
                table.add_row(
                    est, emb_name, str(s["best_fixed"]), _f(s["quality_at_best_fixed_cost"]),
                    _f(s["cost_ratio_to_match_best_fixed"]), _f(s["area_over_hull"]), _f(s["oracle_gain_fraction"]),
                    _f(t.get("win_rate")), _pm(t, "quality_at_best_fixed_cost"), _pm(t, "area_over_hull"),
                    f"{time.perf_counter() - start:.0f}",
                )
                console.print(f"[dim]{set_name} {est}+{emb_name}: {time.perf_counter() - start:.0f} s[/]")
        console.print(table)


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pm(trials: dict, key: str) -> str:
    mean, std = trials.get(f"mean_{key}"), trials.get(f"std_{key}")
    return "n/a" if mean is None else f"{mean:.3f}±{(std or 0):.3f}"


if __name__ == "__main__":
    main()
