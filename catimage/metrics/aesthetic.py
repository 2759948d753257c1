"""LAION aesthetic score: a small head on L2-normalised CLIP ViT-L/14 image embeddings.

Two published heads, both loadable from a local file (.pth via torch.load(weights_only=True), or
.safetensors):
- ``head_type="mlp"``: improved-aesthetic-predictor (e.g. ``sac+logos+ava1-l14-linearMSE.pth``),
  Linear(d,1024) -> Dropout(0.2) -> Linear(1024,128) -> Dropout(0.2) -> Linear(128,64) ->
  Dropout(0.1) -> Linear(64,16) -> Linear(16,1), no activations, state-dict keys ``layers.0`` ...
  ``layers.7`` exactly as published;
- ``head_type="linear"``: LAION-AI/aesthetic-predictor ``sa_0_4_vit_l_14_linear.pth``, one
  Linear(d,1) with keys ``weight``/``bias``.

The input width d is read from the weights (768 for ViT-L/14), so a head trained on another CLIP,
or a tiny test head, loads through the same code; it must equal the CLIP's embedding width.
The prompt is not used.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from catimage.metrics.base import (
    MetricError,
    MetricParams,
    Precision,
    Scorer,
    autocast,
    load_state_dict_file,
    parse_params,
    require_file,
    resolve_device,
)
from catimage.metrics.clip_score import load_open_clip

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

HeadType = Literal["mlp", "linear"]
_HEAD_HINT = (
    "download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor "
    "(head_type='mlp') or sa_0_4_vit_l_14_linear.pth from github.com/LAION-AI/aesthetic-predictor "
    "(head_type='linear') and set params.head to its local path, or use params {tiny: true}"
)


class AestheticParams(MetricParams):
    head: str | None = None
    head_type: HeadType = "mlp"
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    precision: Precision = "fp32"
    cache_dir: str | None = None


def build_head(head_type: HeadType, input_size: int) -> torch.nn.Module:
    """The published head architecture (untrained); parameter names match the released files."""
    from torch import nn

    if head_type == "linear":
        return nn.Linear(input_size, 1)

    class AestheticMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    return AestheticMLP()


def load_head(path: str, head_type: HeadType) -> torch.nn.Module:
    """Build the head of `head_type` sized from the file and load the file into it (strict)."""
    state = load_state_dict_file(path)
    first = "weight" if head_type == "linear" else "layers.0.weight"
    if first not in state:
        other = "mlp" if head_type == "linear" else "linear"
        raise MetricError(
            f"aesthetic: {path!r} has no {first!r}; keys: {sorted(state)[:8]}... "
            f"(is it a head_type={other!r} file?)"
        )
    head = build_head(head_type, int(state[first].shape[1]))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MetricError(f"aesthetic: {path!r} does not fit the {head_type} head: {e}") from e
    return head.eval()


class AestheticScorer(Scorer):
    """Aesthetic score per image (about 1-10 with the published heads)."""

    name = "aesthetic"

    def __init__(self, device: str | None = None, batch_size: int = 8, **params: Any) -> None:
        super().__init__(batch_size)
        self.params = parse_params(AestheticParams, self.name, params)
        head_path = require_file(self.params.head, "aesthetic: head weights", _HEAD_HINT)
        self.device = resolve_device(device)
        self.head = load_head(str(head_path), self.params.head_type).to(self.device)
        self.clip = load_open_clip(
            self.params.clip_model, self.params.clip_pretrained, self.device, self.params.cache_dir, what=self.name
        )
        in_dim = self.head.weight.shape[1] if self.params.head_type == "linear" else self.head.layers[0].in_features
        clip_dim = self._embed_dim()
        if clip_dim is not None and in_dim != clip_dim:
            raise MetricError(
                f"aesthetic: the head takes {in_dim}-d embeddings but {self.clip.name} gives {clip_dim}-d; "
                "pair the head with the CLIP it was trained on (ViT-L-14 / openai for the published heads)"
            )

    def _embed_dim(self) -> int | None:
        """The CLIP image tower's output width (open_clip towers expose `output_dim`)."""
        dim = getattr(self.clip.model.visual, "output_dim", None)
        return int(dim) if dim is not None else None

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (float32)."""
        import torch

        pixels = torch.stack([self.clip.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.params.precision):
            emb = self.clip.model.encode_image(pixels, normalize=True)
        return emb.float()

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        import torch

        emb = self.embed(images)
        with torch.inference_mode():
            out = self.head(emb)
        return out.squeeze(-1).double().cpu().numpy()
