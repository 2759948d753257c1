"""FLOP counting on the meta device, checked against hand-computed counts, a real CPU run of the
whole tiny pipeline, published parameter counts, and the SDXL per-step figure from the literature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from catimage.errors import CatimageError
from catimage.generators import make_generator
from catimage.generators.spec import DiffusersSpec
from catimage.tables.cost import (
    CONFIG_DIR,
    FlopCounter,
    count_pool_costs,
    load_architecture,
    measure_seconds,
    write_pool_costs,
)
from catimage.tables.pool import load_pool, pool_from_dict

REPO = Path(__file__).resolve().parents[1]
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


pytestmark = pytest.mark.usefixtures("tiny_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def counter() -> FlopCounter:
    """Shared so that the SDXL 1024x1024 UNet forward is counted once for the whole module."""
    return FlopCounter()


def attention_flops(levels: list[tuple[int, int, int]], batch: int, text_len: int = 77) -> int:
    """Q K^T and attention x V FLOPs: per transformer block 2*2*N*N*C (self) + 2*2*N*77*C (cross),
    for `levels` = [(tokens N, channels C, number of transformer blocks)]."""
    return batch * sum(n_blocks * (4 * n * n * c + 4 * n * text_len * c) for n, c, n_blocks in levels)


def test_public_configs_match_published_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def params(build) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build().parameters())

    def cfg(name: str) -> dict:
        return json.loads((CONFIG_DIR / name).read_text())

    assert params(lambda: UNet2DConditionModel.from_config(cfg("sdxl_unet_config.json"))) == 2_567_463_684
    assert params(lambda: UNet2DConditionModel.from_config(cfg("sd15_unet_config.json"))) == 859_520_964
    assert params(lambda: AutoencoderKL.from_config(cfg("sdxl_vae_config.json"))) == 83_653_863
    assert params(lambda: CLIPTextModel(CLIPTextConfig.from_dict(cfg("clip_vit_l14_text_config.json")))) == 123_060_480
    big_g = cfg("openclip_vit_bigg14_text_config.json")
    assert params(lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(big_g))) == 694_659_840


def test_sdxl_1024_per_step_matches_the_literature(counter):
    b = counter.count(DiffusersSpec(model=SDXL, steps=50, guidance_scale=5.0))
    assert (b.height, b.width, b.cfg, b.unet_evals) == (1024, 1024, True, 50)
    # Attention products, by hand: 64x64 latent level (N=4096, C=640) has 10 transformer blocks,
    # 32x32 (N=1024, C=1280) has 60 (down 20, mid 10, up 30); batch 2 under guidance.
    assert b.unet_attention_per_step * 1e12 == pytest.approx(attention_flops([(4096, 640, 10), (1024, 1280, 60)], 2), rel=1e-9)
    # Linear + conv FLOPs (the module-hook convention of the published 11.97 TFLOPs per step).
    linear_conv = b.unet_per_step - b.unet_attention_per_step
    assert abs(linear_conv - 11.97) / 11.97 < 0.10
    assert linear_conv == pytest.approx(11.95, abs=0.01)
    assert b.unet_per_step == pytest.approx(13.52, abs=0.01)


def hook_flops(module: torch.nn.Module, run) -> int:
    """An independent counter (the ptflops/thop convention): 2 x multiply-adds of every Conv2d and
    Linear, computed from the shapes their forward hooks see. It cannot see attention products."""
    total = [0]

    def conv(mod, _inp, out):
        total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    def linear(mod, _inp, out):
        total[0] += 2 * out.numel() * mod.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def test_sdxl_1024_whole_image_matches_an_independent_count(counter):
    """50 guided Euler steps at 1024x1024, each part counted without FlopCounterMode: the UNet and
    VAE by forward hooks on their layers plus attention products by hand, the text encoders by hand
    from their published widths (2 x weights x 77 tokens + attention products)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def cfg(name: str) -> dict:
        return json.loads((CONFIG_DIR / name).read_text())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("sdxl_unet_config.json")).eval()
        vae = AutoencoderKL.from_config(cfg("sdxl_vae_config.json")).eval()
    meta = {"device": "meta"}
    context = {"encoder_hidden_states": torch.empty(2, 77, 2048, **meta),
               "added_cond_kwargs": {"text_embeds": torch.empty(2, 1280, **meta), "time_ids": torch.empty(2, 6, **meta)}}
    latents = torch.empty(2, 4, 128, 128, **meta)
    unet_step = hook_flops(unet, lambda: unet(latents, torch.tensor(999), **context))
    unet_step += attention_flops([(4096, 640, 10), (1024, 1280, 60)], 2)
    # VAE decode: its layers, plus the mid-block's single-head self-attention over 128 x 128 latents.
    vae_decode = hook_flops(vae, lambda: vae.decode(torch.empty(1, 4, 128, 128, **meta)))
    vae_decode += 4 * (128 * 128) ** 2 * 512

    def clip_text(width: int, layers: int) -> int:  # q, k, v, o (width^2 each) and a 4x-wide MLP per layer
        return 2 * 77 * layers * (4 * width**2 + 2 * width * 4 * width) + 4 * 77 * 77 * width * layers

    # CLIP ViT-L/14 (768 wide, 12 layers) + OpenCLIP bigG (1280, 32) with its projection of the pooled
    # token; one prompt only: SDXL zeroes the empty prompt's embedding instead of encoding it.
    text = clip_text(768, 12) + clip_text(1280, 32) + 2 * 1280 * 1280

    b = counter.count(DiffusersSpec(model=SDXL, steps=50, guidance_scale=5.0))
    assert b.unet_evals == 50
    assert b.unet_per_step * 1e12 == pytest.approx(unet_step, rel=1e-9)
    assert b.vae_decode * 1e12 == pytest.approx(vae_decode, rel=1e-9)
    assert b.text_encoder * 1e12 == pytest.approx(text, rel=1e-9)
    assert b.total * 1e12 == pytest.approx(50 * unet_step + vae_decode + text, rel=1e-9)
    assert b.total == pytest.approx(686.705, abs=1e-3)  # the cost configs/sdxl_pool.yaml declares


