"""What one image costs each candidate: TFLOPs counted on the meta device, or seconds measured here.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` while the real diffusers /
transformers modules run on the META device: modules are built from their configs without weights
and every tensor is a shape, so counting SDXL at 1024x1024 needs no GPU, no download and no memory.
Per image:

* UNet: one forward at the latent size (height/8 x width/8) per scheduler evaluation (the length of
  `scheduler.timesteps`, so Heun's 2 evaluations per step are counted), batch 2 under
  classifier-free guidance (guidance_scale > 1), else 1.
* DeepCache (`cache_interval` N): the real `DeepCacheSDHelper` wraps the meta UNet; a full forward
  runs at evaluations 0, N, 2N, ... and the shallow (cached) forward at the others, each counted.
* text encoders: once for the prompt, plus once for the empty negative prompt under guidance in SD
  (SDXL zeroes that embedding instead, `force_zeros_for_empty_prompt`).
* VAE decode: once.
* The scene world's `WorldPipeline` (packed pixel space, no VAE): its UNet at 16 x 16 with
  `WORLD_TEXT_TOKENS` MiniLM tokens of context, and MiniLM itself on the prompt (plus the 2-token
  empty prompt under guidance) as its text encoder.

Convention: FlopCounterMode counts every matmul, including the attention products (Q K^T and
attention x V). Module-hook counters (ptflops/thop-style, as used for published diffusion FLOP
tables) see only Linear and Conv modules and miss those products; `unet_attention_per_step` reports
them separately so either convention can be read off. For SDXL at 1024x1024 with guidance this gives
13.52 TFLOPs per step in total, 11.95 without attention products (the SDXL/DeepCache literature quotes
11.97).

Architectures come from the model folder (`unet/config.json`, ...) when local, from the configs/
folder for known hub ids (public SDXL and SD 1.5 configs), or from the hub cache otherwise.
http candidates have no FLOP count: they keep their declared cost.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from catimage.errors import CatimageError
from catimage.generators.base import diffusers_settings, uses_cfg
from catimage.generators.refs import resolve_model
from catimage.generators.spec import DiffusersSpec
from catimage.generators.tiny import SCHEDULER as RELEASED_SCHEDULE
from catimage.tables.pool import Pool, load_pool

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
TERA = 1e12
FLOP_UNITS = {"tflops": 1.0, "gflops": 1e3}  # counted units, per TFLOP (small world models read better in GFLOPs)

# Public architecture configs (configs/) for hub ids whose folders are not on this machine.
_ARCH_FILES: dict[str, dict[str, str]] = {
    "sdxl": {
        "unet": "sdxl_unet_config.json",
        "vae": "sdxl_vae_config.json",
        "text_encoder": "clip_vit_l14_text_config.json",
        "text_encoder_2": "openclip_vit_bigg14_text_config.json",
    },
    "sd15": {
        "unet": "sd15_unet_config.json",
        "vae": "sd15_vae_config.json",
        "text_encoder": "clip_vit_l14_text_config.json",
    },
}
KNOWN_MODELS: dict[str, str] = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/sdxl-turbo": "sdxl",  # a distilled SDXL base: same UNet, VAE and text encoders
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
}
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "world": 2.0}  # the pipelines' own defaults
WORLD_TEXT_TOKENS = 32  # a typical scene-world prompt in MiniLM word pieces ([CLS] ... [SEP])


@dataclass
class Architecture:
    """Component configs of one pipeline (no weights)."""

    source: str
    unet: dict[str, Any]
    vae: dict[str, Any] | None = None
    text_encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(RELEASED_SCHEDULE))
    force_zeros_for_empty_prompt: bool = True
    class_name: str = ""

    @property
    def kind(self) -> str:
        if self.class_name == "WorldPipeline":
            return "world"
        return "sdxl" if self.unet.get("addition_embed_type") == "text_time" else "sd"

    @property
    def vae_scale_factor(self) -> int:
        if self.kind == "world":
            from catimage.world.pipeline import PACK

            return PACK
        return 2 ** (len(self.vae["block_out_channels"]) - 1) if self.vae else 8


@dataclass
class CostBreakdown:
    """TFLOPs per image of one diffusers candidate (see the module docstring for what is counted)."""

    unet_per_step: float  # one full UNet evaluation, including the guidance batch
    unet_attention_per_step: float  # the attention products inside unet_per_step
    unet_evals: int
    unet_total: float  # all evaluations, DeepCache-aware
    text_encoder: float
    vae_decode: float
    total: float
    height: int
    width: int
    cfg: bool
    deepcache_shallow_step: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_architecture(model: str) -> Architecture:
    """The configs of `model`: a local diffusers folder, a `tiny:` ref, a known hub id, or a cached hub id."""
    path = Path(resolve_model(model))
    if (path / "unet" / "config.json").is_file():
        index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
        zeros = index.get("force_zeros_for_empty_prompt", True)
        sched = path / "scheduler" / "scheduler_config.json"
        return Architecture(
            source=str(path),
            unet=_read_json(path / "unet" / "config.json"),
            vae=_read_json(path / "vae" / "config.json") if (path / "vae" / "config.json").is_file() else None,
            text_encoders={
                name: _read_json(path / name / "config.json")
                for name in _TEXT_ENCODERS
                if (path / name / "config.json").is_file()
            },
            scheduler=_read_json(sched) if sched.is_file() else dict(RELEASED_SCHEDULE),
            force_zeros_for_empty_prompt=bool(zeros),
            class_name=str(index.get("_class_name", "")),
        )
    if model in KNOWN_MODELS:
        files = _ARCH_FILES[KNOWN_MODELS[model]]
        return Architecture(
            source=f"configs/ ({KNOWN_MODELS[model]})",
            unet=_read_json(CONFIG_DIR / files["unet"]),
            vae=_read_json(CONFIG_DIR / files["vae"]),
            text_encoders={n: _read_json(CONFIG_DIR / files[n]) for n in _TEXT_ENCODERS if n in files},
        )
    return _hub_architecture(model)


def _hub_architecture(model: str) -> Architecture:
    from huggingface_hub import hf_hub_download

    def fetch(name: str) -> dict[str, Any] | None:
        try:
            return _read_json(Path(hf_hub_download(model, name)))
        except Exception:  # noqa: BLE001 - a missing component or an offline cache miss
            return None

    unet = fetch("unet/config.json")
    if unet is None:
        raise CatimageError(
            f"no UNet config for {model!r}: give a local diffusers folder, fill the HF cache, or add its "
            f"configs to {CONFIG_DIR} and KNOWN_MODELS in catimage/tables/cost.py (known: {sorted(KNOWN_MODELS)})"
        )
    index = fetch("model_index.json") or {}
    return Architecture(
        source=f"hub ({model})",
        unet=unet,
        vae=fetch("vae/config.json"),
        text_encoders={n: c for n in _TEXT_ENCODERS if (c := fetch(f"{n}/config.json")) is not None},
        scheduler=fetch("scheduler/scheduler_config.json") or dict(RELEASED_SCHEDULE),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def _architecture_for(spec: DiffusersSpec) -> Architecture:
    arch = load_architecture(spec.model)
    if spec.unet:  # an override folder with its own config (a bare state dict shares the base config)
        unet_dir = Path(resolve_model(spec.unet))
        for cand in (unet_dir / "unet" / "config.json", unet_dir / "config.json"):
            if cand.is_file():
                arch.unet = _read_json(cand)
                break
    return arch


def _count(fn: Callable[[], Any]) -> tuple[int, int]:
    """(all FLOPs, attention-product FLOPs) of running `fn`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in by_op.items() if _is_attention_op(str(op)))
    return int(counter.get_total_flops()), int(attention)


