"""The pure pieces the Serve app is built from, without Ray: load-aware ranking, the lambda precision
bound, API keys, the router's embedding cache, request schemas."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.features.registry import make_embedder
from catimage.policy.routing import expected_wait_s, max_precise_lambda, route, utility_ranking


def test_utility_ranking_matches_a_brute_force_sort_and_route():
    rng = np.random.default_rng(1)
    pred = np.round(rng.random((200, 4)), 1)  # many exact ties
    costs = np.array([2.0, 1.0, 2.0, 3.0])
    for lam in (0.0, 0.05, 0.2, 1.0):
        order = utility_ranking(pred, costs, lam)
        assert (order[:, 0] == route(pred, costs, lam)).all()
        for i in range(0, 200, 17):  # brute force: every permutation, sorted by (-utility, cost, index)
            util = pred[i] - lam * costs
            best = min(itertools.permutations(range(4)), key=lambda p: [(-util[j], costs[j], j) for j in p])
            assert order[i].tolist() == list(best)


def test_a_load_penalty_moves_the_choice_by_hand():
    pred = np.array([[0.90, 0.88, 0.50]])
    costs = np.array([1.0, 1.0, 1.0])
    assert utility_ranking(pred, costs, 0.0)[0].tolist() == [0, 1, 2]
    # Candidate 0 has 5 requests ahead on 1 slot at 1 s each -> 5 s; mu 0.01/s -> 0.05 > 0.02 gap.
    wait = expected_wait_s([5, 0, 0], [1, 1, 1], [1.0, 1.0, 1.0])
    assert wait.tolist() == [5.0, 0.0, 0.0]
    assert utility_ranking(pred, costs, 0.0, 0.01 * wait)[0].tolist() == [1, 0, 2]
    assert utility_ranking(pred, costs, 0.0, 0.001 * wait)[0].tolist() == [0, 1, 2]  # 0.005 < 0.02


def test_expected_wait_by_hand():
    # 3 in flight on 2 slots: the newcomer is the 4th, 2 beyond the slots, served 2 at a time -> 1 service.
    assert expected_wait_s([3], [2], [4.0]).tolist() == [4.0]
    assert expected_wait_s([1], [2], [4.0]).tolist() == [0.0]  # a free slot: no wait
    assert expected_wait_s([2], [0], [4.0], cold_start_s=30.0).tolist() == [38.0]  # no replica: cold start + queue


def test_max_precise_lambda_is_where_rounding_swamps_the_resolution():
    costs = np.array([1.0, 8.0])
    lam = max_precise_lambda(costs, 1e-6)
    # By hand: a utility of size lam * 8 is rounded to within a few ulps (2**-52 relative); the bound
    # keeps 4 ulps of it below the resolution: 4 * 2**-52 * 8 * lam = 1e-6, so lam = 2**47 * 1e-6.
    assert lam == pytest.approx(140737488.355328, rel=1e-12)
    # Below the bound two predictions 1e-6 apart at equal cost are still told apart; far above it not.
    pred = np.array([[0.5, 0.5 + 1e-6]])
    same = np.array([8.0, 8.0])
    assert route(pred, same, lam / 10)[0] == 1
    assert route(pred, same, lam * 1e6)[0] == 0  # rounding decided it: what the router refuses to serve


def test_api_keys():
    from serve.auth import ApiKeys

    keys = ApiKeys.parse("alice:" + "a" * 20 + ", batch:" + "b" * 20)
    assert keys.name_for("Bearer " + "a" * 20) == "alice"
    assert keys.name_for("bearer " + "b" * 20) == "batch"
    assert keys.name_for("Bearer " + "c" * 20) is None
    assert keys.name_for("Basic " + "a" * 20) is None and keys.name_for(None) is None
    assert ApiKeys.parse("z" * 32).names == {"z" * 32: "default"}
    with pytest.raises(CatimageError, match="shorter than 16"):
        ApiKeys.parse("short")
    with pytest.raises(CatimageError, match="not set"):
        ApiKeys.from_env("CATIMAGE_SURELY_UNSET_VARIABLE")
    assert ApiKeys.from_env(None) is None


def test_embedding_cache_returns_the_wrapped_embedders_values_and_evicts():
    from serve.embedding_cache import LruEmbeddingCache

    prompts = ["a red cat", "a blue boat", "a green tree", "a red cat"]
    inner = make_embedder("tfidf").fit(prompts + ["a yellow house"])
    cache = LruEmbeddingCache(inner, size=2)
    np.testing.assert_array_equal(cache.encode(prompts), inner.encode(prompts))
    assert cache.misses == 3 and cache.hits == 1
    np.testing.assert_array_equal(cache.encode_tokens(["a green tree"]), inner.encode_tokens(["a green tree"]))
    assert cache.hits == 2  # still cached: the 2 most recently used are "a green tree" and "a red cat"
    cache.encode(["a blue boat"])  # used before those two, so evicted at size 2 -> a miss
    assert cache.misses == 4 and cache.hits == 2


def test_embedding_cache_hands_out_cached_tokens_only():
    """What a generator with the same text encoder gets with a draw: the inner embedder's own tokens
    for a cached prompt, with its identity; nothing (and no model run) for an uncached or evicted one."""
    from serve.embedding_cache import LruEmbeddingCache

    inner = make_embedder("tfidf").fit(["a red cat", "a blue boat", "a green tree"])
    cache = LruEmbeddingCache(inner, size=1)
    assert cache.features_of("a red cat") is None and cache.misses == 0
    cache.encode(["a red cat"])
    identity, tokens = cache.features_of("a red cat")
    assert identity == inner.identity()
    np.testing.assert_array_equal(tokens, inner.encode_with_tokens(["a red cat"])[1][0])
    cache.encode(["a blue boat"])  # size 1: "a red cat" is evicted
    assert cache.features_of("a red cat") is None and cache.misses == 2


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "a\ud800"}, "lone surrogate (U+D800) at character 1"),
        ({"prompt": "a cat", "budget": True}, "budget must be a number, not true"),
        ({"prompt": "a cat", "seed": False}, "seed must be a number, not false"),
        ({"prompt": "a cat", "candidate": "x" * 129}, "at most 128 characters"),
    ],
)
def test_generate_request_schema_rejects(body, needle):
    from pydantic import ValidationError

    from serve.schemas import GenerateRequest

    with pytest.raises(ValidationError, match=re.escape(needle)):
        GenerateRequest.model_validate(body)


# --- the budget controller's ledger -------------------------------------------------------------------


def test_a_failed_sync_keeps_every_cost_in_order():
    import asyncio

    from serve.ledger import CostLedger, sync

    ledger = CostLedger()
    ledger.record("*", 2.0)
    ledger.record("*", 6.0)
    ledger.record("alice", 8.0)
    sent: list[dict] = []

    async def down(pending: dict) -> dict:
        raise ConnectionError("coordinator unreachable")

    async def up(pending: dict) -> dict:
        sent.append(pending)
        return {"*": 0.5}

    assert asyncio.run(sync(ledger, down)) is None
    ledger.record("*", 1.0)  # recorded while the coordinator was down: after the kept ones
    assert ledger.pending() == {"*": [2.0, 6.0, 1.0], "alice": [8.0]}
    assert asyncio.run(sync(ledger, up)) == {"*": 0.5}
    assert sent == [{"*": [2.0, 6.0, 1.0], "alice": [8.0]}] and ledger.pending() == {}


def _controller():
    from catimage.policy.budget import BudgetController, ControllerConfig

    # ki 0.5, no proportional term, scale 1, budget 2, lambda 1: each step is 0.5 x surplus / 2 by hand
    return BudgetController(ControllerConfig(budget=2.0, window=10, ki=0.5, kp=0.0, max_step=10.0), lam_offline=1.0,
                            scale=1.0)


def test_feed_forward_entries_commit_at_decision_and_correct_when_paid():
    from serve.ledger import CostLedger, apply_entries

    ledger = CostLedger()
    ledger.commit("*", 4.0)
    ctrl = _controller()
    apply_entries(ctrl, ledger.take()["*"])
    assert ctrl.lam == 1.5 and ctrl.in_flight == 1  # 1 + 0.5 x (4 - 2) / 2, before anything is paid
    ledger.pay("*", 3.0, 4.0)
    apply_entries(ctrl, ledger.take()["*"])
    assert ctrl.lam == 1.25 and ctrl.in_flight == 0 and ctrl.observed == 1  # + 0.5 x (3 - 4) / 2
    ledger.commit("*", 4.0)
    ledger.pay("*", 0.0, 4.0)  # nothing drawn: the commitment is withdrawn, nothing observed
    apply_entries(ctrl, ledger.take()["*"])
    assert ctrl.lam == 1.25 and ctrl.in_flight == 0 and ctrl.observed == 1


def test_a_cost_whose_commitment_the_controller_never_saw_is_observed_alone():
    from serve.ledger import CostLedger, apply_entries

    ledger = CostLedger()
    ledger.pay("*", 3.0, 4.0)  # committed to a coordinator replica that has since restarted
    ctrl = _controller()
    apply_entries(ctrl, ledger.take()["*"])
    assert ctrl.lam == 1.25 and ctrl.in_flight == 0 and ctrl.observed == 1  # 1 + 0.5 x (3 - 2) / 2


# --- lambda: pinned requests feed no controller --------------------------------------------------------


def test_pinned_requests_get_the_controllers_lambda_but_no_controller_key():
    from serve.lambdas import LambdaPolicy

    policy = LambdaPolicy(lambda b: {4.0: 0.25, 7.0: 0.1}[b], lam_precise_max=1e6, lam_saturated=10.0, default_budget=4.0)
    policy.start_controllers({"*": 4.0, "other": 7.0})
    assert policy.resolve(None, None, "other", controlled=True) == (0.1, "other")
    assert policy.resolve(None, None, "nobody", controlled=True) == (0.25, "*")
    assert policy.resolve(None, None, "other", controlled=False) == (0.1, None)
    assert policy.resolve(7.0, None, "other", controlled=True) == (0.1, None)  # own budget: not controlled


# --- start-up checks: embedder overrides, budgets, cluster resources ------------------------------------


def _app_args(**kw):
    from serve.schemas import AppArgs

    return AppArgs.model_validate({"model_dir": "m", "pool": "p.yaml", **kw})


@pytest.mark.parametrize("overrides", [{"backend": "onnx"}, {"device": "cpu", "batch_size": 8}])
def test_runtime_embedder_overrides_are_accepted(overrides):
    assert _app_args(embedder_overrides=overrides).embedder_overrides == overrides


@pytest.mark.parametrize("overrides", [{"quantize": "int8"}, {"name": "tfidf"}, {"tfidf_dim": 64, "device": "cpu"}])
def test_overrides_that_change_the_fitted_embedder_are_refused(overrides):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"would change what the fitted embedder computes; only runtime options"):
        _app_args(embedder_overrides=overrides)


def test_a_controller_needs_a_positive_budget():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"budget_controller needs a budget > 0"):
        _app_args(budget=0.0, budget_controller={"window": 10})
    assert _app_args(budget=0.0).budget == 0.0  # a budget of 0 alone is fine (a pool with a free candidate)


def test_budgets_below_the_cheapest_cost_are_refused_at_start_up():
    from catimage.errors import BudgetError
    from serve.app import check_budgets

    costs = {"a": 2.0, "b": 8.0}
    check_budgets(_app_args(budget=2.0, budget_controller={"per_key_budgets": {"k": 3.0}}), costs, "gflops")
    with pytest.raises(BudgetError, match=r"^budget 1.5 is below the cheapest candidate's cost \(a: 2 gflops\)"):
        check_budgets(_app_args(budget=1.5), costs, "gflops")
    with pytest.raises(BudgetError, match=r"per_key_budgets.k 1 is below"):
        check_budgets(_app_args(budget=4.0, budget_controller={"per_key_budgets": {"k": 1.0}}), costs, "gflops")
    free = {"free": 0.0, "b": 8.0}
    check_budgets(_app_args(budget=0.0), free, "usd")  # routes everything to the free candidate: fine


def test_cluster_check_names_what_is_missing_unless_nodes_may_join():
    from catimage.errors import CatimageError
    from catimage.tables.pool import Candidate
    from serve.app import generator_options
    from serve.resources import check_app_fits, deployment_demand

    gpu = Candidate.model_validate({"name": "sdxl", "cost": 1.0, "serve": {"num_gpus": 1, "num_cpus": 4,
                                                                          "autoscaling": {"min_replicas": 2, "max_replicas": 4}}})
    demand = [deployment_demand("Generator-sdxl", generator_options(gpu))]
    assert (demand[0].actors, demand[0].cpu, demand[0].gpu) == (2, 4.0, 1.0)
    cpu_only = {"CPU": 2.0, "memory": 8e9}
    with pytest.raises(CatimageError) as err:
        check_app_fits(demand, cpu_only, cpu_only, can_grow=False, wait_for_resources=False)
    text = str(err.value)
    assert "8 CPU in all, the cluster has 2 CPU" in text and "2 GPU in all, the cluster has 0 GPU" in text
    assert "one `deployment Generator-sdxl` actor asks 4 CPU, 1 GPU, the largest node has 2 CPU, 0 GPU" in text
    assert "wait_for_resources: true" in text
    check_app_fits(demand, cpu_only, cpu_only, can_grow=True, wait_for_resources=False)  # an autoscaler may add nodes
    check_app_fits(demand, cpu_only, cpu_only, can_grow=False, wait_for_resources=True)
    big = {"CPU": 16.0, "GPU": 2.0}
    check_app_fits(demand, big, big, can_grow=False, wait_for_resources=False)


# --- control characters and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "code", "at"), [("a\x00b", "0000", 1), ("ab\x1b[0m", "001B", 2), ("\x85next", "0085", 0)])
def test_control_characters_in_prompts_are_refused(prompt, code, at):
    from pydantic import ValidationError

    from serve.schemas import GenerateRequest

    with pytest.raises(ValidationError, match=re.escape(f"control character (U+{code}) at character {at}")):
        GenerateRequest.model_validate({"prompt": prompt})
    assert GenerateRequest.model_validate({"prompt": "tab\there\nnew line\r\n"}).prompt.startswith("tab")


def test_size_filter_says_what_is_offered():
    from fastapi import HTTPException

    from serve.openai_api import order_for_size

    sizes = {"a": "64x64", "b": None, "c": "1024x1024"}
    assert order_for_size(["c", "b", "a"], "64x64", sizes, None) == ["a"]
    assert order_for_size(["c", "b", "a"], "auto", sizes, None) == ["c", "b", "a"]
    with pytest.raises(HTTPException) as err:
        order_for_size(["a", "b", "c"], "512x512", sizes, None)
    assert err.value.detail == "size '512x512' is not offered; sizes offered, by candidate: a 64x64, c 1024x1024"
    with pytest.raises(HTTPException) as err:
        order_for_size(["a", "b"], "64x64", sizes, "b")
    assert err.value.detail.startswith("model 'b' declares no size, not size '64x64'")
    with pytest.raises(HTTPException) as err:
        order_for_size(["a", "b"], "32x32", {"a": None, "b": None}, None)
    assert "this pool declares no size for any candidate" in err.value.detail


# --- the fitted embedder, served with runtime options ----------------------------------------------------


def test_a_fitted_combined_embedder_is_served_fitted_with_runtime_options(tmp_path, tiny_cache):
    """The bundle's combined embedder (MiniLM + a fitted TF-IDF + statistics) loaded with runtime
    options predicts exactly what the fitted model does; before, it was rebuilt unfitted."""
    from train_serve_fixtures import planted_prompts, tiny_pool_dict, write_planted_table, write_pool

    from catimage.model.router_model import RouterModel
    from jobs.train_estimator import run_train
    from serve.bundle import load_router_model

    table = write_planted_table(tmp_path / "table.parquet")
    pool = write_pool(tmp_path / "pool.yaml", tiny_pool_dict())
    model_dir = run_train(table, pool, tmp_path / "model", estimator="knn", embedder="combined").model_dir
    prompts = [p for p, _ in planted_prompts()][:12] + ["an owl on a shop banner that reads EXIT"]
    expected = RouterModel.load(model_dir).predict(prompts)
    served = load_router_model(model_dir, {"batch_size": 4, "backend": "onnx"}, cache_size=16)
    assert served.embedder.inner._text.inner.batch_size == 4 and served.embedder.inner._text.inner.backend == "onnx"
    np.testing.assert_allclose(served.predict(prompts), expected, atol=1e-5)


def test_minilm_through_onnx_runtime_equals_torch(tiny_cache):
    prompts = ["two red squares above a blue circle", "a cat", "x " * 300]  # the last one is truncated alike
    torch_out = make_embedder("minilm").encode_with_tokens(prompts)
    onnx_out = make_embedder("minilm", backend="onnx").encode_with_tokens(prompts)
    np.testing.assert_allclose(onnx_out[0], torch_out[0], atol=1e-5)
    for a, b in zip(onnx_out[1], torch_out[1]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)
