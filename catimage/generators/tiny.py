"""Tiny random-weight Stable Diffusion / SDXL pipelines, built locally, for tests and dry runs.

No real weights can be downloaded on the development machines, yet the generator code must run the
real loading path (`Pipeline.from_pretrained(folder)`). This module builds pipelines with the real
diffusers/transformers classes and the real CLIP tokenizer vocabulary, but with a ~1M-parameter UNet,
a small VAE and 2-layer text encoders, all randomly initialised from a fixed seed, and saves them
with `save_pretrained`. A pool refers to them as ``model: tiny:sd`` or ``model: tiny:sdxl``;
`resolve_model` builds the folder on first use under ``$CATIMAGE_CACHE/tiny/<name>`` (default
``~/.cache/catimage/tiny/<name>``) and returns its path.

Images from these pipelines are noise: `is_tiny(spec)` lets reports say so.

Concurrency: several processes (Ray actors, pytest workers) may resolve the same name at once. The
build runs under a file lock, into a temporary sibling folder that is renamed into place only when
complete, so a reader never sees a half-written pipeline.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from catimage.errors import CatimageError

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TINY_KINDS = ("sd", "sdxl")
# Bump when the recipe below changes: cached folders with another version are rebuilt.
RECIPE_VERSION = 1
_MARKER = "catimage_tiny.json"
SEED = 0

# The CLIP BPE vocabulary: 256 byte symbols, their end-of-word forms, 48,894 merges, 2 specials.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def is_tiny(spec: Any) -> bool:
    """True when `spec` (a generator spec, a candidate, or a model string) names a tiny pipeline."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec.startswith(TINY_PREFIX)
    generator = getattr(spec, "generator", None)
    if generator is not None:
        return is_tiny(generator)
    model = getattr(spec, "model", None)
    if isinstance(spec, dict):
        model = spec.get("model")
    return isinstance(model, str) and model.startswith(TINY_PREFIX)


def cache_root() -> Path:
    """Where built tiny pipelines live: ``$CATIMAGE_CACHE/tiny`` or ``~/.cache/catimage/tiny``."""
    root = os.environ.get("CATIMAGE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "catimage"
    return base / "tiny"


def _kind_of(ref: str) -> str:
    kind = ref.removeprefix(TINY_PREFIX)
    if kind not in TINY_KINDS:
        raise CatimageError(
            f"unknown tiny pipeline {ref!r}: use one of {[TINY_PREFIX + k for k in TINY_KINDS]}"
        )
    return kind


def resolve_model(ref: str) -> str:
    """A `from_pretrained` argument for `ref`: tiny refs become a built local folder, others pass through.

    Safe to call from several processes at once: the first builds under a lock, the others wait and
    reuse the folder.
    """
    if not ref.startswith(TINY_PREFIX):
        return ref
    kind = _kind_of(ref)
    root = cache_root()
    target = root / kind
    if _is_current(target):
        return str(target)
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{kind}.lock"), timeout=600):
        if _is_current(target):  # another process finished while we waited
            return str(target)
        log.info("building tiny %s pipeline into %s (random weights, first use only)", kind, target)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{kind}.building."))
        try:
            build_tiny_pipeline(kind, tmp)
            if target.exists():  # a stale recipe version: move it aside, then swap in the new one
                stale = Path(tempfile.mkdtemp(dir=root, prefix=f".{kind}.stale."))
                target.rename(stale / kind)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _is_current(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("recipe_version") == RECIPE_VERSION
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# tokenizer: open_clip's bundled BPE vocabulary, converted for transformers' CLIPTokenizer


def write_clip_vocab(out_dir: str | Path) -> tuple[Path, Path]:
    """Write vocab.json + merges.txt for `CLIPTokenizer` from open_clip's bundled BPE file.

    The token ids follow open_clip's order (bytes, bytes + '</w>', merges, specials), so they match
    `open_clip.tokenize` and the real SD/SDXL tokenizers (49,408 tokens, <|endoftext|> = 49407).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as bpe:
        lines = bpe.read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges] + [SOT, EOT]
    if len(vocab) != VOCAB_SIZE:
        raise CatimageError(f"open_clip's BPE file gave {len(vocab)} tokens, expected {VOCAB_SIZE}")
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def build_clip_tokenizer(out_dir: str | Path, pad_token: str = EOT) -> Any:
    """A `CLIPTokenizer` on the real CLIP vocabulary (77 tokens). SD pads with <|endoftext|>;
    SDXL's second tokenizer (OpenCLIP) pads with '!' (id 0), which is what `open_clip.tokenize` does."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_vocab(out_dir)
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)


# ---------------------------------------------------------------------------------------------
# model configs (shapes follow the real SD 1.5 / SDXL layouts, scaled down)

# 3 resolution levels as in SDXL, so DeepCache's branch ids and the down/up skip wiring are exercised.
_UNET_COMMON: dict[str, Any] = {
    "sample_size": 8,  # 8x8 latent -> 64x64 image with the 8x VAE below
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 32, 64),
    "norm_num_groups": 8,
}
UNET_SD: dict[str, Any] = {
    **_UNET_COMMON,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
UNET_SDXL: dict[str, Any] = {
    **_UNET_COMMON,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 4),  # SDXL's config uses this name for the number of heads
    "use_linear_projection": True,
    "cross_attention_dim": 64,  # hidden sizes of the two text encoders, concatenated (32 + 32)
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 size/crop ids + pooled text (32)
}
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32, 32, 32),  # 4 levels: the usual 8x latent downsampling
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 77,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "bos_token_id": VOCAB_SIZE - 2,
    "eos_token_id": VOCAB_SIZE - 1,
    "pad_token_id": VOCAB_SIZE - 1,
}
# The released SD 1.5 / SDXL noise schedules.
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def build_tiny_pipeline(kind: str, out_dir: str | Path) -> Path:
    """Build the tiny `kind` ('sd' or 'sdxl') pipeline with fixed-seed random weights into `out_dir`.

    Every component is the real class (UNet2DConditionModel, AutoencoderKL, CLIPTextModel[WithProjection],
    CLIPTokenizer, EulerDiscreteScheduler / PNDMScheduler), so loading it is the production path.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kind = _kind_of(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tempfile.mkdtemp(prefix="catimage-tok-"))
    try:
        tokenizer = build_clip_tokenizer(tok_dir / "tokenizer")
        torch.manual_seed(SEED)
        if kind == "sd":
            unet = UNet2DConditionModel(**UNET_SD)
            vae = AutoencoderKL(**VAE, scaling_factor=0.18215)
            text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))
            scheduler = PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            tokenizer_2 = build_clip_tokenizer(tok_dir / "tokenizer_2", pad_token="!")
            unet = UNet2DConditionModel(**UNET_SDXL)
            vae = AutoencoderKL(**VAE, scaling_factor=0.13025, force_upcast=False)
            text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, hidden_act="gelu"))
            scheduler = EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading")
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
            )
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    n_unet = sum(p.numel() for p in unet.parameters())
    (out / _MARKER).write_text(
        json.dumps({"kind": kind, "recipe_version": RECIPE_VERSION, "seed": SEED, "unet_params": n_unet})
    )
    log.info("built tiny %s pipeline in %s (UNet %d parameters)", kind, out, n_unet)
    return out
