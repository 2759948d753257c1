"""The four quality metrics: sharpness on hand-computed cases; the model metrics on tiny random-weight
models written to disk and loaded back through the real loading code (no network), checked against
direct computations with the same models and, for ImageReward, against the package's own methods."""

from __future__ import annotations

import math
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from catimage.errors import CatimageError
from catimage.metrics import MetricError, MetricSpec, make_scorer
from catimage.metrics.sharpness import grayscale, sharpness
from catimage.metrics.tiny import build_tiny_metric_assets, tiny_metric_params

MODEL_METRICS = ["clip_score", "image_reward", "aesthetic"]
PROMPTS = [
    "a photo of a cat",
    "a red car on a street",
    "a dog in the snow",
    "sunset over the sea",
    "portrait of an old man",
    "a green tree",
    "city at night",
]


def _images(n: int = len(PROMPTS), size: int = 48, seed: int = 0) -> list[Image.Image]:
    """Distinct images: smooth gradients plus noise of varying strength and a colour tint."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for k in range(n):
        base = np.stack([xx * (k % 3) / 2, yy, (xx + yy) / 2 * (k % 2)], axis=-1)
        arr = np.clip(base + rng.normal(0, 0.05 * k, base.shape), 0, 1)
        out.append(Image.fromarray((arr * 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return build_tiny_metric_assets(tmp_path_factory.mktemp("tiny-metrics"))


@pytest.fixture(scope="module")
def scorers(assets: dict[str, dict]) -> dict:
    return {name: make_scorer(name, device="cpu", batch_size=3, **assets[name]) for name in MODEL_METRICS}


# ----------------------------------------------------------------------------------------- sharpness


def _gaussian_weights(sigma: float = 1.0, radius: int = 4) -> np.ndarray:
    k = np.arange(-radius, radius + 1)
    w = np.exp(-(k**2) / (2 * sigma**2))
    return w / w.sum()


def test_sharpness_constant_image_is_zero() -> None:
    img = Image.new("L", (17, 11), color=128)
    assert abs(sharpness(grayscale(img))) < 1e-15


def test_sharpness_all_black_is_zero_not_nan() -> None:
    assert make_scorer("sharpness").score(["x"], [Image.new("RGB", (8, 8))])[0] == 0.0


@pytest.mark.parametrize("value", [255, 200])
def test_sharpness_single_pixel_matches_closed_form(value: int) -> None:
    """i = v * delta. Blur = v * (w outer w) with w the 9-tap normalised Gaussian, so
    sum (i - G*i)^2 / sum i^2 = (1 - w0^2)^2 + sum_{(j,k) != 0} (w_j w_k)^2 = 1 - 2 w0^2 + (sum w^2)^2,
    independent of v (pixel at least 4 from every edge, so the boundary mode does not enter)."""
    arr = np.zeros((21, 21), dtype=np.uint8)
    arr[10, 10] = value
    w = _gaussian_weights()
    expected = 1 - 2 * w[4] ** 2 + (w**2).sum() ** 2
    assert math.isclose(expected, 0.76128, abs_tol=1e-5)  # ~ 1 - 1/pi + 1/(4 pi^2) for the untruncated kernel
    got = make_scorer("sharpness").score(["p"], [Image.fromarray(arr)])[0]
    assert got == pytest.approx(expected, rel=1e-12)


def test_sharpness_pixel_at_corner_uses_reflect_boundary() -> None:
    """At corner (0, 0), 'reflect' mirrors about the edge: the blur at row r sees weights w_r + w_{-r-1}
    for the pixel (its mirror image adds w_{r+1}). So the blurred image is u outer u with
    u_r = w_r + w_{r+1} (r = 0..3), u_4 = w_4, and the ratio is 1 - 2 u_0^2 + (sum u^2)^2."""
    arr = np.zeros((12, 12), dtype=np.uint8)
    arr[0, 0] = 255
    w = _gaussian_weights()[4:]  # w_0..w_4
    u = np.array([w[0] + w[1], w[1] + w[2], w[2] + w[3], w[3] + w[4], w[4]])
    expected = 1 - 2 * u[0] ** 2 + (u**2).sum() ** 2
    assert sharpness(grayscale(Image.fromarray(arr))) == pytest.approx(expected, rel=1e-12)


def test_sharpness_checkerboard_is_sharper_than_its_blur() -> None:
    """Away from the edges a 1-px checkerboard is i = (1 + s) / 2 with s = +-1 alternating, and the
    separable blur maps s to c^2 s with c = sum_k (-1)^k w_k; so per pixel the residual energy is
    (1 - c^2)^2 / 4 against an energy of 1/2: ratio (1 - c^2)^2 / 2. The reflected border rows
    (1/8 of a 32x32 board's pixels sit within 1 px of an edge) pull it slightly lower."""
    arr = ((np.indices((32, 32)).sum(axis=0) % 2) * 255).astype(np.uint8)
    sharp = Image.fromarray(arr).convert("RGB")
    blurred = sharp.filter(ImageFilter.GaussianBlur(1.5))
    s = make_scorer("sharpness").score(["a", "a"], [sharp, blurred])
    w = _gaussian_weights()
    c = float(np.sum(w * (-1.0) ** np.arange(-4, 5)))
    interior = (1 - c**2) ** 2 / 2
    assert interior - 0.005 < s[0] < interior
    assert s[0] > 10 * s[1] >= 0


def test_sharpness_uses_luma_and_ignores_prompt_and_batching() -> None:
    assert grayscale(Image.new("RGB", (1, 1), (255, 0, 0)))[0, 0] == pytest.approx(76 / 255)  # 0.299 * 255
    imgs = _images(5)
    one = make_scorer("sharpness", batch_size=1).score(["x"] * 5, imgs)
    many = make_scorer("sharpness", batch_size=4).score(PROMPTS[:5], imgs)
    np.testing.assert_array_equal(one, many)


# ------------------------------------------------------------------------------- shared model checks


@pytest.mark.parametrize("name", MODEL_METRICS)
def test_model_metric_shape_determinism_and_batching(name: str, assets: dict, scorers: dict) -> None:
    imgs = _images()
    scorer = scorers[name]
    assert scorer.name == name
    a = scorer.score(PROMPTS, imgs)
    assert a.shape == (len(PROMPTS),) and a.dtype == np.float64 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, scorer.score(PROMPTS, imgs))  # same process, same model
    fresh = make_scorer(name, device="cpu", batch_size=1, **assets[name])  # reloaded from disk, one by one
    np.testing.assert_allclose(fresh.score(PROMPTS, imgs), a, rtol=0, atol=1e-5)
    assert len(np.unique(np.round(a, 9))) > 1 or name == "clip_score"  # images do move the score
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(MetricError, match="one prompt per image"):
        scorer.score(PROMPTS[:2], imgs[:3])


