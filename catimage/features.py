"""Prompt features beyond one embedder: ragged per-token storage, prompt statistics, combined embedder.

* `TokenBatch` -- per-token features of many prompts as one flat float16 array plus offsets (no
  padding to the longest prompt, half the bytes of float32). Indexing a TokenBatch selects rows
  without copying the data, so the train / test slices of every trial share one array; batches
  are padded only when a model consumes them. This is what keeps the Transformer estimator on a
  10,000-prompt table inside a few hundred MB.
* `prompt_statistics` -- generic, model-free properties of the text that quality often depends on:
  length, counts, numerals, quoted text, spatial / colour / style words.
* `CombinedEmbedder` (kind ``combined``) -- pooled = [MiniLM (or any text embedder), TF-IDF + SVD,
  standardised prompt statistics], each block scaled by a weight, then L2-normalised (so cosine
  similarity is a weighted mix of the blocks' similarities); tokens = the text embedder's tokens.
  The text part goes through the on-disk embedding cache, so refitting TF-IDF per trial never
  re-runs MiniLM.
* `embed_features` -- the one function that turns prompts into what an estimator consumes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catimage.embed import (
    EMBEDDER_JSON,
    CachedEmbedder,
    Embedder,
    TfidfEmbedder,
    _as_prompt_list,
    _l2_normalize,
    load_embedder,
    make_embedder,
)
from catimage.errors import CatimageError

_F16_TINY = np.float16(6e-8)  # the smallest float16 subnormal: keeps a real token row non-zero


@dataclass
class TokenBatch:
    """Ragged per-token features: prompt `rows[i]` owns data[offsets[r]:offsets[r+1]].

    Implements the little of the ndarray interface the estimators use: ``len``, ``shape``
    (n, longest, d), ``ndim``, indexing by slice / integer array (a view: no data copied), and
    ``padded(idx)`` to build a zero-padded float32 batch.
    """

    data: np.ndarray  # (total_tokens, d) float16
    offsets: np.ndarray  # (N + 1,) int64
    rows: np.ndarray  # (n,) int64

    ndim = 3

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dim: int | None = None) -> TokenBatch:
        """From one (T_i, d) array per prompt (T_i >= 1)."""
        if not arrays:
            if dim is None:
                raise CatimageError("TokenBatch.from_arrays needs dim when given no arrays")
            return cls(np.zeros((0, dim), np.float16), np.zeros(1, np.int64), np.zeros(0, np.int64))
        lengths = np.array([max(a.shape[0], 1) for a in arrays], dtype=np.int64)
        d = int(arrays[0].shape[-1])
        data = np.zeros((int(lengths.sum()), d), dtype=np.float16)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for i, a in enumerate(arrays):
            if a.shape[0]:
                data[offsets[i] : offsets[i] + a.shape[0]] = a
        zero = ~np.any(data != 0, axis=1)
        data[zero, 0] = _F16_TINY
        return cls(data, offsets, np.arange(len(arrays), dtype=np.int64))

    @classmethod
    def from_padded(cls, X: np.ndarray) -> TokenBatch:
        """From a zero-padded (n, T, d) array (the estimator contract's other token form)."""
        X = np.asarray(X)
        valid = np.any(X != 0, axis=-1)
        arrays = []
        for i in range(X.shape[0]):
            used = np.flatnonzero(valid[i])
            arrays.append(X[i, : (int(used[-1]) + 1 if used.size else 1)])
        return cls.from_arrays(arrays, dim=X.shape[-1])

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def lengths(self) -> np.ndarray:
        return self.offsets[self.rows + 1] - self.offsets[self.rows]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), int(self.lengths.max()) if len(self) else 0, int(self.data.shape[1]))

    def __getitem__(self, idx: Any) -> TokenBatch:
        rows = self.rows[idx]
        return TokenBatch(self.data, self.offsets, np.atleast_1d(rows).astype(np.int64))

    def padded(self, idx: Any = None, dtype: Any = np.float32) -> np.ndarray:
        """(b, longest in the batch, d) zero-padded copy of rows `idx` (default: all)."""
        rows = self.rows if idx is None else np.atleast_1d(self.rows[idx])
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        out = np.zeros((rows.size, int(lengths.max()) if rows.size else 1, self.data.shape[1]), dtype=dtype)
        for b, (s, e) in enumerate(zip(starts, ends)):
            out[b, : e - s] = self.data[s:e]
        return out

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes + self.rows.nbytes)


# --- prompt statistics ---------------------------------------------------------------------------

