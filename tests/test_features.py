"""Ragged token storage, prompt statistics and the combined embedder."""

from __future__ import annotations

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.estimators import make_estimator
from catimage.features.combined import STAT_NAMES, prompt_statistics
from catimage.features.registry import load_embedder, make_embedder
from catimage.features.stage import FeatureCache
from catimage.features.tokens import TokenBatch


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(t, 5)).astype(np.float32) for t in (3, 1, 6, 2)]


def test_token_batch_round_trip_and_views():
    arrays = _arrays()
    tb = TokenBatch.from_arrays(arrays)
    assert tb.shape == (4, 6, 5) and tb.data.dtype == np.float16 and len(tb) == 4
    padded = tb.padded()
    for i, a in enumerate(arrays):
        np.testing.assert_allclose(padded[i, : len(a)], a, atol=2e-3)  # float16 storage
        assert not padded[i, len(a):].any()  # zero rows = padding
    sub = tb[np.array([2, 0])]
    assert sub.data is tb.data  # a view: no token data copied
    np.testing.assert_array_equal(sub.padded(), tb.padded(np.array([2, 0])))
    again = TokenBatch.from_padded(padded)
    np.testing.assert_array_equal(again.lengths, [3, 1, 6, 2])


def test_token_batch_keeps_an_all_zero_real_token_visible():
    tb = TokenBatch.from_arrays([np.zeros((2, 3), np.float32)])
    assert np.any(tb.padded()[0] != 0, axis=-1).all()  # the mask still sees two tokens


def test_transformer_predicts_the_same_from_ragged_and_padded():
    rng = np.random.default_rng(1)
    arrays = _arrays(1) * 10
    Y = rng.random((len(arrays), 2))
    tb = TokenBatch.from_arrays(arrays)
    est = make_estimator("transformer", width=16, heads=2, layers=1, max_epochs=2).fit(tb, Y)
    np.testing.assert_allclose(est.predict(tb), est.predict(tb.padded()), atol=1e-6)


def test_prompt_statistics_by_hand():
    stats = prompt_statistics(['two red cubes left of a "STOP" sign, photo', "cat"])
    row = dict(zip(STAT_NAMES, stats[0]))
    assert row["numerals"] == 1 and row["colours"] == 1 and row["spatial"] == 1
    assert row["quoted"] == 1 and row["quoted_words"] == 1 and row["commas"] == 1
    assert row["text"] == 1 and row["style"] == 1
    assert stats[1, STAT_NAMES.index("log_words")] == pytest.approx(np.log(2))


def test_combined_embedder_fit_save_load(tmp_path):
    prompts = ["a red cube", "two blue spheres on a table", "a photo of a cat", "an oil painting of a ship",
               "three green cones left of a box", "a sign that says 'open'"]
    emb = make_embedder("combined", text={"name": "tfidf", "dim": None}, tfidf_dim=3, cache=False)
    with pytest.raises(CatimageError, match="not fitted"):
        emb.encode(prompts)
    emb.fit(prompts)
    X = emb.encode(prompts)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    assert X.shape[1] == emb.dim
    emb.save(tmp_path)
    again = load_embedder(tmp_path)
    np.testing.assert_allclose(again.encode(prompts), X, rtol=1e-6)
    assert again.cache_key() == emb.cache_key()


def test_feature_cache_reuses_and_refreshes():
    calls = []

    class Counting:
        def __init__(self, tag: str):
            self.tag = tag

        def cache_key(self) -> str:
            return self.tag

        def encode(self, prompts):
            calls.append(self.tag)
            return np.ones((len(prompts), 2), np.float32)

    cache = FeatureCache()
    a = Counting("a")
    cache.get(a, ["x", "y"], "pooled")
    cache.get(a, ["x", "y"], "pooled")
    assert calls == ["a"]
    cache.get(Counting("b"), ["x", "y"], "pooled")  # a refitted embedder: a new identity
    assert calls == ["a", "b"]
