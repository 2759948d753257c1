"""The plan executor (serve/plan_executor.py) and the Scorer deployment (serve/scorer_deployment.py).

First in-process, against planted draw/score functions whose scores are fixed per candidate, with
the expected attempts worked out by hand from the plan's stop rule (catimage/policy/plans.py).
Then for real: a Serve app with planted generators (a grey picture scene_score gives 0, the
prompt's own rendered scene scene_score gives 1), the real world generator small-2, the real
Scorer deployment running scene_score, and a harness running the executor inside a replica.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from train_serve_fixtures import kill_replica_mid_run, replica_actors

from catimage.policy.plans import Plan, executed_attempts
from serve.plan_executor import NoImageDrawn, PlanExecutor, attempt_seeds, served_rows

COSTS = {"a": 1.0, "b": 2.0, "c": 4.0}
SCORE_COST = 0.25


def _planted(scores: dict[str, float | Exception], fail_draw: set[str] = frozenset()):
    """draw -> b'<candidate>:<seed>'; score -> the candidate's planted score (or raise it)."""
    calls = {"draw": [], "score": []}

    async def draw(candidate: str, prompt: str, seed: int) -> bytes:
        calls["draw"].append(candidate)
        if candidate in fail_draw:
            raise RuntimeError(f"{candidate} is down")
        return f"{candidate}:{seed}".encode()

    async def score(prompt: str, image: bytes) -> float:
        candidate = image.decode().split(":")[0]
        calls["score"].append(candidate)
        value = scores[candidate]
        if isinstance(value, Exception):
            raise value
        return value

    return draw, score, calls


def _run(plan: Plan, scores, parallel: int = 1, fail_draw=frozenset()):
    draw, score, calls = _planted(scores, fail_draw)
    ex = PlanExecutor(draw, score, COSTS, SCORE_COST)
    run = asyncio.run(ex.run(plan, "p", [11, 12, 13, 14][: len(plan.attempts)], parallel))
    return run, calls


def test_escalates_past_a_failing_draw_and_accepts_the_first_pass():
    # a scores 0.2 < 0.5: escalate; b scores 0.7 >= 0.5: accept; c is never drawn.
    run, calls = _run(Plan(("a", "b", "c"), 0.5), {"a": 0.2, "b": 0.7, "c": 0.9})
    assert calls["draw"] == ["a", "b"]
    assert run.returned == 1 and run.image == b"b:12"
    assert [a.accepted for a in run.attempts] == [False, True]
    assert run.cost == pytest.approx(1.0 + 0.25 + 2.0 + 0.25)


def test_every_attempt_fails_returns_the_best_scoring_and_ties_go_to_the_earliest():
    run, _ = _run(Plan(("a", "b", "c"), 0.95), {"a": 0.6, "b": 0.6, "c": 0.3})
    assert [a.candidate for a in run.attempts] == ["a", "b", "c"]
    assert run.returned == 0  # a and b tie at 0.6: the earlier one
    assert run.cost == pytest.approx(1 + 2 + 4 + 3 * 0.25)


def test_parallel_waves_draw_k_at_once_and_keep_the_best_passing():
    # parallel 2: wave 1 = (a, b) both pass; b scores higher -> b, though a passed first.
    run, calls = _run(Plan(("a", "b", "c"), 0.5), {"a": 0.6, "b": 0.8, "c": 0.9}, parallel=2)
    assert sorted(calls["draw"]) == ["a", "b"] and run.returned == 1
    assert [a.wave for a in run.attempts] == [0, 0]
    # parallel 3: one wave of all three; c is best. Sequentially a (the first pass) would be returned.
    run, _ = _run(Plan(("a", "b", "c"), 0.5), {"a": 0.6, "b": 0.8, "c": 0.9}, parallel=3)
    assert run.returned == 2 and run.cost == pytest.approx(7 + 3 * 0.25)
    # parallel 2 where wave 1 fails: wave 2 (c) is drawn.
    run, _ = _run(Plan(("a", "b", "c"), 0.85), {"a": 0.6, "b": 0.8, "c": 0.9}, parallel=2)
    assert [a.wave for a in run.attempts] == [0, 0, 1] and run.returned == 2


