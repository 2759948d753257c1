"""Embedders: shapes, normalisation, zero padding, real MiniLM semantics, tiny CLIP, tfidf save/load, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catimage.errors import CatimageError
from catimage.features.base import pad_token_arrays
from catimage.features.cache import CachedEmbedder
from catimage.features.registry import load_embedder, make_embedder
from catimage.features.tfidf import TfidfEmbedder

PROMPTS = [
    "a red car",
    "a crimson automobile",
    "a bowl of soup",
    "a watercolor painting of a lighthouse on a cliff at sunset, with seagulls and crashing waves",
]
CORPUS = [
    "a red car parked on a street",
    "a bowl of tomato soup with bread",
    "two cats sleeping on a sofa",
    "a red bus driving through london",
    "soup and bread on a wooden table",
    "a lighthouse on a cliff at sunset",
    "a cat chasing a red ball",
    "an oil painting of a stormy sea",
]


def _assert_padded(tokens: np.ndarray, lengths: list[int]) -> None:
    real = np.any(tokens != 0, axis=-1)
    for i, length in enumerate(lengths):
        assert real[i, :length].all(), f"prompt {i}: a real token reads as padding"
        assert not real[i, length:].any(), f"prompt {i}: padding rows are not zero"


@pytest.fixture(scope="module")
def minilm():
    return make_embedder("minilm")


def test_minilm_shapes_normalised_and_padded(minilm):
    pooled, token_list = minilm.encode_with_tokens(PROMPTS)
    assert pooled.shape == (4, 384) and pooled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    tokenizer = minilm._load().tokenizer
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]  # [CLS] ... [SEP]
    assert [t.shape[0] for t in token_list] == lengths
    tokens = minilm.encode_tokens(PROMPTS)
    assert tokens.shape == (4, max(lengths), 384) and tokens.dtype == np.float32
    _assert_padded(tokens, lengths)
    # Batched or one at a time: the same embedding.
    np.testing.assert_allclose(minilm.encode(PROMPTS[:1]), pooled[:1], atol=1e-5)


def test_minilm_matches_sentence_transformers_encode(minilm):
    """Several batches (batch_size=3, 12 prompts) against the library's own encode."""
    prompts = PROMPTS + CORPUS
    small_batches = make_embedder("minilm", batch_size=3)
    small_batches._model = minilm._load()  # share the loaded weights
    pooled, token_list = small_batches.encode_with_tokens(prompts)
    st = minilm._load()
    np.testing.assert_allclose(pooled, st.encode(prompts, normalize_embeddings=True), atol=1e-5)
    ref_tokens = st.encode(prompts, output_value="token_embeddings")
    for ours, ref in zip(token_list, ref_tokens):
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)


def test_minilm_real_weights_are_semantic(minilm):
    e = minilm.encode(PROMPTS[:3])
    car_crimson, car_soup = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert car_crimson > car_soup + 0.2, (car_crimson, car_soup)


def test_spec_rebuilds_and_bad_names_fail(minilm):
    assert make_embedder(**minilm.spec).spec == minilm.spec
    assert "device" not in minilm.identity()  # runtime settings do not fork the cache
    with pytest.raises(CatimageError, match="choose one of"):
        make_embedder("word2vec")
    with pytest.raises(CatimageError, match="bad parameters"):
        make_embedder("tfidf", dims=3)
    with pytest.raises(CatimageError, match="list of prompts"):
        minilm.encode("a single string")


def test_tfidf_fit_save_load_roundtrip(tmp_path):
    emb = make_embedder("tfidf", dim=4).fit(CORPUS)
    queries = CORPUS[:3] + ["a red car", "zzz qqq unseen words"]
    pooled = emb.encode(queries)
    assert pooled.shape == (5, 4) and emb.dim == 4
    np.testing.assert_allclose(np.linalg.norm(pooled[:4], axis=1), 1.0, atol=1e-5)
    assert not pooled[4].any()  # nothing known: the zero vector
    assert emb.encode_tokens(queries).shape == (5, 1, 4)
    emb.save(tmp_path)
    saved = json.loads((tmp_path / "embedder.json").read_text())
    assert saved["spec"]["name"] == "tfidf" and "vocabulary" in saved["state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedder.json", "embedder.safetensors"]
    loaded = load_embedder(tmp_path)
    np.testing.assert_array_equal(loaded.encode(queries), pooled)
    assert loaded.cache_key() == emb.cache_key()
    # A different fit is a different embedder for the cache.
    assert make_embedder("tfidf", dim=4).fit(CORPUS[:6]).cache_key() != emb.cache_key()


def test_tfidf_without_svd_and_unfitted_errors(tmp_path):
    raw = make_embedder("tfidf", dim=None, ngram_range=(1, 1)).fit(CORPUS)
    vocab_size = len(raw._vectorizer.vocabulary_)
    assert raw.encode(["a red car"]).shape == (1, vocab_size)
    capped = make_embedder("tfidf", dim=256).fit(CORPUS)  # 8 prompts: SVD width capped at 7
    assert capped.dim == 7
    with pytest.raises(CatimageError, match="not fitted"):
        make_embedder("tfidf").encode(["a red car"])
    with pytest.raises(CatimageError, match="embedder.json"):
        load_embedder(tmp_path / "nowhere")


