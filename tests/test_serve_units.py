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
    assert lam == pytest.approx(1e-6 / (4 * np.finfo(float).eps * 8.0))
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