@pytest.mark.parametrize("name", MODEL_METRICS)
def test_model_metric_loads_without_network(name: str, assets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline by both means: HF_HUB_OFFLINE=1 and any socket connect fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    scorer = make_scorer(MetricSpec(name=name, params=assets[name], batch_size=2), device="cpu")
    assert scorer.batch_size == 2
    assert scorer.score(PROMPTS[:2], _images(2)).shape == (2,)


@pytest.mark.parametrize(
    ("name", "key", "match"),
    [
        ("clip_score", "pretrained", "checkpoint"),
        ("image_reward", "checkpoint", "ImageReward.pt"),
        ("image_reward", "tokenizer", "tokenizer folder"),
        ("image_reward", "med_config", "med_config"),
        ("aesthetic", "head", "head weights"),
    ],
)
def test_missing_local_file_is_a_clear_error(name: str, key: str, match: str, assets: dict, tmp_path: Path) -> None:
    params = {**assets[name], key: str(tmp_path / "nowhere" / "missing.pt")}
    with pytest.raises(MetricError, match=match) as err:
        make_scorer(name, device="cpu", **params)
    assert "missing.pt" in str(err.value) and isinstance(err.value, CatimageError)


def test_unset_checkpoint_and_bad_params_are_clear_errors(assets: dict) -> None:
    with pytest.raises(MetricError, match="checkpoint is not set"):
        make_scorer("image_reward", device="cpu")
    with pytest.raises(MetricError, match="head weights is not set"):
        make_scorer("aesthetic", device="cpu")
    with pytest.raises(MetricError, match="allowed params"):
        make_scorer("clip_score", device="cpu", modle="ViT-B-32")
    with pytest.raises(MetricError, match="unknown metric"):
        make_scorer("fid")
    with pytest.raises(MetricError, match="neither a file nor a pretrained tag"):
        make_scorer("clip_score", device="cpu", model="ViT-B-32", pretrained="laion-typo")


# -------------------------------------------------------------------------------------------- CLIP


def test_clip_score_matches_hand_computation(assets: dict, scorers: dict) -> None:
    import open_clip

    p = assets["clip_score"]
    model, _, preprocess = open_clip.create_model_and_transforms(p["model"], pretrained=p["pretrained"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(p["model"])
    imgs = _images()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in imgs]))
        txt = model.encode_text(tokenizer(PROMPTS))
    cos = F.cosine_similarity(img.double(), txt.double(), dim=-1).numpy()
    expected = np.maximum(100 * cos, 0)
    got = scorers["clip_score"].score(PROMPTS, imgs)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert ((got >= 0) & (got <= 100)).all()
    assert (cos < 0).any() == (got == 0).any()  # negative cosines are clipped, not kept


