"""Time and peak memory of `evaluate` on a 10,000-prompt table (prints; asserts nothing).

    python benchmarks/synthetic_table.py --out runs/synth10k          # once
    python benchmarks/evaluate_scale.py --table runs/synth10k/quality.parquet --pool runs/synth10k/pool.yaml \\
        --estimator transformer --trials 2 [--torch-threads 1]

Runs `catimage.evaluation.trials.evaluate_table` exactly as `catimage evaluate` does (MiniLM through the
on-disk embedding cache: the first run embeds, later ones read the cache) and prints, per trial,
wall seconds, CPU seconds and the area over the hull, then the process's peak resident memory and
the machine's load average before and after. The targets: at most 120 s per trial (issue 15) and
under 3 GB on 2 cores. Wall time depends on what else runs on the machine: the estimator fits on one
torch thread, so on an idle machine a trial's wall time is about its CPU time; with a load average
above the core count, quote CPU seconds, and the figure to quote is a median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--estimator", default="transformer")
    parser.add_argument("--embedder", default="minilm")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--estimator-params", default="{}",
                        help='JSON object, e.g. \'{"patience": 20}\' (the transformer\'s old fixed patience)')
    args = parser.parse_args()

    import torch

    from catimage.evaluation.trials import EvaluateOptions, evaluate_table
    from catimage.features.cache import CachedEmbedder
    from catimage.features.registry import make_embedder
    from catimage.tables.table import load_pool_matrix

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pool, matrix, costs = load_pool_matrix(args.table, args.pool)
    embedder = CachedEmbedder(make_embedder(args.embedder))
    marks = [(time.perf_counter(), time.process_time())]
    areas: list[float] = []

    def progress(line: str) -> None:
        print(f"  {line}", flush=True)
        if " done in " in line:
            marks.append((time.perf_counter(), time.process_time()))
            areas.append(float(line.split("area over hull ")[1].split(",")[0]))

    load_before = os.getloadavg()
    start = time.perf_counter()
    report = evaluate_table(
        matrix, costs, EvaluateOptions(estimator=args.estimator, estimator_params=json.loads(args.estimator_params),
                                       embedder=embedder, trials=args.trials,
                                       cost_unit=pool.cost_unit, bootstrap=args.bootstrap), progress=progress,
    )
    total = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.estimator} {args.estimator_params} + {args.embedder} on {matrix.n_prompts} prompts x {len(matrix.candidates)} candidates, "
          f"torch threads {torch.get_num_threads()} (the transformer fits on its own n_threads, default 1)")
    walls, cpus = [], []
    for t in range(1, len(marks)):
        walls.append(marks[t][0] - marks[t - 1][0])
        cpus.append(marks[t][1] - marks[t - 1][1])
        note = " (includes reading/embedding the prompts)" if t == 1 else ""
        print(f"trial {t}: {walls[-1]:.0f} s wall, {cpus[-1]:.0f} s CPU, area over hull {areas[t - 1]:+.4f}{note}")
    later = slice(1, None) if len(walls) > 1 else slice(None)
    print(f"per trial (median{' of trials 2..' + str(len(walls)) if len(walls) > 1 else ''}): "
          f"{statistics.median(walls[later]):.0f} s wall, {statistics.median(cpus[later]):.0f} s CPU; target <= 120 s")
    print(f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    print(f"total {total:.0f} s; peak resident memory {peak_gb:.2f} GB")
    t = report["summary"]["trials"]
    print(f"area over hull {t['mean_area_over_hull']:+.4f}, cost ratio (misses counted) {t['mean_cost_ratio_or_miss']:.3f}")


if __name__ == "__main__":
    main()