def test_every_cost_is_reported_the_moment_it_is_paid():
    draw, score, _ = _planted({"a": 0.2, "b": 0.7, "c": 0.9})
    paid = []
    ex = PlanExecutor(draw, score, COSTS, SCORE_COST, on_paid=lambda a, x, scoring: paid.append((a.candidate, x, scoring)))
    run = asyncio.run(ex.run(Plan(("a", "b", "c"), 0.5), "p", [1, 2, 3]))
    assert paid == [("a", 1.0, False), ("a", 0.25, True), ("b", 2.0, False), ("b", 0.25, True)]
    assert sum(x for _, x, _ in paid) == pytest.approx(run.cost)


def test_routing_plan_is_drawn_once_and_never_scored():
    run, calls = _run(Plan.route("b"), {"b": 0.1})
    assert calls == {"draw": ["b"], "score": []}
    assert run.returned == 0 and run.attempts[0].score is None and run.cost == 2.0


def test_scorer_faults_leave_images_unscored_and_never_fail():
    # a's score raises: unscored, never passes, loses the best-of to b's 0.3.
    run, _ = _run(Plan(("a", "b"), 0.5), {"a": TimeoutError("slow"), "b": 0.3})
    assert run.returned == 1 and run.attempts[0].score is None and run.attempts[0].score_error == "slow"
    # every score raises: the last image drawn comes back, unscored; scoring was paid for each.
    run, _ = _run(Plan(("a", "b"), 0.5), {"a": RuntimeError("down"), "b": RuntimeError("down")})
    assert run.returned == 1 and run.chosen.score is None
    assert run.cost == pytest.approx(1 + 2 + 2 * 0.25)


def test_a_generator_fault_skips_the_attempt_and_costs_nothing():
    run, _ = _run(Plan(("a", "b"), 0.5), {"a": 0.9, "b": 0.2}, fail_draw={"a"})
    assert run.attempts[0].draw_error == "a is down" and run.attempts[0].cost == 0
    assert run.returned == 1 and run.cost == pytest.approx(2.25)
    with pytest.raises(NoImageDrawn, match="a is down"):
        _run(Plan(("a", "a"), 0.5), {"a": 0.9}, fail_draw={"a"})


