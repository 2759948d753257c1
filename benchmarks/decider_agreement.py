"""How well the scene decider agrees with scene_score on held-out scenes, and what a cascade earns with it.

    python benchmarks/decider_agreement.py                      # the shipped decider, all 1,000 table prompts
    python benchmarks/decider_agreement.py --prompts 200 --candidates small-4
    python benchmarks/decider_agreement.py --decider /tmp/decider --work /tmp/decider_bench

1. Pictures: the shipped world table's HELD-OUT prompts (catimage/data/world_table.parquet) redrawn for
   `--candidates` (default small-4 and small-16-g3) with seeds 0..3, exactly as the build job draws
   them (checked: the redrawn pictures' scene_score must equal the table's), cached under `--work`.
   The development set (heldout_prompts(300, seed=99), disjoint from the table's and the demo's
   scenes) is drawn the same way for small-4 (4 seeds) and small-16-g3 (2 seeds).
2. Agreement of each decider with scene_score: RMSE, Spearman over all pictures and mean Spearman
   within a prompt, pass/fail agreement at 0.7 / 0.8 / 0.85 / 0.9.
3. The cascade "small-4; while decision < t and draws < 4, redraw with the next seed; keep the best
   by decision", judged by scene_score, cost = draws x (small-4's cost + the decider's cost), for
   deciders: scene_score itself (the upper bound), scene_score + Gaussian noise (sigma 0.05, 0.1,
   0.2; `--noise-trials` draws of the noise), the decider raw (rule score on its reading) and
   calibrated. Printed: the cost ratio to reach small-16-g3's mean quality on these prompts
   (interpolated between swept thresholds, "miss" if none reaches it), and the honest figure: the
   threshold chosen on the development set, applied to the table's prompts (quality and cost ratio).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TABLE = ROOT / "catimage" / "data" / "world_table.parquet"
CHEAP, REFERENCE = "small-4", "small-16-g3"
SEEDS = 4
MAX_DRAWS = 4
DEV_SEED, DEV_PROMPTS = 99, 300
NOISE = (0.05, 0.1, 0.2)


def table_sets(work: Path, candidates: list[str], n_prompts: int | None) -> dict[str, object]:
    """Redrawn pictures of the table's prompts per candidate, checked against the table's scores."""
    import pyarrow.parquet as pq

    from catimage.world.decider_sets import draw_cached

    table = pq.read_table(TABLE).to_pandas()
    first = table[(table.candidate == CHEAP) & (table.seed == 0)]
    prompts, ids = list(first.prompt), list(first.prompt_id)
    if n_prompts:
        prompts, ids = prompts[:n_prompts], ids[:n_prompts]
    out = {}
    for cand in candidates:
        tick = time.perf_counter()
        rated = draw_cached(work / f"table-{len(ids)}-{cand}.npz", cand, prompts, ids, SEEDS)
        ref = table[table.candidate == cand].set_index(["prompt_id", "seed"]).scene_score
        diff = np.abs(ref.loc[list(zip(rated.prompt_ids, rated.seeds.astype(int)))].to_numpy() - rated.scores)
        print(f"{cand}: {len(rated)} pictures ({time.perf_counter() - tick:.0f} s); redrawn scene_score vs the "
              f"table's: max |diff| {diff.max():.2e}, {np.mean(diff < 1e-6):.1%} within 1e-6")
        out[cand] = rated
    return out


def dev_sets(work: Path) -> dict[str, object]:
    from catimage.world import heldout_prompts
    from catimage.world.decider_sets import draw_cached, prompt_id

    prompts = heldout_prompts(DEV_PROMPTS, seed=DEV_SEED)
    ids = [prompt_id(p) for p in prompts]
    return {CHEAP: draw_cached(work / f"dev-{CHEAP}.npz", CHEAP, prompts, ids, SEEDS),
            REFERENCE: draw_cached(work / f"dev-{REFERENCE}.npz", REFERENCE, prompts, ids, 2)}


def decide(decider: object, rated: object, calibrated: bool) -> np.ndarray:
    from catimage.world.parse import parse

    specs = [parse(str(p)) for p in rated.prompts]
    return np.concatenate([decider.score(specs[i : i + 256], list(rated.images[i : i + 256]), calibrated=calibrated)
                           for i in range(0, len(specs), 256)])


def matrix(values: np.ndarray) -> np.ndarray:
    """Rows are stored prompt-major, seed-minor: (prompts, SEEDS)."""
    return values.reshape(-1, SEEDS)


def fmt_ratio(cost: float | None, reference_cost: float) -> str:
    return "miss" if cost is None else f"{cost / reference_cost:.3f}"


def main(argv: list[str] | None = None) -> int:
    import torch

    from catimage.world.decider import SceneDecider, shipped_dir
    from catimage.world.decider_eval import agreement, cascade, cascade_curve, cost_to_match, threshold_for
    from catimage.world.decider_sets import pool_candidates

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decider", type=Path, default=None, help="decider folder (default: the shipped one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/decider_bench"), help="where pictures are cached")
    p.add_argument("--prompts", type=int, default=None, help="first N table prompts (default: all)")
    p.add_argument("--candidates", nargs="+", default=[CHEAP, REFERENCE])
    p.add_argument("--noise-trials", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if CHEAP not in args.candidates:
        args.candidates.insert(0, CHEAP)

    decider = SceneDecider.load(args.decider or shipped_dir())
    import json

    config = json.loads(((args.decider or shipped_dir()) / "decider.json").read_text())
    decider_cost = float(config.get("gflops_per_image", 0.0))
    costs = {name: float(c["cost"]) for name, c in pool_candidates().items()}
    ref_cost = costs[REFERENCE]
    print(f"decider: {args.decider or shipped_dir()} ({decider_cost:.4f} GFLOPs per image); "
          f"{CHEAP} {costs[CHEAP]:.3f}, {REFERENCE} {ref_cost:.3f} GFLOPs")

    sets = table_sets(args.work, args.candidates, args.prompts)
    dev = dev_sets(args.work)
    scores = {}
    for name, rated in {**{f"table/{k}": v for k, v in sets.items()}, **{f"dev/{k}": v for k, v in dev.items()}}.items():
        scores[name] = {"raw": decide(decider, rated, False), "calibrated": decide(decider, rated, True)}

    print("\n## Agreement with scene_score on generated pictures of HELD-OUT scenes")
    header = "| set | pictures | decider | RMSE | Spearman | within-prompt Spearman (prompts) | " + \
             " | ".join(f"pass/fail @{t}" for t in (0.7, 0.8, 0.85, 0.9)) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = [(f"table {c}", sets[c], scores[f"table/{c}"]) for c in sets]
    if len(sets) > 1:
        pooled = type(sets[CHEAP]).concat(list(sets.values()))
        rows.append(("table " + " + ".join(sets), pooled,
                     {k: np.concatenate([scores[f"table/{c}"][k] for c in sets]) for k in ("raw", "calibrated")}))
    rows.append((f"dev {CHEAP}", dev[CHEAP], scores[f"dev/{CHEAP}"]))
    for label, rated, dec in rows:
        groups = np.char.add(rated.candidates.astype(str), rated.prompt_ids.astype(str))
        for kind in ("raw", "calibrated"):
            a = agreement(dec[kind], rated.scores, groups)
            print(f"| {label} | {a.n} | {kind} | {a.rmse:.3f} | {a.spearman:.3f} | {a.within_spearman:.3f} "
                  f"({a.within_prompts}) | " + " | ".join(f"{a.pass_fail[t]:.3f}" for t in a.pass_fail) + " |")

    judge = matrix(sets[CHEAP].scores)
    target = float(np.mean(sets[REFERENCE].scores)) if REFERENCE in sets else None
    if target is None:
        import pyarrow.parquet as pq

        t = pq.read_table(TABLE).to_pandas()
        keep = set(sets[CHEAP].prompt_ids.tolist())
        target = float(t[(t.candidate == REFERENCE) & t.prompt_id.isin(keep)].scene_score.mean())
    dev_judge = matrix(dev[CHEAP].scores)
    dev_target = float(np.mean(dev[REFERENCE].scores))
    print(f"\n## Cascade: {CHEAP}, redraw while decision < t (at most {MAX_DRAWS} draws), keep the best by decision")
    print(f"table prompts: {judge.shape[0]}; {REFERENCE} mean scene_score {target:.4f} at {ref_cost:.3f} GFLOPs; "
          f"{CHEAP} alone {judge[:, 0].mean():.4f}. Dev prompts: {dev_judge.shape[0]}, {REFERENCE} {dev_target:.4f}.")
    print("| decider | decider GFLOPs | cost ratio to match (swept t) | t chosen on dev | table quality at that t | "
          "its cost ratio | mean draws |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)

    def report(name: str, dec_cost: float, table_dec: list[np.ndarray], dev_dec: list[np.ndarray]) -> None:
        unit = costs[CHEAP] + dec_cost
        ratios, chosen, quality, ratio_at, draws = [], [], [], [], []
        for d_table, d_dev in zip(table_dec, dev_dec):
            ratios.append(cost_to_match(cascade_curve(d_table, judge, unit), target))
            t = threshold_for(cascade_curve(d_dev, dev_judge, unit), dev_target)
            if t is None:
                continue
            n_draws, q = cascade(d_table, judge, t)
            chosen.append(t)
            quality.append(q)
            ratio_at.append(n_draws * unit / ref_cost)
            draws.append(n_draws)
        hits = [r for r in ratios if r is not None]
        misses = len(ratios) - len(hits)
        swept = fmt_ratio(float(np.mean(hits)) if hits else None, ref_cost) if len(ratios) == 1 else \
            (f"{np.mean(hits) / ref_cost:.3f} (+- {np.std(hits) / ref_cost:.3f}; {misses} miss of {len(ratios)})"
             if hits else f"miss ({misses} of {len(ratios)})")
        if chosen:
            print(f"| {name} | {dec_cost:.4f} | {swept} | {np.mean(chosen):.3f} | {np.mean(quality):.4f} | "
                  f"{np.mean(ratio_at):.3f} | {np.mean(draws):.2f} |")
        else:
            print(f"| {name} | {dec_cost:.4f} | {swept} | none reaches the dev target | - | - | - |")

    report("scene_score (upper bound)", 0.0, [judge], [dev_judge])
    for sigma in NOISE:
        table_noisy = [judge + rng.normal(0, sigma, judge.shape) for _ in range(args.noise_trials)]
        dev_noisy = [dev_judge + rng.normal(0, sigma, dev_judge.shape) for _ in range(args.noise_trials)]
        report(f"scene_score + N(0, {sigma})", 0.0, table_noisy, dev_noisy)
    for kind in ("raw", "calibrated"):
        report(f"scene_decider ({kind})", decider_cost, [matrix(scores[f"table/{CHEAP}"][kind])],
               [matrix(scores[f"dev/{CHEAP}"][kind])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
