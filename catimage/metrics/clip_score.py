"""CLIPScore: prompt-image agreement under an open_clip model.

    CLIPScore(prompt, image) = max(100 * cos(E_img(image), E_txt(prompt)), 0)

(Hessel et al. 2021 with w = 100, the convention of torchmetrics' CLIPScore.) The model is any
open_clip architecture: a built-in name (``ViT-H-14``), ``catimage-tiny-clip``, an architecture JSON
path, or ``hf-hub:org/name``; `pretrained` is a tag (resolved through open_clip's cache, so set
HF_HUB_OFFLINE=1 on machines that must not download) or a local checkpoint path.

`load_open_clip` is shared with the aesthetic metric, which needs the same loading rules.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from catimage.metrics.base import (
    MetricError,
    MetricParams,
    Precision,
    Scorer,
    autocast,
    parse_params,
    require_file,
    resolve_device,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


class ClipScoreParams(MetricParams):
    """Defaults are the paper-scale model; tests pass the tiny one."""

    model: str = "ViT-H-14"
    pretrained: str | None = "laion2b_s32b_b79k"
    precision: Precision = "fp32"
    cache_dir: str | None = None


@dataclass
class OpenClip:
    """A loaded open_clip model with its eval transform and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    name: str


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(pretrained)


def load_open_clip(
    model: str, pretrained: str | None, device: torch.device, cache_dir: str | None = None, *, what: str
) -> OpenClip:
    """Build an open_clip model in eval mode, checking names and paths first so that a typo or a missing
    file fails with a message that says which param to fix (open_clip's own errors do not)."""
    import open_clip

    from catimage.features.tiny_clip import ensure_open_clip_model

    try:
        name = ensure_open_clip_model(model)
    except Exception as e:
        raise MetricError(f"{what}: {e}") from e

    if pretrained is None or pretrained == "":
        if not name.startswith("hf-hub:"):
            raise MetricError(
                f"{what}: no pretrained weights given for {name}; a metric on random weights measures nothing. "
                f"Pass a tag from {open_clip.list_pretrained_tags_by_model(name)} or a local checkpoint path"
            )
        pretrained = None
    elif _looks_like_path(pretrained):
        pretrained = str(
            require_file(pretrained, f"{what}: checkpoint", "pass an existing open_clip checkpoint (.pt/.bin/.safetensors)")
        )
    elif pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise MetricError(
            f"{what}: {pretrained!r} is neither a file nor a pretrained tag of {name}; "
            f"tags: {open_clip.list_pretrained_tags_by_model(name)}"
        )

    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, cache_dir=cache_dir
        )
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise MetricError(
            f"{what}: could not load open_clip {name} with pretrained={pretrained!r}: {e}. "
            + (
                "HF_HUB_OFFLINE=1 is set: pre-fill the cache or pass a local checkpoint path"
                if offline
                else "pass a local checkpoint path if this machine cannot download"
            )
        ) from e
    net.eval()
    return OpenClip(model=net, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name), name=name)


class ClipScoreScorer(Scorer):
    """CLIPScore per (prompt, image) pair, in [0, 100]."""

    name = "clip_score"

    def __init__(self, device: str | None = None, batch_size: int = 8, **params: Any) -> None:
        super().__init__(batch_size)
        self.params = parse_params(ClipScoreParams, self.name, params)
        self.device = resolve_device(device)
        self.clip = load_open_clip(
            self.params.model, self.params.pretrained, self.device, self.params.cache_dir, what=self.name
        )

    def embed(self, prompts: list[str], images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings, float32, on the CPU."""
        import torch

        pixels = torch.stack([self.clip.preprocess(im) for im in images]).to(self.device)
        tokens = self.clip.tokenizer(prompts).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.params.precision):
            img = self.clip.model.encode_image(pixels, normalize=True)
            txt = self.clip.model.encode_text(tokens, normalize=True)
        return img.float().cpu(), txt.float().cpu()

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        img, txt = self.embed(prompts, images)
        cos = (img.double() * txt.double()).sum(dim=-1)
        return (100.0 * cos).clamp(min=0.0).numpy()