def test_sequential_execution_matches_the_reference_stop_rule():
    """parallel=1 draws exactly what catimage.policy.plans.executed_attempts says, on random scores."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        k = int(rng.integers(1, 5))
        attempts = tuple(rng.choice(["a", "b", "c"], size=k))
        threshold = None if rng.random() < 0.2 else float(rng.choice([0.3, 0.5, 0.7]))
        plan = Plan(attempts, threshold)
        scores = [float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])) for _ in range(k)]
        it = iter(scores)

        async def draw(c, p, s):
            return b"x"

        async def score(p, im, it=it):
            return next(it)

        run = asyncio.run(PlanExecutor(draw, score, COSTS, SCORE_COST).run(plan, "p", list(range(k))))
        assert (len(run.attempts), run.returned) == executed_attempts(plan, scores), (plan, scores)


def test_attempt_seeds_are_fresh_and_attempt_zero_is_what_routing_draws():
    from catimage.generators import generation_seed

    seeds = attempt_seeds("pid", 4)
    assert seeds[0] == generation_seed("pid", 0) and len(set(seeds)) == 4
    assert attempt_seeds("pid", 3, seed=2**31 - 1) == [2**31 - 1, 0, 1]
    with pytest.raises(ValueError, match="fresh seed"):
        asyncio.run(PlanExecutor(None, None, COSTS).run(Plan(("a", "b"), 0.5), "p", [5, 5]))


def test_served_rows_are_one_per_image_drawn():
    run, _ = _run(Plan(("a", "b", "c"), 0.5), {"a": 0.2, "b": 0.7, "c": 0.9}, fail_draw={"a"})
    rows = served_rows(run, "p", "pid", "r1", "scene_decider", policy="cascade", propensity=0.9)
    assert [(r.candidate, r.attempt, r.returned) for r in rows] == [("b", 1, True)]
    assert rows[0].scores == {"scene_decider": 0.7} and rows[0].pool_cost == 2.0 and rows[0].decision_cost == 0.25


def test_scorer_isolates_the_pair_that_fails():
    """In one batch, a prompt scene_score cannot read fails alone; the others keep their scores."""
    from serve_planted import planted_png

    from serve.scorer_deployment import Scorer

    scorer = Scorer.func_or_class({"name": "scene_score"})  # the class itself, in-process
    prompt = "one red circle"
    out = scorer._score_all(
        [prompt, "a photo of a cat", prompt],
        [planted_png("render", prompt, 1), planted_png("blank", prompt, 1), planted_png("blank", prompt, 2)],
    )
    assert out[0] == {"score": 1.0} and out[2] == {"score": 0.0}
    assert out[1]["score"] is None and "scene-world prompts only" in out[1]["error"]


# --- real Serve ----------------------------------------------------------------------------------

PROMPTS = ["one red circle", "two blue squares", "a green triangle above a yellow circle",
           "a purple square to the left of a red triangle"]
KILL_APP = "cascade"


@pytest.fixture(scope="module")
def served(serve_url):
    from ray import serve
    from serve_planted import PlanHarness, Planted, Stuck

    from catimage.metrics.spec import MetricSpec
    from catimage.tables.pool import Autoscaling, load_pool
    from serve.generator_deployment import Generator
    from serve.scorer_deployment import Scorer, ScorerServeArgs, scorer_options

    world = load_pool(Path(__file__).resolve().parents[1] / "catimage/data/world_pool.yaml").get("small-2")
    costs = {"blank": 1.0, "render": 2.0, "small-2": 1.044349}
    spec = MetricSpec(name="scene_score", batch_size=16, num_cpus=0)
    fixed = ScorerServeArgs(autoscaling=Autoscaling(min_replicas=2, max_replicas=2))
    scorer = Scorer.options(**scorer_options(spec, fixed)).bind(spec.model_dump())
    planted = Planted.bind()
    gens = {
        "blank": planted,
        "render": planted,
        "small-2": Generator.options(name="Gen-small-2", ray_actor_options={"num_cpus": 0}).bind(
            "small-2", world.generator.model_dump(mode="json")),
    }
    harness = PlanHarness.bind(gens, {"real": scorer, "stuck": Stuck.bind()}, costs, 0.1,
                               {"real": 30.0, "stuck": 0.5}, {"blank": "blank", "render": "render"})
    yield serve.run(harness, name=KILL_APP, route_prefix=None)
    serve.delete(KILL_APP)


def _png_equal(png: bytes, expected: bytes) -> bool:
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    b = np.asarray(Image.open(io.BytesIO(expected)).convert("RGB"))
    return a.shape == b.shape and bool((a == b).all())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_planted_failing_generator_escalates_to_another_candidate(served):
    from serve_planted import planted_png

    from catimage.tables.table import stable_prompt_id

    prompt = PROMPTS[2]
    out = served.run.remote({"attempts": ["blank", "render"], "threshold": 0.5}, prompt).result()
    first, second = out["attempts"]
    assert first["candidate"] == "blank" and first["decision_score"] == 0.0 and not first["accepted"]
    assert second["candidate"] == "render" and second["decision_score"] == 1.0 and second["accepted"]
    assert out["returned"] == 1
    seeds = attempt_seeds(stable_prompt_id(prompt), 2)
    assert [first["seed"], second["seed"]] == seeds
    assert _png_equal(out["image"], planted_png("render", prompt, seeds[1]))
    assert out["cost"] == pytest.approx(1.0 + 2.0 + 2 * 0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_wave_with_the_real_world_generator_keeps_the_best(served):
    """render (scene_score 1, the maximum) first, then the real small-2 and blank in the same wave, no
    early acceptance: every image is drawn and scored, and render's wins (ties go to the earliest)."""
    out = served.run.remote(
        {"attempts": ["render", "small-2", "blank"], "threshold": None}, PROMPTS[1], 3).result()
    assert [a["candidate"] for a in out["attempts"]] == ["render", "small-2", "blank"]
    assert all(a["scored"] and 0.0 <= a["decision_score"] <= 1.0 for a in out["attempts"])
    assert [a["wave"] for a in out["attempts"]] == [0, 0, 0]
    assert out["returned"] == 0 and out["attempts"][2]["decision_score"] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_or_failing_scorer_returns_the_image_unscored(served):
    before = served.failures.remote("stuck").result().get("timeout", 0)
    out = served.run.remote({"attempts": ["blank", "render"], "threshold": 0.5}, PROMPTS[0], scorer="stuck").result()
    assert [a["scored"] for a in out["attempts"]] == [False, False]
    assert out["returned"] == 1  # no score at all: the last image drawn
    assert all("no score within 0.5 s" in a["score_error"] for a in out["attempts"])
    assert served.failures.remote("stuck").result()["timeout"] == before + 2
    # The real scorer cannot read this prompt: an error per image, counted, and still an image.
    out = served.run.remote({"attempts": ["blank", "blank"], "threshold": 0.5}, "a photo of a cat").result()
    assert out["returned"] == 1 and out["image"] is not None
    assert all("scene-world prompts only" in a["score_error"] for a in out["attempts"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scorer_replica_killed_under_load_fails_no_request(served):

    replicas = replica_actors(KILL_APP, "Scorer-scene_score")
    assert len(replicas) == 2
    handle = served
    before = sum(handle.failures.remote().result().values())

    def ask(i: int) -> dict:
        return handle.run.remote({"attempts": ["blank", "render"], "threshold": 0.5}, PROMPTS[i % 4], 1, i).result()

    results = kill_replica_mid_run(ask, 40, 6, replicas[0])  # raises if any request failed
    assert len(results) == 40 and all(r["image"] is not None for r in results)
    unscored = sum(a["score_error"] is not None for r in results for a in r["attempts"])
    assert sum(handle.failures.remote().result().values()) - before == unscored
    # Whatever was scored follows the planted signal: blank fails, render passes.
    for r in results:
        for a in r["attempts"]:
            if a["scored"]:
                assert a["decision_score"] == (0.0 if a["candidate"] == "blank" else 1.0)
    assert replicas[0] not in replica_actors(KILL_APP, "Scorer-scene_score")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_router_hands_its_prompt_tokens_to_a_world_generator(served):
    """small-2 conditions on MiniLM, the router's embedder: the Drawer asks it once which features it
    takes, then each draw brings the prompt's tokens and the replica encodes nothing (counted by the
    replica); the pictures are those the prompts draw. Tokens of another embedder are not sent."""
    from ray import serve

    from catimage.features.registry import make_embedder
    from serve.drawing import Drawer
    from serve.router import RouterMetrics

    handle = serve.get_deployment_handle("Gen-small-2", app_name=KILL_APP)
    minilm = make_embedder("minilm")  # the test's own encoder, standing for the router's
    prompts = PROMPTS[:2]
    tokens = dict(zip(prompts, minilm.encode_with_tokens(prompts)[1]))
    alone = [handle.remote(p, 5, True).result() for p in prompts]  # encoded by the replica

    async def draw(identity: dict) -> list:
        drawer = Drawer({"small-2": handle}, {"small-2": 120.0}, 0, 1.0, RouterMetrics(),
                        prompt_tokens=lambda p: (identity, tokens[p]))
        return [await drawer.draw(p, ["small-2"], 5, True, lambda _c: None) for p in prompts]

    before = handle.stats.remote().result()["given_tokens"]
    drawn = asyncio.run(draw(minilm.identity()))
    assert handle.stats.remote().result()["given_tokens"] == before + 2
    assert all(_png_equal(d.png, a) for d, a in zip(drawn, alone))
    asyncio.run(draw(make_embedder("minilm", path="/models/another-minilm").identity()))
    assert handle.stats.remote().result()["given_tokens"] == before + 2