_WORDS = {
    "numerals": r"\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|dozen|pair|couple|several|many|few|single|\d+)\b",
    "spatial": r"\b(left|right|above|below|over|under|beneath|behind|front|top|bottom|beside|next to|near|between|"
    r"inside|outside|on top of|center|centre|middle|corner|far|close)\b",
    "colours": r"\b(red|green|blue|yellow|orange|purple|pink|brown|black|white|gray|grey|golden|silver|violet|cyan|"
    r"magenta|teal)\b",
    "style": r"\b(photo|photograph|realistic|painting|drawing|sketch|illustration|cartoon|anime|3d|render|oil|"
    r"watercolou?r|digital art|art|style|portrait|minimalist|pixel)\b",
    "text": r"\b(text|word|words|letter|letters|sign|says|saying|written|writing|logo|caption|title)\b",
    "negation": r"\b(no|not|without|none|never)\b",
    "people": r"\b(man|woman|men|women|person|people|boy|girl|child|children|he|she|they|his|her)\b",
}
_COMPILED = {k: re.compile(v) for k, v in _WORDS.items()}
_QUOTED = re.compile(r"\"([^\"]+)\"|'([^']{2,})'")
STAT_NAMES = (
    "log_chars", "log_words", "commas", "and_count", "digits", "quoted", "quoted_words", "capitals",
    *(_WORDS.keys()),
)


def prompt_statistics(prompts: Sequence[str]) -> np.ndarray:
    """(n, len(STAT_NAMES)) float64 model-free prompt properties (see STAT_NAMES)."""
    rows = []
    for p in _as_prompt_list(prompts):
        low = p.lower()
        words = p.split()
        quoted = _QUOTED.findall(p)
        quoted_words = sum(len((a or b).split()) for a, b in quoted)
        row = [
            np.log1p(len(p)),
            np.log1p(len(words)),
            p.count(","),
            low.count(" and "),
            sum(ch.isdigit() for ch in p),
            float(bool(quoted)),
            quoted_words,
            sum(ch.isupper() for ch in p) / max(len(p), 1),
        ]
        row += [len(rx.findall(low)) for rx in _COMPILED.values()]
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(STAT_NAMES))


# --- the combined embedder -----------------------------------------------------------------------


class CombinedEmbedder(Embedder):
    """Text embedder (pooled) + TF-IDF/SVD + prompt statistics, weighted blocks, L2-normalised."""

    name = "combined"

    def __init__(
        self,
        text: dict[str, Any] | None = None,
        tfidf_dim: int = 128,
        weights: Sequence[float] = (1.0, 0.6, 0.4),
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        self.text = dict(text or {"name": "minilm"})
        self.tfidf_dim = int(tfidf_dim)
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != 3 or min(self.weights) < 0:
            raise CatimageError(f"combined weights are three numbers >= 0 (text, tfidf, stats); got {weights}")
        self.cache = bool(cache)
        self.cache_dir = cache_dir
        inner = make_embedder(**self.text)
        self._text = CachedEmbedder(inner, cache_dir) if self.cache else inner
        self._tfidf = TfidfEmbedder(dim=self.tfidf_dim) if self.weights[1] > 0 else None
        self._stat_mean: np.ndarray | None = None
        self._stat_std: np.ndarray | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "text": self.text, "tfidf_dim": self.tfidf_dim, "weights": list(self.weights),
                "cache": self.cache, "cache_dir": self.cache_dir}

    def identity(self) -> dict[str, Any]:
        ident = {"name": self.name, "text": self._text.identity(), "tfidf_dim": self.tfidf_dim,
                 "weights": list(self.weights)}
        if self.is_fitted:
            ident["tfidf"] = self._tfidf.identity() if self._tfidf is not None else None
            ident["stats"] = [self._stat_mean.tolist(), self._stat_std.tolist()]
        return ident

    @property
    def is_fitted(self) -> bool:
        return (self._stat_mean is not None and self._text.is_fitted
                and (self._tfidf is None or self._tfidf.is_fitted))

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CatimageError("the combined embedder is not fitted: call fit(train_prompts) or load_embedder(dir)")

    @property
    def dim(self) -> int:
        self._require_fitted()
        return self._text.dim + (self._tfidf.dim if self._tfidf is not None else 0) + len(STAT_NAMES)

    @property
    def token_dim(self) -> int:
        return self._text.token_dim

    def fit(self, prompts: Sequence[str]) -> CombinedEmbedder:
        prompts = _as_prompt_list(prompts)
        self._text.fit(prompts)  # a no-op for MiniLM / CLIP
        if self._tfidf is not None:
            self._tfidf.fit(prompts)
        stats = prompt_statistics(prompts)
        self._stat_mean = stats.mean(axis=0)
        self._stat_std = np.where(stats.std(axis=0) > 1e-9, stats.std(axis=0), 1.0)
        return self

    def _blocks(self, prompts: list[str], text_pooled: np.ndarray) -> np.ndarray:
        w_text, w_tfidf, w_stats = self.weights
        parts = [w_text * text_pooled]
        if self._tfidf is not None:
            parts.append(w_tfidf * self._tfidf.encode(prompts))
        z = (prompt_statistics(prompts) - self._stat_mean) / self._stat_std
        parts.append((w_stats / np.sqrt(len(STAT_NAMES))) * np.clip(z, -5, 5).astype(np.float32))
        return _l2_normalize(np.concatenate(parts, axis=1).astype(np.float32))

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        self._require_fitted()
        pooled, tokens = self._text.encode_with_tokens(prompts)
        return self._blocks(prompts, pooled), tokens

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        self._require_fitted()
        prompts = _as_prompt_list(prompts)
        if not prompts:
            return np.zeros((0, self.dim), np.float32)
        return self._blocks(prompts, self._text.encode(prompts))

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        return self._text.encode_tokens(prompts)

    def save(self, directory: str | Path) -> Path:
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {"stat_mean": self._stat_mean.tolist(), "stat_std": self._stat_std.tolist(), "stat_names": list(STAT_NAMES)}
        (directory / EMBEDDER_JSON).write_text(json.dumps({"spec": self.spec, "state": state}, indent=2))
        if self._tfidf is not None:
            self._tfidf.save(directory / "tfidf")
        self._text.save(directory / "text")
        return directory

    def load_state(self, directory: Path, data: dict[str, Any]) -> CombinedEmbedder:
        """Restore the fitted state written by `save` (called by `catimage.embed.load_embedder`)."""
        state = data.get("state")
        if not state:
            raise CatimageError(f"{directory} holds an unfitted combined embedder (no state)")
        if list(state.get("stat_names", [])) != list(STAT_NAMES):
            raise CatimageError(f"{directory}: prompt statistics changed since this embedder was saved; refit the model")
        self._stat_mean = np.asarray(state["stat_mean"], dtype=np.float64)
        self._stat_std = np.asarray(state["stat_std"], dtype=np.float64)
        if self._tfidf is not None:
            self._tfidf = load_embedder(directory / "tfidf")
        text = load_embedder(directory / "text")
        self._text = CachedEmbedder(text, self.cache_dir) if self.cache else text
        return self


