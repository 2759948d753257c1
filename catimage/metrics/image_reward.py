"""ImageReward (Xu et al. 2023, package image-reward 1.5) built from local files only.

`ImageReward.load` downloads the checkpoint and med_config unless given paths, and the package's
`BLIP_Pretrain.__init__` always calls `BertTokenizer.from_pretrained('bert-base-uncased')` (a hub
download) and hard-codes ViT-L at 224 px. So the model is assembled here from the package's own
classes (`VisionTransformer`/`create_vit`, the BLIP `BertModel`, `MLP`, `_transform`, and the
`ImageReward` class itself for `score_gard`/`score`/`inference_rank`) with three things passed in:
the tokenizer folder, the med_config, and (for tiny test models) the ViT size. Nothing in the
package is patched; the subclasses below only replace the two constructors.

Scores follow the package exactly: the BERT tokenizer with padding to 35 tokens, the package's
preprocess (bicubic resize, centre crop, CLIP normalisation), the [CLS] feature of the image-grounded
text encoder, the MLP, then (r - mean) / std with the package's constants. Batches go through
`ImageReward.score_gard` (the package's batched forward); tests check it equals the package's
per-image `score` and `inference_rank`.

Real weights: ImageReward.pt and med_config.json from https://huggingface.co/THUDM/ImageReward, and a
local copy of the bert-base-uncased tokenizer (or the hub id with a pre-filled HF cache).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, PositiveInt
from torch import nn

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

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch's pkg_resources deprecation, timm's moved modules
    from ImageReward.ImageReward import MLP, ImageReward, _transform
    from ImageReward.models.BLIP.blip import create_vit
    from ImageReward.models.BLIP.blip_pretrain import BLIP_Pretrain
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

log = logging.getLogger(__name__)

# Set in ImageReward.__init__ (image-reward 1.5); a test reads them back from the package source.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
# The package's text settings (ImageReward.score / inference_rank).
MAX_TEXT_LENGTH = 35

# BLIP's med_config.json (salesforce/BLIP configs/med_config.json, shipped as THUDM/ImageReward's).
BLIP_MED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

_HINT = (
    "download ImageReward.pt and med_config.json from https://huggingface.co/THUDM/ImageReward, a copy of "
    "the bert-base-uncased tokenizer, and set params checkpoint / med_config / tokenizer to the local paths; "
    "or use params {tiny: true}"
)


class VisionSize(BaseModel):
    """A custom BLIP ViT (tiny test models); 'large' is what ImageReward ships."""

    model_config = ConfigDict(extra="forbid")

    patch_size: PositiveInt = 16
    embed_dim: PositiveInt
    depth: PositiveInt
    num_heads: PositiveInt


class ImageRewardParams(MetricParams):
    checkpoint: str | None = None
    med_config: str | dict[str, Any] | None = None  # None: BLIP's published med_config
    tokenizer: str = "bert-base-uncased"  # a local folder, or a hub id found in the HF cache
    vit: Literal["large", "base"] | VisionSize = "large"
    image_size: PositiveInt = 224
    precision: Precision = "fp32"


def write_med_config(path: str | Path, **overrides: Any) -> Path:
    """Write BLIP's med_config.json (with overrides) for machines that lack the file."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({**BLIP_MED_CONFIG, **overrides}, indent=2))
    return p


def load_blip_tokenizer(name_or_path: str) -> Any:
    """`blip.init_tokenizer` with the BERT tokenizer read from `name_or_path` instead of the hub."""
    from transformers import BertTokenizer

    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise MetricError(f"image_reward: tokenizer folder {name_or_path!r} does not exist; {_HINT}")
    if looks_local:
        name_or_path = str(path)
    try:
        tok = BertTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise MetricError(f"image_reward: cannot load the BERT tokenizer {name_or_path!r}: {e}; {_HINT}") from e
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.additional_special_tokens_ids[0]
    return tok


def load_med_config(med_config: str | dict[str, Any] | None) -> BertConfig:
    if med_config is None:
        return BertConfig(**BLIP_MED_CONFIG)
    if isinstance(med_config, dict):
        return BertConfig(**{**BLIP_MED_CONFIG, **med_config})
    path = require_file(med_config, "image_reward: med_config", _HINT)
    return BertConfig.from_json_file(str(path))