def _is_attention_op(name: str) -> bool:
    # On meta, scaled_dot_product_attention decomposes into bmm; on GPU it stays a fused SDPA op.
    # Linear layers show up as mm/addmm, never as bmm, in these models.
    return "bmm" in name or "scaled_dot_product" in name


def _unet_evals(arch: Architecture, settings: Any) -> tuple[int, str | None]:
    """How many UNet evaluations the scheduler makes for `settings.steps` (Heun-type: ~2 per step)."""
    from catimage.generators.diffusers_gen import make_scheduler

    try:
        scheduler = make_scheduler(settings.scheduler, arch.scheduler, settings.scheduler_kwargs)
        scheduler.set_timesteps(settings.steps, device="cpu")
        return len(scheduler.timesteps), None
    except Exception as err:  # noqa: BLE001 - schedulers with extra needs (torchsde, custom sigmas, ...)
        return settings.steps, f"could not run scheduler {settings.scheduler!r} ({err}); counted {settings.steps} evaluations"


class FlopCounter:
    """Counts candidates; identical module/shape combinations are counted once per instance."""

    def __init__(self) -> None:
        self._memo: dict[tuple, Any] = {}

    def _memoised(self, key: tuple, fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def count(self, spec: DiffusersSpec) -> CostBreakdown:
        settings = diffusers_settings(spec)
        arch = _architecture_for(spec)
        scale = arch.vae_scale_factor
        height = int(settings.height or arch.unet["sample_size"] * scale)
        width = int(settings.width or arch.unet["sample_size"] * scale)
        cfg = uses_cfg(settings.guidance_scale, _DEFAULT_GUIDANCE[arch.kind])
        evals, note = _unet_evals(arch, settings)
        notes = [note] if note else []
        full, attention, shallow, unet_total = self._unet(spec, arch, height, width, cfg, evals, notes)
        text = self._text(arch, cfg, notes)
        vae = self._vae(arch, height, width, notes)
        return CostBreakdown(
            unet_per_step=full / TERA,
            unet_attention_per_step=attention / TERA,
            unet_evals=evals,
            unet_total=unet_total / TERA,
            text_encoder=text / TERA,
            vae_decode=vae / TERA,
            total=(unet_total + text + vae) / TERA,
            height=height,
            width=width,
            cfg=cfg,
            deepcache_shallow_step=None if shallow is None else shallow / TERA,
            notes=notes,
        )

    def _unet(self, spec: DiffusersSpec, arch: Architecture, height: int, width: int, cfg: bool, evals: int,
              notes: list[str]) -> tuple[int, int, int | None, int]:
        """(one full evaluation, its attention products, one DeepCache shallow evaluation or None,
        all `evals` evaluations) in FLOPs; the guidance batch is 2."""
        batch = 2 if cfg else 1
        ukey = (json.dumps(arch.unet, sort_keys=True), json.dumps(arch.text_encoders, sort_keys=True), height, width, batch)
        full, attention = self._memoised(ukey + ("full",), lambda: _unet_flops(arch, height, width, batch, None))
        if not (spec.cache_interval and spec.cache_interval > 1 and evals > 1):
            return full, attention, None, evals * full
        shallow = self._memoised(
            ukey + ("deepcache", spec.cache_interval, spec.cache_branch_id),
            lambda: _unet_flops(arch, height, width, batch, (spec.cache_interval, spec.cache_branch_id))[0],
        )
        n_full = math.ceil(evals / spec.cache_interval)
        notes.append(f"DeepCache: {n_full} full + {evals - n_full} shallow UNet evaluations")
        return full, attention, shallow, n_full * full + (evals - n_full) * shallow

    def _text(self, arch: Architecture, cfg: bool, notes: list[str]) -> int:
        """Text encoding of the prompt, plus the empty negative prompt under guidance (SD; SDXL zeroes it)."""
        if arch.kind == "world":
            notes.append(f"MiniLM text encoder counted at {WORLD_TEXT_TOKENS} prompt tokens")
            return self._memoised(("minilm", cfg), lambda: _minilm_flops(cfg))
        if not arch.text_encoders:
            notes.append("no text encoder config: text encoding not counted")
        batch = 1 + int(cfg and not (arch.kind == "sdxl" and arch.force_zeros_for_empty_prompt))
        return sum(
            self._memoised(("text", json.dumps(c, sort_keys=True), batch), lambda c=c: _text_flops(c, batch))
            for c in arch.text_encoders.values()
        )

    def _vae(self, arch: Architecture, height: int, width: int, notes: list[str]) -> int:
        if arch.kind == "world":
            notes.append("pixel-space model: no VAE to decode")
            return 0
        if arch.vae is None:
            notes.append("no VAE config: decoding not counted")
            return 0
        key = ("vae", json.dumps(arch.vae, sort_keys=True), height, width)
        return self._memoised(key, lambda: _vae_flops(arch, height, width))


def count_flops(spec: DiffusersSpec) -> CostBreakdown:
    """TFLOPs per image for one diffusers candidate (meta device; no weights are read)."""
    return FlopCounter().count(spec)


def _unet_flops(arch: Architecture, height: int, width: int, batch: int, deepcache: tuple[int, int] | None) -> tuple[int, int]:
    """FLOPs of one UNet evaluation; with `deepcache`, of a shallow (cached) evaluation instead."""
    import torch
    from diffusers import UNet2DConditionModel

    cfg = arch.unet
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg).eval()
    scale = arch.vae_scale_factor
    meta = {"device": "meta"}
    sample = torch.empty(batch, cfg["in_channels"], height // scale, width // scale, **meta)
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    if arch.kind == "world":  # MiniLM tokens, projected by the UNet's own encoder_hid_proj
        context = torch.empty(batch, WORLD_TEXT_TOKENS, cfg["encoder_hid_dim"], **meta)
    else:
        context = torch.empty(batch, 77, cross, **meta)
    kwargs: dict[str, Any] = {"encoder_hidden_states": context}
    if cfg.get("addition_embed_type") == "text_time":
        te2 = arch.text_encoders.get("text_encoder_2", {})
        pooled = te2.get("projection_dim", 1280)
        n_ids = (cfg["projection_class_embeddings_input_dim"] - pooled) // cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, **meta),
            "time_ids": torch.empty(batch, n_ids, **meta),
        }
    if cfg.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.empty(batch, cfg["time_cond_proj_dim"], **meta)

    with torch.no_grad():
        if deepcache is None:
            return _count(lambda: unet(sample, torch.tensor(999), **kwargs))
        from DeepCache import DeepCacheSDHelper

        interval, branch = deepcache
        # DeepCache reads the step index from pipe.scheduler.timesteps and the timestep argument.
        fake_pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=torch.arange(interval)))
        helper = DeepCacheSDHelper(pipe=fake_pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        try:
            unet(sample, torch.tensor(0), **kwargs)  # full step: fills the cache
            return _count(lambda: unet(sample, torch.tensor(1), **kwargs))  # shallow step
        finally:
            helper.disable()


def _text_flops(config: dict[str, Any], batch: int) -> int:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    cls = CLIPTextModelWithProjection if "Projection" in arch else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig.from_dict(config)).eval()
    ids = torch.zeros(batch, config.get("max_position_embeddings", 77), dtype=torch.long, device="meta")
    with torch.no_grad():
        return _count(lambda: model(ids, output_hidden_states=True))[0]


