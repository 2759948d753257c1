"""A diffusers text-to-image generator (Stable Diffusion / SDXL), loaded once and reused.

Reproducibility contract: image i is drawn from its own CPU `torch.Generator` seeded with seeds[i];
the initial latent is drawn from it on the CPU (so the same seed gives the same starting noise on
any device and in any batch), and the same generator then feeds stochastic schedulers. Step
variants of one model therefore share their initial noise and differ only in the denoising.

Pipelines are loaded with the explicit classes (StableDiffusionPipeline / StableDiffusionXLPipeline)
rather than AutoPipelineForText2Image: with diffusers 0.39 beside transformers 4.55 (the pinned
pair) importing the auto-pipeline module fails on an unrelated pipeline (krea2 needs a newer
transformers). `pipeline: auto` reads `_class_name` from the model's model_index.json instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from catimage.errors import CatimageError
from catimage.generators.base import Generator, diffusers_settings
from catimage.generators.refs import resolve_model
from catimage.generators.spec import DiffusersSpec, scheduler_class_name

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


WORLD_PIPELINE = "WorldPipeline"


def pipeline_class_name(kind: str, model: str) -> str:
    """'StableDiffusionPipeline', 'StableDiffusionXLPipeline' or 'WorldPipeline' for a spec's
    `pipeline` and model path."""
    if kind == "sd":
        return "StableDiffusionPipeline"
    if kind == "sdxl":
        return "StableDiffusionXLPipeline"
    if kind == "world":
        return WORLD_PIPELINE
    index = Path(model) / "model_index.json"
    try:
        if index.is_file():
            name = json.loads(index.read_text())["_class_name"]
        else:
            from diffusers import DiffusionPipeline

            name = DiffusionPipeline.load_config(model)["_class_name"]
    except Exception as err:  # noqa: BLE001 - offline hub miss, malformed folder, ...: one clear error
        raise CatimageError(
            f"cannot read model_index.json of {model!r} ({type(err).__name__}: {err}); give a local "
            "diffusers folder or a cached hub id, or set `pipeline: sd|sdxl|world` in the generator block"
        ) from None
    if name == WORLD_PIPELINE:
        return WORLD_PIPELINE
    if "XL" in name:
        return "StableDiffusionXLPipeline"
    if name.startswith("StableDiffusion"):
        return "StableDiffusionPipeline"
    raise CatimageError(f"{model!r} is a {name}; catimage runs StableDiffusion, StableDiffusionXL and WorldPipeline text-to-image pipelines")


def pipeline_class(name: str) -> Any:
    """The class behind a `pipeline_class_name` result (the world pipeline lives in catimage.world)."""
    if name == WORLD_PIPELINE:
        from catimage.world.pipeline import WorldPipeline

        return WorldPipeline
    import diffusers

    return getattr(diffusers, name)


def make_scheduler(name: str, base_config: Any, extra: dict[str, Any] | None = None) -> Any:
    """`SchedulerClass.from_config(base_config, **extra)` for a short name ('euler', 'ddim', 'lcm', ...)."""
    import diffusers

    cls_name, alias_kwargs = scheduler_class_name(name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise CatimageError(f"diffusers has no scheduler {cls_name!r} (from {name!r})")
    return cls.from_config(base_config, **{**alias_kwargs, **(extra or {})})


def load_unet(ref: str, base_model: str, dtype: torch.dtype) -> Any:
    """A UNet override: a diffusers folder, a local .safetensors state dict, or 'repo_id/file.safetensors'.

    A bare state dict (SDXL-Lightning ships one) is loaded into the base model's UNet config, as the
    Lightning model card does; the module is built on the meta device first so that no time is spent
    on a random initialisation that the checkpoint overwrites.
    """
    from diffusers import UNet2DConditionModel

    path = Path(ref)
    if path.is_dir():
        sub = "unet" if (path / "unet" / "config.json").is_file() else None
        return UNet2DConditionModel.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype)
    if not path.is_file():
        if not ref.endswith(".safetensors"):
            return UNet2DConditionModel.from_pretrained(ref, subfolder="unet", torch_dtype=dtype)
        from huggingface_hub import hf_hub_download

        repo, _, filename = ref.rpartition("/")
        try:
            path = Path(hf_hub_download(repo, filename))
        except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear error
            raise CatimageError(f"cannot fetch UNet checkpoint {ref!r} ({type(err).__name__}: {err}); download it and give the local path") from None
    from safetensors.torch import load_file

    config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = load_file(str(path))
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CatimageError(f"UNet checkpoint {path} does not fit the UNet of {base_model!r}: {err}") from None
    return unet.to(dtype)


def enable_deepcache(pipe: Any, cache_interval: int, cache_branch_id: int) -> Any:
    """Wrap `pipe.unet` with DeepCache (reuse deep features, recompute them every `cache_interval` steps)."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise CatimageError("cache_interval needs the DeepCache package: pip install DeepCache==0.1.1") from None
    block, layer = cache_branch_id // 3, cache_branch_id % 3
    down = pipe.unet.down_blocks
    if block >= len(down) or layer >= len(down[block].resnets):
        raise CatimageError(
            f"cache_branch_id {cache_branch_id} (block {block}, layer {layer}) does not exist in this UNet "
            f"({len(down)} down blocks of {len(down[0].resnets)} layers); use 0 (the shallowest branch)"
        )
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
    helper.enable()
    return helper


