"""``combined``: pooled = [MiniLM (or any text embedder), TF-IDF + SVD, standardised prompt
statistics], each block scaled by a weight, then L2-normalised (so cosine similarity is a weighted
mix of the blocks' similarities); tokens = the text embedder's tokens. The text part goes through
the on-disk embedding cache, so refitting TF-IDF per trial never re-runs MiniLM.

`prompt_statistics`: generic, model-free properties of the text that quality often depends on:
length, counts, numerals, quoted text, spatial / colour / style words.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.features.base import EMBEDDER_JSON, Embedder, as_prompt_list, l2_normalize
from catimage.features.cache import CachedEmbedder
from catimage.features.single import load_single_embedder, make_single_embedder
from catimage.features.tfidf import TfidfEmbedder

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
    for p in as_prompt_list(prompts):
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
        inner = make_single_embedder(**self.text)
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
        prompts = as_prompt_list(prompts)
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
        return l2_normalize(np.concatenate(parts, axis=1).astype(np.float32))

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        self._require_fitted()
        pooled, tokens = self._text.encode_with_tokens(prompts)
        return self._blocks(prompts, pooled), tokens

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        self._require_fitted()
        prompts = as_prompt_list(prompts)
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

    def load_state(self, directory: Path, data: dict[str, Any], runtime: dict[str, Any] | None = None) -> CombinedEmbedder:
        """Restore the fitted state written by `save` (called by `catimage.features.registry.load_embedder`);
        `runtime` options (device, batch_size, backend) reach the text part, the one that runs a model."""
        state = data.get("state")
        if not state:
            raise CatimageError(f"{directory} holds an unfitted combined embedder (no state)")
        if list(state.get("stat_names", [])) != list(STAT_NAMES):
            raise CatimageError(f"{directory}: prompt statistics changed since this embedder was saved; refit the model")
        self._stat_mean = np.asarray(state["stat_mean"], dtype=np.float64)
        self._stat_std = np.asarray(state["stat_std"], dtype=np.float64)
        if self._tfidf is not None:
            self._tfidf = load_single_embedder(directory / "tfidf")
        text = load_single_embedder(directory / "text", **(runtime or {}))
        self._text = CachedEmbedder(text, self.cache_dir) if self.cache else text
        return self
