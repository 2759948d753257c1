"""Planted Serve deployments for the cascade / logging / swap tests: generators whose images a scorer
is known to pass or fail, a scorer that never answers, and a harness that runs the plan executor
inside a Serve replica (where the router runs it).

* `Planted("blank")` draws a plain grey 32x32 picture: scene_score gives it 0 for any scene prompt
  (no object is there), so it always fails a threshold above 0.
* `Planted("render")` draws the prompt's scene with the world's renderer (a ground-truth picture,
  layout drawn from the seed): scene_score gives it 1.
* `Stuck` is a scorer that never answers (a hung replica): only the caller's timeout ends the wait.

Serve pickles these classes by value (the test folder is not on the workers' import path).
"""

from __future__ import annotations

import asyncio
import io
import sys
from typing import Any

import numpy as np
import ray.cloudpickle
from ray import serve

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BLANK_RGB = (128, 128, 128)


def planted_png(kind: str, prompt: str, seed: int) -> bytes:
    """The picture a planted generator draws (also used by tests to know what to expect)."""
    import numpy as np
    from PIL import Image

    from catimage.world.grammar import realize
    from catimage.world.parse import parse
    from catimage.world.render import render

    if kind == "blank":
        image = Image.new("RGB", (32, 32), BLANK_RGB)
    elif kind == "render":
        image = render(realize(parse(prompt), np.random.default_rng(seed)))
    else:
        raise ValueError(f"unknown planted generator {kind!r}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Planted:
    """Planted generators with the real Generator's call signature: `__call__` draws the `kind` given
    at bind time; the methods `blank` and `render` draw theirs (one process for both:
    `handle.options(method_name="blank")` is then the blank generator's handle)."""

    def __init__(self, kind: str | None = None) -> None:
        self.kind = kind

    async def __call__(self, prompt: str, seed: int, want_image: bool = True) -> bytes | None:
        return planted_png(self.kind, prompt, seed) if want_image else None

    async def blank(self, prompt: str, seed: int, want_image: bool = True) -> bytes | None:
        return planted_png("blank", prompt, seed) if want_image else None

    async def render(self, prompt: str, seed: int, want_image: bool = True) -> bytes | None:
        return planted_png("render", prompt, seed) if want_image else None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Stuck:
    """A scorer replica that hangs: it takes the pair and never answers."""

    async def __call__(self, prompt: str, image: Any) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"score": None}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class PlanHarness:
    """Runs plans with the real PlanExecutor and ScorerClient against generator and scorer handles."""

    def __init__(
        self, generators: dict, scorers: dict, costs: dict, score_cost: float, timeouts_s: dict,
        methods: dict | None = None,
    ) -> None:
        """`methods`: candidate -> method of its deployment to call (Planted's `blank` / `render`)."""
        from serve.plan_executor import PlanExecutor
        from serve.scorer_deployment import ScorerClient

        methods = methods or {}
        self.generators = {k: h.options(method_name=methods.get(k, "__call__")) for k, h in generators.items()}
        self.clients = {k: ScorerClient(h, "scene_score", timeout_s=timeouts_s[k], retries=1) for k, h in scorers.items()}
        self.executors = {k: PlanExecutor(self._draw, c, costs, score_cost) for k, c in self.clients.items()}

    async def _draw(self, candidate: str, prompt: str, seed: int) -> bytes:
        return await self.generators[candidate].remote(prompt, seed, True)

    async def run(
        self, plan: dict, prompt: str, parallel: int = 1, seed: int | None = None, scorer: str = "real",
    ) -> dict[str, Any]:
        from catimage.policy.plans import Plan
        from catimage.tables.table import stable_prompt_id
        from serve.plan_executor import attempt_seeds

        plan_ = Plan.from_dict(plan)
        seeds = attempt_seeds(stable_prompt_id(prompt), len(plan_.attempts), seed)
        done = await self.executors[scorer].run(plan_, prompt, seeds, parallel)
        return {"attempts": [a.to_dict() for a in done.attempts], "returned": done.returned,
                "image": done.image, "cost": done.cost}

    def failures(self, scorer: str = "real") -> dict[str, int]:
        return dict(self.clients[scorer].failures)


