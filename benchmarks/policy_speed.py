"""How fast the policy math runs: routing's exact sweep and the cascade's plan values, sweep and calibration.

    python benchmarks/policy_speed.py [--repeats 3]

Prints the median wall seconds (and CPU seconds) of: the exact deferral curve of routing at the paper's
scale (5,000 prompts x 12 candidates); the expected value and cost of every plan for 7 candidates x up
to 4 attempts x 6 thresholds (16,765 plans) on 200 prompts; the per-prompt Pareto pruning, the exact
cascade sweep and lambda calibration on those. These were wall-clock asserts in tests once; timings
belong here (they depend on what else the machine runs: compare CPU seconds).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from catimage.policy.cascade import DrawStats, enumerate_plans, plan_values
from catimage.policy.routing import calibrate_lambda, deferral_curve_arrays, pareto_options


def timed(fn, repeats: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pred, costs = rng.random((5000, 12)), rng.random(12) * 3
    rows = [("routing curve, 5,000 prompts x 12 candidates", timed(lambda: deferral_curve_arrays(pred, costs, pred), args.repeats))]
    n, m = 200, 7
    dec = rng.random((n, m, 16))
    stats = DrawStats.from_samples([f"c{j}" for j in range(m)], dec, dec + rng.normal(0, 0.1, dec.shape),
                                   np.linspace(0.05, 0.95, 19))
    plans = enumerate_plans(stats.candidates, 4, list(stats.thresholds[[3, 6, 9, 12, 15, 18]]))
    cand_costs = np.linspace(1, 6, m)
    rows.append((f"plan values, {len(plans)} plans x {n} prompts", timed(lambda: plan_values(stats, plans, cand_costs, 0.05), args.repeats)))
    value, cost = plan_values(stats, plans, cand_costs, 0.05)
    rows.append(("per-prompt Pareto pruning of those", timed(lambda: pareto_options(value, cost), args.repeats)))
    rows.append(("cascade curve (pruning + exact sweep)", timed(lambda: deferral_curve_arrays(value, cost, value), args.repeats)))
    rows.append(("cascade lambda calibration", timed(lambda: calibrate_lambda(value, cost, 2.0), args.repeats)))
    for label, (wall, cpu) in rows:
        print(f"{label:50s} {wall:7.3f} s wall  {cpu:7.3f} s CPU (median of {args.repeats})")


if __name__ == "__main__":
    main()