class CountingTfidf(TfidfEmbedder):
    """A real tfidf embedder that counts how many prompts reach the model."""

    def __init__(self, **params):
        super().__init__(**params)
        self.encoded = 0

    def _encode_batch(self, prompts):
        self.encoded += len(prompts)
        return super()._encode_batch(prompts)


def test_cache_hits_skip_the_model(tmp_path):
    inner = CountingTfidf(dim=4).fit(CORPUS)
    cached = CachedEmbedder(inner, tmp_path)
    first = cached.encode(CORPUS[:4] + CORPUS[:1])  # a duplicate within the call is encoded once
    assert inner.encoded == 4 and cached.misses == 4
    again = cached.encode(CORPUS[:4])
    assert inner.encoded == 4 and cached.hits == 4
    np.testing.assert_array_equal(again, first[:4])
    np.testing.assert_array_equal(cached.encode_tokens(CORPUS[:2]), inner.encode_tokens(CORPUS[:2]))
    # A fresh wrapper over an equal embedder reads the same files.
    other = CountingTfidf(dim=4).fit(CORPUS)
    np.testing.assert_array_equal(CachedEmbedder(other, tmp_path).encode(CORPUS[:4]), first[:4])
    assert other.encoded == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.name.endswith(".tmp.npy")]
    # A corrupt entry is recomputed rather than trusted.
    victim = next(p for p in files if p.name.endswith(".pooled.npy"))
    victim.write_bytes(b"garbage")
    fresh = CachedEmbedder(other, tmp_path)
    fresh.encode(CORPUS[:4])
    assert other.encoded == 1


def test_cache_default_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CATIMAGE_CACHE", str(tmp_path))
    cached = CachedEmbedder(make_embedder("tfidf", dim=2).fit(CORPUS))
    assert cached.cache_dir == tmp_path / "embeddings"


def test_pad_token_arrays():
    out = pad_token_arrays([np.ones((2, 3)), np.full((1, 3), 2.0)])
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], [[2, 2, 2], [0, 0, 0]])
    assert pad_token_arrays([], dim=5).shape == (0, 1, 5)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from catimage.features.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_clip_tiny_text_tower(tiny_clip, tmp_path):
    import open_clip
    import torch

    emb = make_embedder("clip", model=tiny_clip.model_name, pretrained=tiny_clip.checkpoint)
    assert (emb.dim, emb.token_dim) == (32, 32) and emb._clip is None  # from the config, no model load
    pooled, token_list = emb.encode_with_tokens(PROMPTS)
    assert pooled.shape == (4, 32) and emb.dim == 32 and emb.token_dim == 32
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    ids = open_clip.get_tokenizer(tiny_clip.model_name)(PROMPTS)
    lengths = [int(row.argmax()) + 1 for row in ids]  # start ... end-of-text
    assert [t.shape[0] for t in token_list] == lengths
    tokens = emb.encode_tokens(PROMPTS)
    assert tokens.shape == (4, max(lengths), 32)
    _assert_padded(tokens, lengths)
    # The tokens are the final features: projecting the end-of-text token gives encode_text.
    proj = emb._load()[0].text_projection.detach().numpy()
    eot = np.stack([tokens[i, lengths[i] - 1] for i in range(4)]) @ proj
    np.testing.assert_allclose(eot / np.linalg.norm(eot, axis=1, keepdims=True), pooled, atol=1e-5)
    # Same weights through open_clip's own loader and encode_text.
    model, _, _ = open_clip.create_model_and_transforms(tiny_clip.model_name, pretrained=tiny_clip.checkpoint)
    with torch.no_grad():
        ref = model.encode_text(ids, normalize=True).numpy()
    np.testing.assert_allclose(pooled, ref, atol=1e-5)
    emb.save(tmp_path)
    np.testing.assert_allclose(load_embedder(tmp_path).encode(PROMPTS[:2]), pooled[:2], atol=1e-6)


def test_clip_bad_checkpoint_and_model_errors(tmp_path):
    with pytest.raises(CatimageError, match="unknown open_clip model"):
        make_embedder("clip", model="no-such-arch", pretrained=None).encode(["x"])
    with pytest.raises(CatimageError, match="local checkpoint"):
        make_embedder("clip", model="catimage-tiny-clip", pretrained="no-such-tag").encode(["x"])


@pytest.mark.slow
def test_tiny_clip_works_in_a_fresh_process(tiny_clip):
    """A spec naming catimage-tiny-clip must work where nothing registered it (e.g. a Ray actor)."""
    code = (
        "import sys, numpy as np\n"
        "from catimage.features.registry import make_embedder\n"
        "e = make_embedder('clip', model='catimage-tiny-clip', pretrained=sys.argv[1])\n"
        "print(np.round(e.encode(['a red car'])[0, :3], 5).tolist())\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code, tiny_clip.checkpoint], capture_output=True, text=True, env=env,
        cwd=Path(__file__).resolve().parents[1], timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    here = make_embedder("clip", model="catimage-tiny-clip", pretrained=tiny_clip.checkpoint).encode(["a red car"])
    np.testing.assert_allclose(json.loads(out.stdout.strip().splitlines()[-1]), here[0, :3], atol=1e-4)
