"""Adding a candidate without retraining vs a full retrain, on the shared rated sets (prints; asserts nothing).

    python benchmarks/add_candidate.py [--trials 5] [--labels 25 50 100] [--estimator twoway-knn] [--markdown]

For each set, split, and candidate c: fit the router without c (train / calibration / test split as
`catimage evaluate` draws it), then add c back with `RouterModel.add_candidate` from its labels on
25, 50 or 100 random training prompts (with the other candidates' labels on those prompts, as a
user who scores the new generator on prompts of the existing table has them), and route the test
prompts over all candidates. Baselines on the same split: the full retrain (fitted with c from the
start) and "mean only" (c added with its mean offset from 100 prompts, no interaction). Prints the
mean over splits and left-out candidates of area over the hull, gain at the best fixed
candidate's cost and the cost ratio to match it (misses counted as the worst ratio). Costs are the
ASSUMED illustrative ones of configs/*_pool.yaml.
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

import numpy as np
from rated_sets import SETS, SHARED_DATA, load_set

from catimage.evaluation.figures import evaluate_predictions
from catimage.features.cache import CachedEmbedder
from catimage.features.registry import make_embedder
from catimage.features.stage import FeatureCache
from catimage.model.router_model import fit_router
from catimage.tables.table import QualityMatrix, split_prompts

FIGURES = ("area_over_hull", "gain_at_best_fixed_cost", "cost_ratio_or_miss")


def drop_column(matrix: QualityMatrix, j: int) -> QualityMatrix:
    keep = [k for k in range(len(matrix.candidates)) if k != j]
    return QualityMatrix(
        matrix.prompt_ids, matrix.prompts, [matrix.candidates[k] for k in keep], matrix.metric,
        matrix.mean[:, keep], matrix.count[:, keep], matrix.var[:, keep], matrix.cost[keep],
        None if matrix.half is None else matrix.half[:, :, keep],
    )


def figures(pred: np.ndarray, true: np.ndarray, costs: np.ndarray, names: list[str]) -> list[float]:
    keep = np.isfinite(true).all(axis=1)
    s = evaluate_predictions(pred[keep], true[keep], costs, names).summary
    return [s[f] for f in FIGURES]


def run_set(name: str, data: Path, trials: int, labels: list[int], estimator: str) -> dict[str, list[list[float]]]:
    pool, matrix, costs, _ = load_set(name, data)
    embedder = CachedEmbedder(make_embedder("minilm"))
    features = FeatureCache()
    out: dict[str, list[list[float]]] = {}
    rng = np.random.default_rng(0)
    for t in range(trials):
        split = split_prompts(matrix.n_prompts, 0.1, 0.1, seed=t)
        test_prompts = [matrix.prompts[i] for i in split.test]
        true = matrix.mean[split.test]
        full = fit_router(matrix, costs, pool.cost_unit, split.train, split.calibration, estimator=estimator,
                          embedder=embedder, features=features)
        full_fig = figures(full.predict(test_prompts), true, costs, matrix.candidates)
        for j, cand in enumerate(matrix.candidates):
            start = time.perf_counter()
            base_matrix = drop_column(matrix, j)
            base_costs = np.delete(costs, j)
            base = fit_router(base_matrix, base_costs, pool.cost_unit, split.train, split.calibration, estimator=estimator,
                              embedder=embedder, features=features)
            out.setdefault("full retrain", []).append(full_fig)
            order = base.base_candidates + [cand]
            cols = [matrix.candidates.index(c) for c in order]
            labelled = split.train[np.isfinite(matrix.mean[split.train, j])]
            for n_lab in labels:
                pick = rng.choice(labelled, size=min(n_lab, labelled.size), replace=False)
                variants = [(f"added from {n_lab} prompts", True)]
                if n_lab == max(labels):
                    variants.append((f"mean only ({n_lab} prompts)", False))
                for label, interactions in variants:
                    model = _copy(base)
                    model.add_candidate(
                        cand, float(costs[j]), [matrix.prompts[i] for i in pick], matrix.mean[pick, j],
                        counts=matrix.count[pick, j].astype(float), base_labels=base_matrix.mean[pick],
                        interactions=interactions,
                    )
                    out.setdefault(label, []).append(
                        figures(model.predict(test_prompts), true[:, cols], costs[cols], order))
            print(f"  {name} trial {t + 1}/{trials}: {cand} left out and added back "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def _copy(model):
    import copy

    return copy.deepcopy(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--labels", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--estimator", default="twoway-knn")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.sets:
        res = run_set(name, args.data, args.trials, args.labels, args.estimator)
        print(f"\n{name}: {args.estimator} + minilm, {args.trials} splits x every candidate left out in turn "
              "(mean ± std over those runs)")
        for method, vals in res.items():
            arr = np.asarray(vals, dtype=np.float64)
            cells = [f"{arr[:, k].mean():+.3f} ± {arr[:, k].std():.3f}" for k in range(2)]
            cells.append(f"{arr[:, 2].mean():.2f} ± {arr[:, 2].std():.2f}")
            print(f"  {method:28s} area over hull {cells[0]}   gain at best fixed {cells[1]}   cost ratio {cells[2]}"
                  f"   (n={len(vals)})")
            rows.append([name, method, *cells])
    if args.markdown:
        print("\n| set | router | area over hull | gain at best fixed cost | cost ratio to match best |")
        print("|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
