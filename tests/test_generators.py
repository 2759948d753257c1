"""Generators: tiny SD/SDXL pipelines through the real diffusers loading path, seeds, schedulers,
presets, DeepCache, and the http generator against a real local HTTP server."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import torch
from PIL import Image

from catimage.errors import CatimageError
from catimage.generators import (
    DiffusersSpec,
    HttpSpec,
    diffusers_settings,
    generation_seed,
    is_tiny,
    make_generator,
    resolve_model,
)
from catimage.generators.diffusers_gen import make_scheduler
from catimage.generators.spec import SCHEDULERS, parse_generator_spec
from catimage.generators.tiny import VOCAB_SIZE, build_clip_tokenizer, cache_root

pytestmark = pytest.mark.usefixtures("tiny_cache")  # tests/conftest.py


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def tiny_gens() -> dict[str, object]:
    """One 2-step generator per tiny kind, loaded once (as a Ray actor would)."""
    return {
        kind: make_generator({"model": f"tiny:{kind}", "steps": 2, "guidance_scale": 5.0}, device="cpu")
        for kind in ("sd", "sdxl")
    }


# --------------------------------------------------------------------------------------------- seeds


def test_generation_seed_is_a_stable_hash():
    expected = int.from_bytes(hashlib.sha256(b"p1\x1f0").digest()[:8], "big") % 2**31
    assert generation_seed("p1", 0) == expected == 846256830
    seeds = {generation_seed(f"p{i}", j) for i in range(50) for j in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
    with pytest.raises(CatimageError):
        generation_seed("p1", -1)


# --------------------------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_ids_match_open_clip(tmp_path: Path):
    import open_clip

    tok = build_clip_tokenizer(tmp_path / "tok")  # SD's tokenizer: pads with <|endoftext|>
    assert len(tok) == VOCAB_SIZE
    prompts = [
        "a photo of a cat",
        "An astronaut riding a horse on Mars, 4k, trending on ArtStation!!",
        "Café crème & croissants — 3 pieces, isn't it?",
        " ".join(["very long prompt"] * 40),  # over 77 tokens: truncated, EOT kept last
    ]
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    theirs = open_clip.tokenize(prompts)  # pads with 0
    eot = VOCAB_SIZE - 1
    assert torch.equal(ours, torch.where(theirs == 0, eot, theirs))
    assert ours[0, 0] == VOCAB_SIZE - 2 and ours[3, -1] == eot and (theirs[1] == 748).any()  # '!!' is one token
    # SDXL's second tokenizer pads with '!' (id 0), so its padded ids equal open_clip's exactly. Like the
    # released SDXL tokenizer_2, it then treats '!' as a special token, so avoid '!' in this check.
    tok2 = build_clip_tokenizer(tmp_path / "tok2", pad_token="!")
    plain = [prompts[0], prompts[2], prompts[3]]
    ids2 = tok2(plain, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids2, open_clip.tokenize(plain))


# --------------------------------------------------------------------------------------------- tiny pipelines


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_tiny_pipeline_generates_reproducibly(tiny_gens, kind: str):
    gen = tiny_gens[kind]
    assert type(gen.pipe).__name__ == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert type(gen.pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the default
    assert 0.5e6 < sum(p.numel() for p in gen.pipe.unet.parameters()) < 2e6
    prompts, seeds = ["a red cube", "a blue sphere", "a red cube"], [11, 11, 12]
    images = gen.generate(prompts, seeds)
    assert [im.size for im in images] == [(64, 64)] * 3 and all(im.mode == "RGB" for im in images)
    again = gen.generate(prompts[:1], seeds[:1])
    # Same prompt and seed: identical alone or in a batch (up to 1 level of rounding on CPU BLAS).
    assert np.abs(pixels(again[0]) - pixels(images[0])).max() <= 2
    assert np.array_equal(pixels(gen.generate(prompts[:1], seeds[:1])[0]), pixels(again[0]))
    # Another seed, same prompt: different noise, a different image.
    assert np.abs(pixels(images[2]) - pixels(images[0])).mean() > 5
    assert gen.generate([], []) == []
    with pytest.raises(CatimageError, match="one seed per prompt"):
        gen.generate(["a", "b"], [1])


def test_step_variants_share_initial_noise(tiny_gens):
    """Steps 2 vs 4 of one model start from the same latent; only the denoising differs."""
    gens = [tiny_gens["sdxl"], make_generator({"model": "tiny:sdxl", "steps": 4, "guidance_scale": 5.0}, device="cpu")]
    seen = []
    for gen in gens:
        original = gen.pipe.prepare_latents

        def spy(*args, _original=original, _gen=gen, **kwargs):
            out = _original(*args, **kwargs)
            seen.append(out / _gen.pipe.scheduler.init_noise_sigma)  # undo the scheduler's scaling
            return out

        gen.pipe.prepare_latents = spy
    try:
        images = [gen.generate(["a castle"], [generation_seed("prompt-7", 0)])[0] for gen in gens]
    finally:
        del gens[0].pipe.prepare_latents  # the shared generator gets its own method back
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(seen[0], gens[0].initial_latents([generation_seed("prompt-7", 0)]))
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_tiny_resolution_is_safe_twice_and_concurrently(tmp_path, monkeypatch):
    monkeypatch.setenv("CATIMAGE_CACHE", str(tmp_path))
    with ThreadPoolExecutor(2) as pool:  # two builders at once: one builds, the other waits
        paths = list(pool.map(resolve_model, ["tiny:sd", "tiny:sd"]))
    assert paths[0] == paths[1] == str(tmp_path / "tiny" / "sd")
    folder = Path(paths[0])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny:sd") == paths[0]  # third call: reused, not rebuilt
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "tiny").iterdir() if not p.name.endswith(".lock")] == ["sd"]
    # A folder from another recipe version (or a crashed build without its marker) is rebuilt in place.
    marker = folder / "catimage_tiny.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "recipe_version": -1}))
    assert resolve_model("tiny:sd") == paths[0]
    assert json.loads(marker.read_text())["recipe_version"] != -1
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns != stamp
    assert [p.name for p in (tmp_path / "tiny").iterdir() if not p.name.endswith(".lock")] == ["sd"]
    assert resolve_model("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"
    with pytest.raises(CatimageError, match="unknown tiny pipeline"):
        resolve_model("tiny:sd3")
    assert cache_root() == tmp_path / "tiny"


def test_is_tiny():
    pool_block = parse_generator_spec({"model": "tiny:sd"})
    assert is_tiny(pool_block) and is_tiny("tiny:sdxl") and is_tiny({"model": "tiny:sd"})
    assert not is_tiny(DiffusersSpec(model="stabilityai/stable-diffusion-xl-base-1.0"))
    assert not is_tiny(HttpSpec(kind="http", url="http://x", model="m")) and not is_tiny(None)


# --------------------------------------------------------------------------------------------- schedulers, presets


def test_scheduler_names_map_to_diffusers_classes(tiny_gens):
    config = tiny_gens["sd"].pipe.scheduler.config
    for name, (cls_name, extra) in SCHEDULERS.items():
        sched = make_scheduler(name, config)
        assert type(sched).__name__ == cls_name
        for key, value in extra.items():
            assert sched.config[key] == value
    assert make_scheduler("euler", config, {"timestep_spacing": "trailing"}).config.timestep_spacing == "trailing"
    assert type(make_scheduler("UniPCMultistepScheduler", config)).__name__ == "UniPCMultistepScheduler"
    with pytest.raises(ValueError, match="unknown scheduler"):
        DiffusersSpec(model="m", scheduler="eulr")
    gen = make_generator({"model": "tiny:sd", "steps": 2, "scheduler": "ddim", "guidance_scale": 1.0}, device="cpu")
    assert type(gen.pipe.scheduler).__name__ == "DDIMScheduler"
    assert gen.generate(["a tree"], [3])[0].size == (64, 64)


def test_presets_fill_recipes_and_explicit_fields_win():
    turbo = diffusers_settings(DiffusersSpec(model="stabilityai/sdxl-turbo", preset="sdxl-turbo"))
    assert (turbo.steps, turbo.guidance_scale, turbo.height, turbo.width, turbo.scheduler) == (1, 0.0, 512, 512, "euler_a")
    assert turbo.scheduler_kwargs == {"timestep_spacing": "trailing"}
    light = diffusers_settings(DiffusersSpec(model="m", preset="sdxl-lightning", steps=8, scheduler_kwargs={"x": 1}))
    assert (light.steps, light.guidance_scale, light.scheduler) == (8, 0.0, "euler")
    assert light.scheduler_kwargs == {"timestep_spacing": "trailing", "x": 1}
    plain = diffusers_settings(DiffusersSpec(model="m"))
    assert (plain.steps, plain.scheduler, plain.guidance_scale, plain.height) == (50, "euler", None, None)


def test_lightning_preset_with_a_unet_state_dict_override(tmp_path):
    """The SDXL-Lightning path: a bare UNet .safetensors loaded into the base model's UNet config."""
    from safetensors.torch import save_file

    base = make_generator({"model": "tiny:sdxl", "preset": "sdxl-lightning"}, device="cpu")
    ckpt = tmp_path / "lightning_unet.safetensors"
    save_file({k: v.contiguous() for k, v in base.pipe.unet.state_dict().items()}, str(ckpt))
    light = make_generator({"model": "tiny:sdxl", "preset": "sdxl-lightning", "unet": str(ckpt)}, device="cpu")
    assert light.settings.steps == 4 and light.settings.guidance_scale == 0.0
    assert light.pipe.scheduler.config.timestep_spacing == "trailing"
    assert type(light.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    a, b = base.generate(["a bird"], [5])[0], light.generate(["a bird"], [5])[0]
    assert np.array_equal(pixels(a), pixels(b))  # same weights, same recipe, same seed
    with pytest.raises(CatimageError, match="does not fit"):
        bad = tmp_path / "bad.safetensors"
        save_file({"conv_in.weight": torch.zeros(1)}, str(bad))
        make_generator({"model": "tiny:sdxl", "unet": str(bad)}, device="cpu")


# --------------------------------------------------------------------------------------------- DeepCache


def test_deepcache_runs_with_this_diffusers(tiny_gens):
    spec = {"model": "tiny:sd", "steps": 3, "guidance_scale": 5.0}
    every = make_generator({**spec, "cache_interval": 1}, device="cpu")
    cached = make_generator({**spec, "cache_interval": 2}, device="cpu")
    every.deepcache.disable()  # with the helper off, `every` is the plain pipeline
    plain = every.generate(["a lamp"], [9])[0]
    every.deepcache.enable()
    # Interval 1 recomputes everything each step: exactly the plain pipeline.
    assert np.array_equal(pixels(every.generate(["a lamp"], [9])[0]), pixels(plain))
    calls = []
    # The mid block itself is wrapped (it returns its cache); its inner resnet runs only on full steps.
    cached.pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *a: calls.append(1))
    first = cached.generate(["a lamp"], [9])[0]
    # 3 steps, interval 2: full at steps 0 and 2, the cached (shallow) path at step 1.
    assert len(calls) == 2
    assert 0 < np.abs(pixels(first) - pixels(plain)).mean()
    assert np.array_equal(pixels(cached.generate(["a lamp"], [9])[0]), pixels(first))  # state resets per call
    with pytest.raises(CatimageError, match="cache_branch_id"):
        make_generator({**spec, "cache_interval": 3, "cache_branch_id": 12}, device="cpu")


