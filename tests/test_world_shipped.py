"""The shipped scene world: trained generators, the world table, the fitted router, the pool's costs.

Expected values come from the world's design, not from re-running the code under test: a routed
simple scene must cost less than a routed complex one, and routing must beat the prompt-agnostic
mixture of candidates on every re-drawn split of the shipped table.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from catimage.generators import make_generator
from catimage.tables.pool import load_pool

DATA = Path(str(resources.files("catimage") / "data"))
POOL = DATA / "world_pool.yaml"
TABLE = DATA / "world_table.parquet"
ROUTER = DATA / "world_router"


@pytest.fixture(scope="module")
def pool():
    return load_pool(POOL)


def test_shipped_generators_load_and_are_deterministic_per_seed():
    for name in ("mini", "small"):
        gen = make_generator({"model": f"world:{name}", "steps": 4, "scheduler": "ddim", "guidance_scale": 2.0}, device="cpu")
        a = gen.generate(["a red circle", "two blue squares"], [3, 4])
        b = gen.generate(["two blue squares"], [4])
        c = gen.generate(["two blue squares"], [5])
        assert a[0].size == (32, 32)
        assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))
        assert not np.array_equal(np.asarray(b[0]), np.asarray(c[0]))


def test_trained_generator_draws_what_a_simple_prompt_asks(pool):
    """A trained model, unlike a random one, draws "a red circle" well: the verifier agrees on most seeds."""
    from catimage.metrics import make_scorer

    gen = make_generator(pool.get("small-16-g3").generator, device="cpu")
    prompts = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]
    images = gen.generate(prompts * 2, list(range(8)))
    scores = make_scorer("scene_score").score(prompts * 2, images)
    assert scores.mean() > 0.8


def test_pool_costs_are_the_counted_gflops(pool):
    from catimage.tables.cost import count_pool_costs

    counted = count_pool_costs(pool, unit="gflops")
    assert pool.cost_unit == "gflops"
    for cand in pool.candidates:
        assert cand.cost == pytest.approx(counted[cand.name], rel=1e-6)


def test_shipped_table_is_held_out_scenes_times_every_candidate(pool):
    from catimage.tables.table import aggregate, read_quality_table
    from catimage.world import is_heldout, parse

    matrix = aggregate(read_quality_table(TABLE), metric="scene_score", candidates=pool.names)
    assert matrix.n_prompts >= 1000 and (matrix.count >= 4).all()
    assert all(is_heldout(parse(p)) for p in matrix.prompts)
    demo = [p for p in (DATA / "world_demo_prompts.txt").read_text().splitlines() if p.strip()]
    assert not {parse(p).key() for p in demo} & {parse(p).key() for p in matrix.prompts}


def test_routing_beats_the_mixture_hull_on_every_split(pool):
    from catimage.evaluation.trials import EvaluateOptions, evaluate_table
    from catimage.features.registry import make_embedder
    from catimage.model.router_model import RouterModel
    from catimage.tables.table import load_pool_matrix

    estimator = RouterModel.load(ROUTER).estimator.kind
    _, matrix, costs = load_pool_matrix(TABLE, POOL, metric="scene_score")
    report = evaluate_table(matrix, costs, EvaluateOptions(
        estimator=estimator, embedder=make_embedder("minilm"), test_frac=0.2, calibration_frac=0.1, seed=0, trials=5,
        cost_unit=pool.cost_unit))
    areas = [t["area_over_hull"] for t in report["per_trial"]]
    assert min(areas) > 0, areas


def test_shipped_router_learned_the_tables_guidance_by_object_count_interaction(pool):
    """At two steps, guidance makes lone objects vanish but helps crowded scenes: in the shipped table
    (read here with the verifier's parser, which the router never sees) small-2's lead over
    small-2-g2 is far larger on one-object prompts than on four-object ones. The router, fitted on
    prompt text alone, must predict the same direction on prompts it never saw."""
    from catimage.model.router_model import RouterModel
    from catimage.tables.table import aggregate, read_quality_table
    from catimage.world import parse

    matrix = aggregate(read_quality_table(TABLE), metric="scene_score", candidates=pool.names)
    objects = np.array([parse(p).n_objects for p in matrix.prompts])
    i, j = matrix.candidates.index("small-2"), matrix.candidates.index("small-2-g2")
    lead = matrix.mean[:, i] - matrix.mean[:, j]
    assert lead[objects == 1].mean() > lead[objects == 4].mean() + 0.05  # the world's fact, from the table

    router = RouterModel.load(ROUTER)
    lone = ["a red circle", "a blue square", "a green triangle", "a small yellow circle", "one purple triangle"]
    crowded = [
        "two small blue squares, a red circle and a large green triangle",
        "a blue circle in the top left corner, a red square below a yellow triangle and a purple circle",
        "three green triangles and a small red square",
        "a yellow square, a purple circle, a red triangle and a blue circle",
    ]
    pred_lead = lambda prompts: float(np.mean(router.predict(prompts)[:, [i, j]] @ [1.0, -1.0]))
    assert router.candidates == matrix.candidates
    assert pred_lead(lone) > pred_lead(crowded)
