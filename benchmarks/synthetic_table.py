"""A 10,000-prompt synthetic quality table with a planted prompt x candidate interaction.

    python benchmarks/synthetic_table.py --out runs/synth10k [--prompts 10000] [--seed 0]

writes `quality.parquet` (one automatic score per cell, measured seconds per image in the `cost`
column, like the held-out judge set: 4 fast candidates, count 1, no per-cell variance) and
`pool.yaml` (cost unit seconds, costs from the table). It exists to measure scale (time and memory
of `catimage evaluate` on 10k prompts) and to check that estimators find an interaction that is
there; its figures say nothing about real generators.

Prompts are real varied text: PartiPrompts and GenEval (when ../shared/data is beside the checkout)
plus scene-world prompts (`catimage.world.describe`). The score is

    q[i, m] = a_i + b_m + g_m(x_i) + noise,   noise ~ N(0, 0.6), a_i ~ N(0, 0.8) - 0.3 c(x_i)

where a_i (prompt difficulty) dominates the variance and the interaction g_m depends on generic
prompt properties (complexity c: words, object counts, spatial words; photo style; quoted text):
cheap candidates lose on complex prompts, the dearest one gains there.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("turbo-1step", "lcm-4step", "sd15-20step", "sdxl-30step")
SECONDS = np.array([0.8, 1.5, 2.6, 4.2])
MEANS = np.array([-0.30, -0.10, 0.05, 0.20])
_NUMBER = re.compile(r"\b(two|three|four|five|six|pair|several|many|\d+)\b")
_SPATIAL = re.compile(r"\b(left|right|above|below|over|under|beneath|behind|top|bottom|next to|on top|center|middle)\b")


def real_prompts(data: Path) -> list[str]:
    """PartiPrompts + GenEval prompts, if the shared data folder is there."""
    out: list[str] = []
    parti = data / "prompts" / "PartiPrompts.tsv"
    if parti.is_file():
        out += [line.split("\t")[0] for line in parti.read_text().splitlines()[1:] if line.strip()]
    geneval = data / "prompts" / "geneval_prompts.txt"
    if geneval.is_file():
        out += [line.strip() for line in geneval.read_text().splitlines() if line.strip()]
    return out


def make_prompts(n: int, seed: int, data: Path) -> list[str]:
    """n distinct prompts: the real ones first, scene-world prompts for the rest."""
    from catimage.world import describe, sample_spec

    rng = np.random.default_rng(seed)
    seen: dict[str, None] = dict.fromkeys(p for p in real_prompts(data) if p)
    while len(seen) < n:
        seen.setdefault(describe(sample_spec(rng), rng))
    prompts = list(seen)[:n]
    rng.shuffle(prompts)
    return prompts


def prompt_properties(prompts: list[str]) -> dict[str, np.ndarray]:
    """Generic properties the planted interaction depends on."""
    words = np.array([len(p.split()) for p in prompts], dtype=np.float64)
    numbers = np.array([len(_NUMBER.findall(p.lower())) + p.lower().count(" and ") for p in prompts], dtype=np.float64)
    spatial = np.array([len(_SPATIAL.findall(p.lower())) for p in prompts], dtype=np.float64)
    photo = np.array(["photo" in p.lower() or "realistic" in p.lower() for p in prompts], dtype=np.float64)
    quote = np.array(['"' in p or "'" in p for p in prompts], dtype=np.float64)
    raw = 0.5 * (words - words.mean()) / words.std() + numbers + spatial
    complexity = (raw - raw.mean()) / raw.std()
    return {"complexity": complexity, "photo": photo, "quote": quote}


def planted_interaction(props: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 4) prompt x candidate interaction g_m(x)."""
    c, photo, quote = props["complexity"], props["photo"], props["quote"]
    return np.stack(
        [
            -0.35 * c + 0.20 * photo - 0.2 * quote,
            -0.20 * c - 0.20 * photo + 0.25 * quote,
            0.05 * c + 0.05 * photo,
            0.30 * c - 0.15 * photo,
        ],
        axis=1,
    )


def make_table(n: int = 10_000, seed: int = 0, data: Path | None = None, noise: float = 0.6) -> pa.Table:
    """The long-form quality table (one row per prompt x candidate)."""
    from catimage.tables.table import stable_prompt_id

    data = data if data is not None else ROOT.parent / "shared" / "data"
    prompts = make_prompts(n, seed, data)
    rng = np.random.default_rng(seed + 1)
    props = prompt_properties(prompts)
    offset = rng.normal(0, 0.8, n) - 0.3 * props["complexity"]
    quality = offset[:, None] + MEANS[None, :] + planted_interaction(props) + rng.normal(0, noise, (n, len(CANDIDATES)))
    seconds = SECONDS[None, :] * rng.lognormal(0, 0.05, (n, len(CANDIDATES)))
    ids = [stable_prompt_id(p) for p in prompts]
    m = len(CANDIDATES)
    return pa.table(
        {
            "prompt_id": np.repeat(ids, m).tolist(),
            "prompt": np.repeat(prompts, m).tolist(),
            "candidate": list(CANDIDATES) * n,
            "cost": seconds.ravel(),
            "score": quality.ravel(),
        }
    )


def main() -> None:
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "synth10k")
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = make_table(args.prompts, args.seed, args.data)
    pq.write_table(table, args.out / "quality.parquet")
    pool = {
        "cost_unit": "seconds",
        "costs_assumed": False,
        "description": "synthetic 10k-prompt table with a planted interaction (benchmarks/synthetic_table.py)",
        "candidates": [{"name": c} for c in CANDIDATES],
    }
    (args.out / "pool.yaml").write_text(yaml.safe_dump(pool, sort_keys=False))
    print(f"wrote {args.out / 'quality.parquet'} ({table.num_rows} rows) and {args.out / 'pool.yaml'}")


if __name__ == "__main__":
    main()