# --------------------------------------------------------------------------------------------- http


def _png_b64(color: tuple[int, int, int], size: int = 8) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class _ImagesServer:
    """A real HTTP server on 127.0.0.1 (free port) speaking the OpenAI images API.

    `fail_first` requests answer 500 before the server recovers; every request body is recorded.
    """

    def __init__(self, fail_first: int = 0, status: int = 500) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail_left = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                if outer.fail_left > 0:
                    outer.fail_left -= 1
                    self._send(status, {"error": {"message": "temporarily overloaded"}})
                    return
                shade = int(body.get("seed", 0)) % 256
                self._send(200, {"created": 0, "data": [{"b64_json": _png_b64((shade, 10, 200))}]})

            def _send(self, code: int, payload: dict) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/images/generations"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _http_spec(url: str, **kw) -> dict:
    return {"kind": "http", "url": url, "model": "img-model-1", "size": "8x8", "retry_backoff_s": 0.01, **kw}


def test_http_generator_posts_openai_style_and_decodes(monkeypatch):
    monkeypatch.setenv("CATIMAGE_TEST_KEY", "sk-test-123")
    with _ImagesServer() as srv:
        gen = make_generator(_http_spec(srv.url, api_key_env="CATIMAGE_TEST_KEY", seed_field="seed", params={"quality": "low"}))
        images = gen.generate(["a cat", "a dog"], [7, 42])
        gen.close()
    assert [pixels(im)[0, 0].tolist() for im in images] == [[7, 10, 200], [42, 10, 200]]
    assert srv.requests[0] == {
        "model": "img-model-1", "prompt": "a cat", "n": 1, "size": "8x8",
        "response_format": "b64_json", "quality": "low", "seed": 7,
    }
    assert srv.headers[0]["Authorization"] == "Bearer sk-test-123"