def test_tiny_counts_match_a_real_cpu_run_of_the_whole_pipeline(counter):
    """End to end: the meta count equals FlopCounterMode over a real CPU generation (text encoders,
    every UNet step with guidance, DeepCache's shallow steps, VAE decode). On CPU the fused SDPA
    kernel is invisible to the counter, so the real run uses the explicit-matmul attention paths."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    for spec in (
        DiffusersSpec(model="tiny:sd", steps=2, guidance_scale=5.0),
        DiffusersSpec(model="tiny:sdxl", steps=3, guidance_scale=5.0, cache_interval=2),
        DiffusersSpec(model="tiny:sdxl", steps=1, guidance_scale=0.0),
    ):
        expected = counter.count(spec)
        gen = make_generator(spec, device="cpu")
        gen.pipe.unet.set_attn_processor(AttnProcessor())
        gen.pipe.vae.set_attn_processor(AttnProcessor())
        for enc in (gen.pipe.text_encoder, getattr(gen.pipe, "text_encoder_2", None)):
            if enc is not None:
                enc.config._attn_implementation = "eager"
        real = FlopCounterMode(display=False)
        with real:
            gen.generate(["a small red house"], [4])
        assert real.get_total_flops() == round(expected.total * 1e12), spec


def test_tiny_unet_attention_is_the_hand_count(counter):
    b = counter.count(DiffusersSpec(model="tiny:sd", steps=2, guidance_scale=5.0))
    # tiny SD UNet: 8x8 latent (N=64, C=32) 1 down + 2 up blocks; 4x4 (N=16, C=32) 1 + 2; mid 2x2 (N=4, C=64).
    assert b.unet_attention_per_step * 1e12 == pytest.approx(attention_flops([(64, 32, 3), (16, 32, 3), (4, 64, 1)], 2))


def test_steps_guidance_schedulers_and_deepcache_scale_the_count(counter):
    def count(**kw):
        return counter.count(DiffusersSpec(model="tiny:sdxl", **kw))

    two, four = count(steps=2, guidance_scale=5.0), count(steps=4, guidance_scale=5.0)
    assert four.unet_total == pytest.approx(2 * two.unet_total)
    assert (four.vae_decode, four.text_encoder) == (two.vae_decode, two.text_encoder)
    no_cfg = count(steps=2, guidance_scale=1.0)
    assert no_cfg.unet_per_step == pytest.approx(two.unet_per_step / 2) and not no_cfg.cfg
    assert count(steps=2).cfg  # no guidance given: SDXL's default 5.0 runs guidance
    assert count(steps=5, scheduler="heun", guidance_scale=5.0).unet_evals == 9  # 2 per step but the last
    assert count(steps=5, scheduler="ddim", guidance_scale=5.0).unet_evals == 5
    assert count(steps=6, guidance_scale=5.0, cache_interval=1).total == pytest.approx(count(steps=6, guidance_scale=5.0).total)
    cached = count(steps=6, guidance_scale=5.0, cache_interval=4)
    assert 0 < cached.deepcache_shallow_step < cached.unet_per_step / 2
    # full at steps 0 and 4, shallow at 1, 2, 3, 5
    assert cached.unet_total == pytest.approx(2 * cached.unet_per_step + 4 * cached.deepcache_shallow_step)
    turbo = count(preset="sdxl-turbo", height=32, width=32)
    assert (turbo.unet_evals, turbo.cfg, turbo.height) == (1, False, 32)


def test_sdxl_pool_file_loads_with_counted_costs(counter):
    pool = load_pool(REPO / "configs" / "sdxl_pool.yaml")
    assert pool.cost_unit == "tflops" and len(pool.names) == 11
    assert [m.name for m in pool.metrics] == ["clip_score", "image_reward", "aesthetic", "sharpness"]
    assert pool.metrics[0].params["model"] == "ViT-H-14" and pool.metrics[0].params["pretrained"] == "laion2b_s32b_b79k"
    assert all(c.build.num_gpus == 1 and c.serve.num_gpus == 1 for c in pool.candidates)
    steps = [pool.get(f"sdxl-euler-{n}").generator.steps for n in (1, 2, 4, 8, 20, 50, 100)]
    assert steps == [1, 2, 4, 8, 20, 50, 100]
    assert pool.get("sdxl-deepcache-50").generator.cache_interval == 3
    assert pool.get("sdxl-ddim-50").generator.scheduler == "ddim"
    # The declared costs are this counter's (the candidates that share the 1024x1024 guided UNet).
    for name in ("sdxl-euler-1", "sdxl-euler-50", "sdxl-euler-100", "sdxl-ddim-50"):
        assert pool.get(name).cost == pytest.approx(counter.count(pool.get(name).generator).total, abs=1e-3)
    costs = pool.cost_vector()
    assert costs.argmin() == pool.names.index("sdxl-turbo") and costs.argmax() == pool.names.index("sdxl-euler-100")


def test_sdxl_pool_costs_are_all_the_counters(counter):
    pool = load_pool(REPO / "configs" / "sdxl_pool.yaml")
    counted = count_pool_costs(pool, counter=counter)
    assert counted == pytest.approx({c.name: c.cost for c in pool.candidates}, abs=1e-3)


def _tiny_pool(tmp_path: Path, cost_unit: str = "tflops") -> Path:
    pool = pool_from_dict(
        {
            "cost_unit": cost_unit,
            "costs_assumed": True,
            "candidates": [
                {"name": "tiny-2", "cost": 1.0, "generator": {"model": "tiny:sd", "steps": 2}},
                {"name": "tiny-4", "generator": {"model": "tiny:sd", "steps": 4}},
                {"name": "api", "cost": 3.0, "generator": {"kind": "http", "url": "http://127.0.0.1:9/v1", "model": "m"}},
            ],
        }
    )
    path = tmp_path / "pool.yaml"
    pool.save(path)
    return path


def test_count_and_write_pool_costs(tmp_path, counter):
    path = _tiny_pool(tmp_path)
    costs = count_pool_costs(load_pool(path), counter=counter)
    assert set(costs) == {"tiny-2", "tiny-4"}  # http keeps its declared cost
    assert costs["tiny-4"] > costs["tiny-2"] > 0
    out = tmp_path / "counted.yaml"
    written = write_pool_costs(path, out, counter=counter)
    again = load_pool(out)
    assert again.get("tiny-4").cost == pytest.approx(costs["tiny-4"]) and again.get("api").cost == 3.0
    assert again.cost_unit == "tflops" and written.costs_assumed  # the api cost is still assumed
    with pytest.raises(CatimageError, match="one pool holds one unit"):
        write_pool_costs(_tiny_pool(tmp_path, cost_unit="usd"), out, counter=counter)
    with pytest.raises(CatimageError, match="unknown cost unit"):
        count_pool_costs(load_pool(path), unit="watts")


def test_measure_seconds_on_tiny():
    seconds = measure_seconds(DiffusersSpec(model="tiny:sd", steps=2), n_images=1, device="cpu")
    assert 0 < seconds < 30


def test_unknown_hub_model_says_what_to_do():
    with pytest.raises(CatimageError, match="no UNet config"):
        load_architecture("someone/not-a-cached-model")
    assert load_architecture("stabilityai/sdxl-turbo").kind == "sdxl"
    assert load_architecture("runwayml/stable-diffusion-v1-5").kind == "sd"