# -------------------------------------------------------------------------------------- ImageReward


def test_image_reward_matches_package_score_and_inference_rank(scorers: dict) -> None:
    """The batched path (score_gard on a batch) equals the package's per-image `score` and its
    `inference_rank` (one prompt, many images), including the (r - mean) / std normalisation."""
    scorer = scorers["image_reward"]
    model = scorer.model
    imgs, prompts = _images(4), PROMPTS[:4]
    got = scorer.score(prompts, imgs)
    with torch.no_grad():  # the package's methods do not turn autograd off themselves
        per_image = [model.score(p, im) for p, im in zip(prompts, imgs, strict=True)]
        _, rank_rewards = model.inference_rank(PROMPTS[0], imgs)
    np.testing.assert_allclose(got, per_image, atol=1e-5)
    np.testing.assert_allclose(scorer.score([PROMPTS[0]] * len(imgs), imgs), rank_rewards, atol=1e-5)
    raw = model.mlp(_cls_features(model, PROMPTS[:1], imgs[:1])).item()
    assert got[0] == pytest.approx((raw - 0.16717362830052426) / 1.0333394966054072, abs=1e-5)


def _cls_features(model: torch.nn.Module, prompts: list[str], imgs: list[Image.Image]) -> torch.Tensor:
    text = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = model.blip.visual_encoder(torch.stack([model.preprocess(im) for im in imgs]))
        out = model.blip.text_encoder(
            text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=emb,
            encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long),
            return_dict=True,
        )
    return out.last_hidden_state[:, 0, :]