# --- what an estimator consumes ------------------------------------------------------------------


def _is_tfidf(embedder: Embedder) -> bool:
    inner = embedder.inner if isinstance(embedder, CachedEmbedder) else embedder
    return isinstance(inner, TfidfEmbedder)


def embed_features(embedder: Embedder, prompts: Sequence[str], input_kind: str) -> np.ndarray | TokenBatch:
    """Pooled (n, d) float32 for pooled estimators, a ragged float16 `TokenBatch` for token ones."""
    prompts = list(prompts)
    if input_kind == "pooled":
        return embedder.encode(prompts)
    if input_kind == "tokens":
        if _is_tfidf(embedder):
            return TokenBatch.from_arrays([row[None, :] for row in embedder.encode(prompts)], dim=embedder.dim)
        tokens = embedder.encode_with_tokens(prompts)[1]
        return TokenBatch.from_arrays(tokens, dim=embedder.token_dim)
    raise CatimageError(f"unknown estimator input kind {input_kind!r}")


class FeatureCache:
    """Embeddings of one prompt list, kept while the embedder's identity is unchanged.

    `evaluate` re-fits on many splits of the same table: MiniLM features are computed once and
    every trial slices them (a TokenBatch slice copies no token data); a refitted TF-IDF (new
    identity) replaces the entry. Holds the most recent `size` entries.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = int(size)
        self._entries: dict[tuple[str, str, int], Any] = {}

    def get(self, embedder: Embedder, prompts: Sequence[str], input_kind: str) -> np.ndarray | TokenBatch:
        base = (embedder.cache_key(), hash(tuple(prompts)))
        key = (*base, input_kind)
        if key not in self._entries:
            while len(self._entries) >= 2 * self.size:
                self._entries.pop(next(iter(self._entries)))
            if input_kind == "tokens" and not _is_tfidf(embedder):
                # One pass (one cache read per prompt) gives both: the pooled vectors come free.
                pooled, tokens = embedder.encode_with_tokens(list(prompts))
                self._entries[(*base, "pooled")] = pooled
                self._entries[key] = TokenBatch.from_arrays(tokens, dim=embedder.token_dim)
            else:
                self._entries[key] = embed_features(embedder, prompts, input_kind)
        return self._entries[key]