class LocalBLIP(BLIP_Pretrain):
    """BLIP_Pretrain's modules (same names, so checkpoints load) with the tokenizer and ViT passed in."""

    def __init__(self, visual_encoder: nn.Module, vision_width: int, tokenizer: Any, encoder_config: BertConfig,
                 embed_dim: int = 256) -> None:
        nn.Module.__init__(self)
        self.visual_encoder = visual_encoder
        self.tokenizer = tokenizer
        encoder_config.encoder_width = vision_width
        self.text_encoder = BertModel(config=encoder_config, add_pooling_layer=False)
        text_width = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)


class LocalImageReward(ImageReward):
    """The package's ImageReward around a `LocalBLIP`; inherits score / inference_rank / score_gard."""

    def __init__(self, blip: LocalBLIP, image_size: int, device: str | torch.device = "cpu") -> None:
        nn.Module.__init__(self)
        self.device = device
        self.blip = blip
        self.preprocess = _transform(image_size)
        self.mlp = MLP(blip.text_encoder.config.hidden_size)
        self.mean = IMAGE_REWARD_MEAN
        self.std = IMAGE_REWARD_STD


def build_image_reward(
    tokenizer: Any,
    med_config: str | dict[str, Any] | None = None,
    vit: Literal["large", "base"] | VisionSize | dict[str, Any] = "large",
    image_size: int = 224,
    device: str | torch.device = "cpu",
) -> LocalImageReward:
    """An untrained ImageReward of the given size (the real one: vit='large', image_size=224)."""
    config = load_med_config(med_config)
    if isinstance(vit, str):
        visual, width = create_vit(vit, image_size, False, 0, 0)
    else:
        size = vit if isinstance(vit, VisionSize) else VisionSize(**vit)
        visual = VisionTransformer(img_size=image_size, patch_size=size.patch_size, embed_dim=size.embed_dim,
                                   depth=size.depth, num_heads=size.num_heads)
        width = size.embed_dim
    if len(tokenizer) > config.vocab_size:
        raise MetricError(
            f"image_reward: the tokenizer has {len(tokenizer)} tokens but med_config.vocab_size is "
            f"{config.vocab_size}; use the tokenizer the checkpoint was trained with"
        )
    blip = LocalBLIP(visual, width, tokenizer, config)
    return LocalImageReward(blip, image_size, device=device)


def load_checkpoint_into(model: nn.Module, path: str | Path) -> None:
    """Load a state dict like `ImageReward.load` does (non-strict), but fail if a weight that scoring
    uses is missing: strict=False alone would score with random layers without a word."""
    state = load_state_dict_file(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise MetricError(
            f"image_reward: {str(path)!r} does not fit the model built from med_config/vit/image_size: {e}"
        ) from e
    used = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
    missing = [k for k in result.missing_keys if k.startswith(used) and not k.endswith("position_ids")]
    if missing:
        raise MetricError(
            f"image_reward: {str(path)!r} lacks {len(missing)} weights the score needs, e.g. {missing[:5]}; "
            "is it an ImageReward state dict (keys 'blip.*', 'mlp.*')?"
        )
    if result.unexpected_keys:
        log.warning("image_reward: ignored %d unexpected keys in %s, e.g. %s",
                    len(result.unexpected_keys), path, result.unexpected_keys[:5])


class ImageRewardScorer(Scorer):
    """ImageReward score per (prompt, image) pair (standardised: about N(0, 1) on the package's data)."""

    name = "image_reward"

    def __init__(self, device: str | None = None, batch_size: int = 8, **params: Any) -> None:
        super().__init__(batch_size)
        self.params = parse_params(ImageRewardParams, self.name, params)
        checkpoint = require_file(self.params.checkpoint, "image_reward: checkpoint", _HINT)
        self.device = resolve_device(device)
        tokenizer = load_blip_tokenizer(self.params.tokenizer)
        model = build_image_reward(tokenizer, self.params.med_config, self.params.vit, self.params.image_size)
        load_checkpoint_into(model, checkpoint)
        model.device = self.device
        self.model = model.to(self.device).eval()

    def _score_batch(self, prompts: list[str], images: list[Any]) -> np.ndarray:
        m = self.model
        text = m.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                                return_tensors="pt").to(self.device)
        pixels = torch.stack([m.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.params.precision):
            rewards = m.score_gard(text.input_ids, text.attention_mask, pixels)
        return rewards.reshape(-1).double().cpu().numpy()
