"""Generated pictures rated by the judge: the decider's calibration set and its agreement sets.

A `RatedSet` is a flat list of (prompt, candidate, seed index) rows with the drawn 32 x 32 picture
and its `scene_score`. Two uses, kept apart by the scenes they draw on:

* calibration (`training_prompts`): prompts of TRAINING scenes (never `is_heldout`); their
  scene_score is the label of the decider's small calibration head;
* agreement (`heldout_prompts` dev set, or the shipped table's prompts): HELD-OUT scenes, only ever
  used to report how well the decider agrees with the judge, never to fit or tune it.

Pictures are drawn as the build job draws them (`catimage.tables.build`): per candidate, rows in
(prompt, seed) order, generator batches of the candidate's `build.batch_size`, seed
`generation_seed(prompt_id, seed_index)`; so the shipped table's rows reproduce exactly.
Sets are stored as .npz (uint8 pictures, no pickle) outside the repository.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from catimage.world.grammar import describe, sample_specs

log = logging.getLogger(__name__)

POOL_FILE = "world_pool.yaml"


def pool_candidates() -> dict[str, dict[str, Any]]:
    """The shipped world pool's candidates by name (name, cost, generator, build blocks).

    Read straight from the YAML rather than through the pool loader: the decider only needs the
    generator blocks and costs, and this keeps `catimage.world` free of the top-level modules."""
    import yaml

    text = (resources.files("catimage") / "data" / POOL_FILE).read_text()
    return {c["name"]: c for c in yaml.safe_load(text)["candidates"]}


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt (seeds derive from it)."""
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def training_prompts(n: int, seed: int) -> list[str]:
    """`n` paraphrased prompts of distinct TRAINING scenes (never held out)."""
    rng = np.random.default_rng(seed)
    return [describe(s, rng) for s in sample_specs(rng, n, heldout=False)]


@dataclass
class RatedSet:
    """Rows of (prompt_id, prompt, candidate, seed) with their picture and scene_score."""

    prompt_ids: np.ndarray  # (N,) str
    prompts: np.ndarray  # (N,) str
    candidates: np.ndarray  # (N,) str
    seeds: np.ndarray  # (N,) int
    images: np.ndarray  # (N, 32, 32, 3) uint8
    scores: np.ndarray  # (N,) float64 scene_score

    def __len__(self) -> int:
        return len(self.scores)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, prompt_ids=self.prompt_ids.astype(str), prompts=self.prompts.astype(str),
                            candidates=self.candidates.astype(str), seeds=self.seeds, images=self.images,
                            scores=self.scores)
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RatedSet:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["prompt_ids"], z["prompts"], z["candidates"], z["seeds"], z["images"], z["scores"])

    def select(self, mask: np.ndarray) -> RatedSet:
        return RatedSet(self.prompt_ids[mask], self.prompts[mask], self.candidates[mask], self.seeds[mask],
                        self.images[mask], self.scores[mask])

    @classmethod
    def concat(cls, sets: list[RatedSet]) -> RatedSet:
        return cls(*(np.concatenate([getattr(s, f) for s in sets]) for f in
                     ("prompt_ids", "prompts", "candidates", "seeds", "images", "scores")))


def draw(candidate: str, prompts: list[str], ids: list[str], seeds: int, device: str = "cpu") -> RatedSet:
    """Every (prompt, seed index < seeds) picture of one pool candidate, rated by scene_score,
    drawn in the build job's order and batch size."""
    from catimage.generators import generation_seed, make_generator
    from catimage.world.verify import scene_score

    block = pool_candidates()[candidate]
    batch = int(block.get("build", {}).get("batch_size", 32))
    gen = make_generator(block["generator"], device=device)
    rows_p = [p for p in prompts for _ in range(seeds)]
    rows_id = [i for i in ids for _ in range(seeds)]
    rows_s = [k for _ in prompts for k in range(seeds)]
    images: list[np.ndarray] = []
    start = time.perf_counter()
    for lo in range(0, len(rows_p), batch):
        hi = lo + batch
        seeds_ = [generation_seed(i, k) for i, k in zip(rows_id[lo:hi], rows_s[lo:hi])]
        images += [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in gen.generate(rows_p[lo:hi], seeds_)]
    scores = np.array([scene_score(p, im) for p, im in zip(rows_p, images)])
    log.info("%s: %d pictures in %.0f s, mean scene_score %.3f", candidate, len(images),
             time.perf_counter() - start, scores.mean() if len(scores) else float("nan"))
    n = len(rows_p)
    return RatedSet(np.array(rows_id), np.array(rows_p), np.array([candidate] * n), np.array(rows_s),
                    np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8), scores)


def draw_cached(path: str | Path, candidate: str, prompts: list[str], ids: list[str], seeds: int) -> RatedSet:
    """`draw`, stored at `path` and reloaded from there when it holds exactly these rows."""
    path = Path(path)
    if path.is_file():
        rated = RatedSet.load(path)
        if list(rated.prompt_ids[:: max(1, seeds)]) == list(ids) and len(rated) == len(ids) * seeds:
            return rated
        log.warning("%s holds other rows; drawing again", path)
    rated = draw(candidate, prompts, ids, seeds)
    rated.save(path)
    return rated