class DiffusersGenerator(Generator):
    """Loads the pipeline once (in the constructor) and draws images on `device`."""

    def __init__(self, spec: DiffusersSpec, device: str | None = None) -> None:
        self.spec = spec
        self.settings = diffusers_settings(spec)
        self.device = torch.device(device or spec.device or default_device())
        self.dtype = _DTYPES[spec.dtype]
        if self.device.type == "cpu" and self.dtype == torch.float16:
            log.warning("float16 is slow or unsupported on CPU; loading %s in float32", spec.model)
            self.dtype = torch.float32
        self.model_path = resolve_model(spec.model)
        cls = pipeline_class(pipeline_class_name(spec.pipeline, self.model_path))
        kwargs: dict[str, Any] = {"torch_dtype": self.dtype}
        if spec.variant:
            kwargs["variant"] = spec.variant
        if spec.unet:
            kwargs["unet"] = load_unet(resolve_model(spec.unet), self.model_path, self.dtype)
        try:
            pipe = cls.from_pretrained(self.model_path, **kwargs)
        except (OSError, ValueError) as err:
            raise CatimageError(
                f"cannot load {spec.model!r} as {cls.__name__} ({err}); check the path or hub id "
                "(offline machines need a local folder or a pre-filled HF cache)"
            ) from None
        pipe.scheduler = make_scheduler(self.settings.scheduler, pipe.scheduler.config, self.settings.scheduler_kwargs)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.deepcache = (
            enable_deepcache(self.pipe, spec.cache_interval, spec.cache_branch_id) if spec.cache_interval else None
        )
        scale = self.pipe.vae_scale_factor
        native = self.pipe.unet.config.sample_size * scale
        self.height = int(self.settings.height or native)
        self.width = int(self.settings.width or native)
        if self.height % scale or self.width % scale:
            raise CatimageError(f"height and width must be multiples of {scale}, got {self.height}x{self.width}")
        log.info(
            "loaded %s (%s) on %s: %d steps, %s, guidance %s, %dx%d%s", spec.model, cls.__name__, self.device,
            self.settings.steps, self.settings.scheduler, self.settings.guidance_scale, self.height, self.width,
            f", DeepCache every {spec.cache_interval}" if spec.cache_interval else "",
        )

    def latent_shape(self) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        # The world pipeline's UNet also takes coordinate planes: its sample has fewer channels.
        channels = getattr(self.pipe, "latent_channels", self.pipe.unet.config.in_channels)
        return (channels, self.height // scale, self.width // scale)

    def noise(self, seeds: list[int]) -> tuple[list[torch.Generator], torch.Tensor]:
        """One CPU generator per seed and the initial latents drawn from them (float32, CPU)."""
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = torch.stack([torch.randn(self.latent_shape(), generator=g, dtype=torch.float32) for g in gens])
        return gens, latents

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """The starting noise for `seeds` (before the scheduler scales it by init_noise_sigma)."""
        return self.noise(seeds)[1]

    @property
    def text_features(self) -> dict[str, Any] | None:
        """The text encoder (an `Embedder.identity()`) whose per-token features `generate` takes as
        `prompt_tokens` in place of encoding the prompts; None when the pipeline encodes its own."""
        identity = getattr(self.pipe, "text_feature_identity", None)
        return None if identity is None else identity()

    def _pipe_kwargs(self, prompts: list[str], seeds: list[int], steps: int) -> dict[str, Any]:
        """The pipeline call that draws `prompts` with `seeds` in `steps` denoising steps."""
        gens, latents = self.noise(seeds)
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "num_inference_steps": steps,
            "height": self.height,
            "width": self.width,
            "latents": latents.to(self.device, self.dtype),
            "generator": gens,
            "output_type": "pil",
        }
        if self.settings.guidance_scale is not None:
            kwargs["guidance_scale"] = self.settings.guidance_scale
        return kwargs

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int],
                 prompt_tokens: Sequence[np.ndarray | None] | None = None) -> list[Image.Image]:
        """`prompt_tokens`: per prompt, its `text_features` tokens or None (encoded here); only for a
        pipeline that has `text_features`."""
        self._check_batch(prompts, seeds)
        if not prompts:
            return []
        kwargs = self._pipe_kwargs(prompts, seeds, self.settings.steps)
        if prompt_tokens is not None:
            if self.text_features is None:
                raise CatimageError(f"{type(self.pipe).__name__} encodes its own prompts; it takes no prompt_tokens")
            kwargs["prompt_tokens"] = list(prompt_tokens)
        return list(self.pipe(**kwargs).images)

    WARM_UP_PROMPT = "a red circle"

    @torch.inference_mode()
    def warm_up(self) -> int:
        """One image at one denoising step: the text encoder, the UNet and the decoder each run once
        (a lazily loaded text encoder loads now), at a fraction of a drawing's cost."""
        self.pipe(**self._pipe_kwargs([self.WARM_UP_PROMPT], [0], steps=1))
        return 1

    def close(self) -> None:
        if self.deepcache is not None:
            self.deepcache.disable()
        self.pipe = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