def _minilm_flops(cfg: bool) -> int:
    """MiniLM (the world pipeline's text encoder) on one prompt, plus the empty prompt under guidance."""
    import torch
    from transformers import BertConfig, BertModel

    from catimage.features.text import minilm_model_path

    # eager attention: the SDPA mask path inspects mask values, which meta tensors do not have
    config = BertConfig.from_pretrained(minilm_model_path(), attn_implementation="eager")
    with torch.device("meta"):
        model = BertModel(config).eval()

    def run(tokens: int) -> int:
        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        mask = torch.ones(1, tokens, dtype=torch.long, device="meta")  # else BERT peeks at values
        with torch.no_grad():
            return _count(lambda: model(ids, attention_mask=mask))[0]

    return run(WORLD_TEXT_TOKENS) + (run(2) if cfg else 0)


def _vae_flops(arch: Architecture, height: int, width: int) -> int:
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(arch.vae).eval()
    scale = arch.vae_scale_factor
    latents = torch.empty(1, arch.vae["latent_channels"], height // scale, width // scale, device="meta")
    with torch.no_grad():
        return _count(lambda: vae.decode(latents))[0]


def measure_seconds(spec: DiffusersSpec, n_images: int = 2, device: str | None = None, prompts: list[str] | None = None) -> float:
    """Wall-clock seconds per image on `device` (default: cuda if available), one image per call,
    after one warm-up image. Loads the model, so it needs the weights (or a `tiny:` model)."""
    import torch

    from catimage.generators import generation_seed, make_generator

    if n_images < 1:
        raise CatimageError(f"n_images must be >= 1, got {n_images}")
    prompts = prompts or ["a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dusk"]
    generator = make_generator(spec, device=device)
    try:
        dev = getattr(generator, "device", None)

        def sync() -> None:
            if dev is not None and dev.type == "cuda":
                torch.cuda.synchronize(dev)

        generator.generate([prompts[0]], [generation_seed("warm-up", 0)])
        sync()
        start = time.perf_counter()
        for i in range(n_images):
            generator.generate([prompts[i % len(prompts)]], [generation_seed("measure", i)])
        sync()
        return (time.perf_counter() - start) / n_images
    finally:
        generator.close()


COUNTED_UNITS: tuple[str, ...] = (*FLOP_UNITS, "seconds")


def counted_candidates(pool: Pool) -> list[str]:
    """The candidates `catimage cost` can count or time: those with a diffusers generator."""
    return [c.name for c in pool.candidates if isinstance(c.generator, DiffusersSpec)]


def _check_counted_unit(unit: str) -> None:
    if unit not in COUNTED_UNITS:
        raise CatimageError(
            f"unknown cost unit {unit!r} to count in: use tflops or gflops (counted on the meta device) or seconds "
            "(measured here)"
        )


def count_pool_costs(
    pool: Pool,
    unit: str = "tflops",
    n_images: int = 2,
    device: str | None = None,
    counter: FlopCounter | None = None,
) -> dict[str, float]:
    """Cost per image of every diffusers candidate in `pool`, in `unit` ('tflops', 'gflops' or 'seconds').

    Candidates without a diffusers generator (http, or no generator block) are left out: they keep
    their declared cost. Pass a `counter` to reuse counts across calls.
    """
    _check_counted_unit(unit)
    counter = counter or FlopCounter()
    costs: dict[str, float] = {}
    for cand in pool.candidates:
        if not isinstance(cand.generator, DiffusersSpec):
            log.info("%s: no diffusers generator; keeping its declared cost %s", cand.name, cand.cost)
            continue
        if unit in FLOP_UNITS:
            breakdown = counter.count(cand.generator)
            costs[cand.name] = breakdown.total * FLOP_UNITS[unit]
            log.info("%s: %.4g TFLOPs per image (%s)", cand.name, breakdown.total, breakdown)
        else:
            costs[cand.name] = measure_seconds(cand.generator, n_images=n_images, device=device)
            log.info("%s: %.4g s per image", cand.name, costs[cand.name])
    return costs


def check_unit_change(pool: Pool, unit: str) -> None:
    """Refuse to relabel `pool` in `unit` while some candidate keeps a declared cost in another unit.

    The candidates `catimage cost` cannot count (http, no generator) keep their declared costs: in a
    pool relabelled to another unit those numbers would silently change meaning. Checked before any
    counting, so a long seconds measurement never ends in a refusal.
    """
    _check_counted_unit(unit)
    counted = set(counted_candidates(pool))
    kept = [c.name for c in pool.candidates if c.name not in counted and c.cost is not None]
    if kept and pool.cost_unit != unit:
        raise CatimageError(
            f"candidates {kept} keep declared costs in {pool.cost_unit}, which `catimage cost` cannot count, but the "
            f"counted costs would be in {unit}: convert their costs to {unit} first (or drop them, or count in "
            f"{pool.cost_unit}) so that one pool holds one unit"
        )


def write_pool_costs(
    pool_path: str | Path,
    out_path: str | Path | None = None,
    unit: str = "tflops",
    n_images: int = 2,
    device: str | None = None,
    counter: FlopCounter | None = None,
) -> Pool:
    """Count the pool's costs and save the pool with them in `unit` (to `out_path`, default: in place).

    What `catimage cost --out` runs. Refuses to mix units (`check_unit_change`) before counting.
    Returns the saved pool.
    """
    pool = load_pool(pool_path)
    check_unit_change(pool, unit)
    costs = count_pool_costs(pool, unit=unit, n_images=n_images, device=device, counter=counter)
    updated = pool.with_costs(costs).model_copy(update={"cost_unit": unit})
    if pool.costs_assumed and all(c.name in costs for c in pool.candidates):
        updated = updated.model_copy(update={"costs_assumed": False})
    updated.save(out_path or pool_path)
    return updated