def test_http_generator_retries_5xx_then_succeeds():
    with _ImagesServer(fail_first=2) as srv:
        gen = make_generator(_http_spec(srv.url, max_retries=2))
        image = gen.generate(["a boat"], [1])[0]
    assert len(srv.requests) == 3 and image.size == (8, 8)
    assert "seed" not in srv.requests[-1]  # not sent unless the spec says the API takes one


def test_http_generator_warm_up_calls_no_paid_api():
    with _ImagesServer() as srv:
        gen = make_generator(_http_spec(srv.url))
        assert gen.warm_up() == 0
        gen.generate(["a boat"], [1])
    assert len(srv.requests) == 1  # the drawing's call only


def test_http_generator_errors_are_clear(monkeypatch):
    monkeypatch.delenv("CATIMAGE_MISSING_KEY", raising=False)
    with pytest.raises(CatimageError, match="CATIMAGE_MISSING_KEY.*not set"):
        make_generator(_http_spec("http://127.0.0.1:9/x", api_key_env="CATIMAGE_MISSING_KEY"))
    with _ImagesServer(fail_first=5, status=429) as srv:
        gen = make_generator(_http_spec(srv.url, max_retries=1))
        with pytest.raises(CatimageError, match="HTTP 429 after 2 tries"):
            gen.generate(["x"], [0])
    with _ImagesServer(fail_first=5, status=400) as srv:
        gen = make_generator(_http_spec(srv.url, max_retries=3))
        with pytest.raises(CatimageError, match="HTTP 400 after 1 tries.*seed_field"):
            gen.generate(["x"], [0])
    assert len(srv.requests) == 1  # a client error is not retried


def test_make_generator_rejects_bad_blocks():
    with pytest.raises(CatimageError, match="invalid generator block"):
        make_generator({"kind": "ftp"})
    with pytest.raises(CatimageError, match="no generator"):
        make_generator(None)