# --- planted models: what a router / cascade fitted on a planted table believes about blank / render ---

PLANTED_COSTS = {"blank": 1.0, "render": 2.0}
SCORE_COST = 0.1


def planted_pool(path) -> str:
    """A pool declaring the planted candidates (no generator blocks: tests bind Planted deployments)
    and scene_score as its decision metric at SCORE_COST per image."""
    import yaml

    data = {"cost_unit": "gflops",
            "metrics": [{"name": "scene_score", "batch_size": 16, "num_cpus": 0, "cost": SCORE_COST}],
            "decision_metric": "scene_score",
            "candidates": [{"name": n, "cost": c, "serve": {"num_cpus": 0, "request_timeout_s": 30}}
                           for n, c in PLANTED_COSTS.items()]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def planted_app(args, user_config=None, code_version=None):
    """The real Router (serve.app.compose: scorer, served log, coordinator as `args` asks) in front
    of the Planted generators: `blank` draws grey, `render` the prompt's own scene."""
    from catimage.tables.pool import load_pool
    from serve.app import compose
    from serve.serving_model import bundle_meta

    def deployment(name: str):
        dep = Planted.options(name=name)
        return dep if code_version is None else dep.options(version=code_version, _internal=True)

    gens = {"blank": deployment("PlantedBlank").bind("blank"), "render": deployment("PlantedRender").bind("render")}
    return compose(args, gens, load_pool(args.pool), bundle_meta(args.model_dir), user_config=user_config,
                   code_version=code_version)


def planted_world_table(blank_pass: float, blank_judge: float, n_prompts: int = 40, seed: int = 0):
    """4 seeds per (prompt, candidate): blank's draws pass (scene_score 0.9, judge `blank_judge`) with
    probability `blank_pass`, else fail (0.1, judge 0.1); render's always pass (1.0, judge 0.9)."""
    import numpy as np
    import pyarrow as pa

    from catimage.tables.table import stable_prompt_id
    from catimage.world.grammar import heldout_prompts

    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "scene_score", "judge")}
    for prompt in heldout_prompts(n_prompts, seed=31):
        for cand in PLANTED_COSTS:
            for s in range(4):
                passed = cand == "render" or rng.random() < blank_pass
                decision = 1.0 if cand == "render" else (0.9 if passed else 0.1)
                judge = 0.9 if cand == "render" else (blank_judge if passed else 0.1)
                for key, value in zip(rows, (stable_prompt_id(prompt), prompt, cand, s, decision, judge)):
                    rows[key].append(value)
    return pa.table(rows)


def fit_planted_model(out, blank_pass: float, blank_judge: float, cascade: bool) -> str:
    """A cascade bundle (decision scene_score, judge `judge`) or a router bundle on the planted table."""
    from catimage.features.registry import make_embedder
    from catimage.model.cascade_model import CascadeOptions, fit_cascade
    from catimage.tables.draws import draws_from_table
    from catimage.tables.table import aggregate, split_prompts

    table = planted_world_table(blank_pass, blank_judge)
    names = list(PLANTED_COSTS)
    matrix = aggregate(table, "judge", names)
    draws = draws_from_table(table, names, "scene_score", "judge")
    split = split_prompts(matrix.n_prompts, 0.0, 0.25, seed=1)
    costs = np.asarray([PLANTED_COSTS[n] for n in names])
    model = fit_cascade(matrix, draws, costs, "gflops", split.train, split.calibration, score_cost=SCORE_COST,
                        options=CascadeOptions(max_attempts=2, plan_thresholds=(0.5,)), estimator="knn",
                        estimator_params={"k": 5}, embedder=make_embedder("tfidf", dim=None))
    if cascade:
        return str(model.save(out))
    return str(model.router.save(out))