def test_image_reward_architecture_matches_the_package(assets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built with vit='large', 224 px and BLIP's med_config, our model has exactly the parameter names
    and shapes of the package's own ImageReward (so the published ImageReward.pt loads), and the same
    normalisation constants. Both are built with empty (meta) weights: no 470M-parameter allocation.
    The package constructor's hub download of bert-base-uncased is replaced by the local tokenizer."""
    from accelerate import init_empty_weights
    from ImageReward.ImageReward import ImageReward
    from ImageReward.models.BLIP import blip_pretrain

    from catimage.metrics.image_reward import build_image_reward, load_blip_tokenizer, write_med_config

    tok = load_blip_tokenizer(assets["image_reward"]["tokenizer"])
    monkeypatch.setattr(blip_pretrain, "init_tokenizer", lambda: tok)
    med = write_med_config(Path(assets["image_reward"]["med_config"]).parent / "blip_med_config.json")
    with init_empty_weights():
        reference = ImageReward(med_config=str(med))
        ours = build_image_reward(tok, None, "large", 224)
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert ref_shapes["mlp.layers.0.weight"] == (1024, 768)
    assert (ours.mean, ours.std) == (reference.mean, reference.std)


def test_image_reward_rejects_checkpoint_missing_weights(assets: dict, tmp_path: Path) -> None:
    state = torch.load(assets["image_reward"]["checkpoint"], weights_only=True)
    partial = {k: v for k, v in state.items() if not k.startswith("mlp.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(MetricError, match="lacks 10 weights"):
        make_scorer("image_reward", device="cpu", **{**assets["image_reward"], "checkpoint": str(tmp_path / "partial.pt")})


# ---------------------------------------------------------------------------------------- aesthetic


def test_aesthetic_mlp_has_the_published_layer_names() -> None:
    from catimage.metrics.aesthetic import build_head

    shapes = {k: tuple(v.shape) for k, v in build_head("mlp", 768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip
    assert set(build_head("linear", 768).state_dict()) == {"weight", "bias"}


def _tiny_clip_image_embeddings(assets: dict, imgs: list[Image.Image]) -> torch.Tensor:
    import open_clip

    p = assets["aesthetic"]
    model, _, preprocess = open_clip.create_model_and_transforms(p["clip_model"], pretrained=p["clip_pretrained"])
    model.eval()
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.stack([preprocess(im) for im in imgs])), dim=-1)


def test_aesthetic_mlp_matches_hand_computation(assets: dict, scorers: dict) -> None:
    imgs = _images()
    emb = _tiny_clip_image_embeddings(assets, imgs)
    w = torch.load(assets["aesthetic"]["head"], weights_only=True)
    x = emb
    for i in (0, 2, 4, 6, 7):  # no activations between the layers, dropout is off in eval
        x = x @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    np.testing.assert_allclose(scorers["aesthetic"].score(PROMPTS, imgs), x.squeeze(-1).numpy(), atol=1e-5)


def test_aesthetic_linear_head_from_safetensors(assets: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    dim = 32  # the tiny CLIP's embedding width
    weight = torch.linspace(-1, 1, dim).reshape(1, dim)
    bias = torch.tensor([5.0])
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "linear.safetensors"))
    params = {**assets["aesthetic"], "head": str(tmp_path / "linear.safetensors"), "head_type": "linear"}
    imgs = _images(4)
    got = make_scorer("aesthetic", device="cpu", **params).score(PROMPTS[:4], imgs)
    expected = (_tiny_clip_image_embeddings(assets, imgs) @ weight.T + bias).squeeze(-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.all(np.abs(got - 5.0) <= np.abs(weight).sum().item())  # |w . e| <= |w|_1 for a unit e


def test_aesthetic_head_mismatches_are_clear_errors(assets: dict, tmp_path: Path) -> None:
    from catimage.metrics.aesthetic import build_head

    torch.save(build_head("mlp", 768).state_dict(), tmp_path / "vit_l_head.pth")
    with pytest.raises(MetricError, match="768-d embeddings but catimage-tiny-clip gives 32-d"):
        make_scorer("aesthetic", device="cpu", **{**assets["aesthetic"], "head": str(tmp_path / "vit_l_head.pth")})
    with pytest.raises(MetricError, match="head_type='mlp' file"):
        make_scorer("aesthetic", device="cpu", **{**assets["aesthetic"], "head_type": "linear"})


# ------------------------------------------------------------------------------------- tiny: true


def test_tiny_shorthand_builds_shared_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two concurrent first users both build; one rename wins, both get the same complete assets,
    and no temporary folder is left behind. A later scorer with {tiny: true} reuses the cache."""
    monkeypatch.setenv("CATIMAGE_CACHE", str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: tiny_metric_params(), range(2))
    assert first == second
    base = tmp_path / "tiny-metrics"
    assert [p.name for p in base.iterdir()] == ["v1"]
    stamp = (base / "v1" / "assets.json").stat().st_mtime_ns
    scorer = make_scorer(MetricSpec(name="clip_score", params={"tiny": True}), device="cpu")
    also = make_scorer("image_reward", device="cpu", model="tiny")
    assert (base / "v1" / "assets.json").stat().st_mtime_ns == stamp
    assert scorer.params.pretrained.startswith(str(base / "v1"))
    assert also.score(PROMPTS[:2], _images(2)).shape == (2,)


def test_tiny_shorthand_on_sharpness_builds_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATIMAGE_CACHE", str(tmp_path))
    scorer = make_scorer(MetricSpec(name="sharpness", params={"tiny": True}, batch_size=4))
    assert scorer.batch_size == 4 and not (tmp_path / "tiny-metrics").exists()
