"""Tiny random-weight assets for every model metric, written as the real files would be.

No metric weights can be downloaded on the development machines, yet the build job, the demo and
the tests must run `clip_score`, `image_reward` and `aesthetic` through their real loading code.
`build_tiny_metric_assets(dir)` writes small seeded models in the published file formats (an
open_clip checkpoint, an ImageReward state dict + med_config.json + BERT tokenizer folder, an
aesthetic head .pth) and returns the MetricSpec params that point at them. Scores from these models
mean nothing; they only exercise the pipeline.

`tiny_metric_params()` keeps one shared copy under $CATIMAGE_CACHE/tiny-metrics (default
~/.cache/catimage/tiny-metrics), built on first use in a temporary folder and renamed into place, so
concurrent Ray actors either see a complete copy or build their own and lose the rename race
harmlessly. A pool YAML then says ``params: {tiny: true}``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ASSETS_VERSION = "v1"
MANIFEST = "assets.json"
SEED = 0

# Tiny ImageReward: a 2-block ViT (32 px, patch 16) and a 2-layer BERT of width 32.
TINY_IR_IMAGE_SIZE = 32
TINY_IR_VIT: dict[str, int] = {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_BERT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "encoder_width": 32,
}
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = [
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "painting", "portrait", "landscape",
    "drawing", "of", "cat", "dog", "bird", "horse", "man", "woman", "child", "house", "tree", "sky", "city",
    "street", "car", "boat", "mountain", "river", "sea", "forest", "flower", "red", "blue", "green", "yellow",
    "black", "white", "small", "big", "old", "young", "night", "sunset", "morning", "snow", "rain", "light",
    "dark", "beautiful",
]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789")
_PUNCT = list(".,!?'-:;()")


def tiny_bert_vocab() -> list[str]:
    """A wordpiece vocabulary small enough for tests yet able to spell any lowercase ASCII word."""
    words = list(dict.fromkeys(_WORDS))
    return _SPECIAL + _PUNCT + _CHARS + [f"##{c}" for c in _CHARS] + words


def cache_root() -> Path:
    root = os.environ.get("CATIMAGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "catimage").expanduser()


def _seeded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` under a fixed torch seed without disturbing the caller's RNG stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return fn(*args, **kwargs)


def _write_image_reward(out: Path) -> dict[str, Any]:
    import torch
    from transformers import BertTokenizer

    from catimage.metrics.image_reward import build_image_reward, load_blip_tokenizer, write_med_config

    tok_dir = out / "image_reward" / "tokenizer"
    tok_dir.mkdir(parents=True)
    vocab = tok_dir / "vocab.txt"
    vocab.write_text("\n".join(tiny_bert_vocab()) + "\n")
    BertTokenizer(vocab_file=str(vocab), do_lower_case=True).save_pretrained(str(tok_dir))
    tokenizer = load_blip_tokenizer(str(tok_dir))
    med = write_med_config(out / "image_reward" / "med_config.json", vocab_size=len(tokenizer), **TINY_BERT)
    model = _seeded(build_image_reward, tokenizer, str(med), TINY_IR_VIT, TINY_IR_IMAGE_SIZE)
    ckpt = out / "image_reward" / "ImageReward-tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return {
        "checkpoint": str(ckpt.relative_to(out)),
        "med_config": str(med.relative_to(out)),
        "tokenizer": str(tok_dir.relative_to(out)),
        "vit": dict(TINY_IR_VIT),
        "image_size": TINY_IR_IMAGE_SIZE,
    }


def _write_aesthetic_head(out: Path, input_size: int) -> str:
    import torch

    from catimage.metrics.aesthetic import build_head

    head = _seeded(build_head, "mlp", input_size)
    path = out / "aesthetic" / "aesthetic-mlp-tiny.pth"
    path.parent.mkdir(parents=True)
    torch.save(head.state_dict(), path)
    return str(path.relative_to(out))


def _write_assets(out: Path) -> None:
    from catimage.features.tiny_clip import TINY_CLIP_CONFIG, build_tiny_clip

    clip = build_tiny_clip(out / "clip", seed=SEED)
    clip_ckpt = str(Path(clip.checkpoint).relative_to(out))
    relative = {
        "sharpness": {},
        "clip_score": {"model": clip.model_name, "pretrained": clip_ckpt},
        "image_reward": _write_image_reward(out),
        "aesthetic": {
            "head": _write_aesthetic_head(out, int(TINY_CLIP_CONFIG["embed_dim"])),
            "head_type": "mlp",
            "clip_model": clip.model_name,
            "clip_pretrained": clip_ckpt,
        },
    }
    (out / MANIFEST).write_text(json.dumps({"version": ASSETS_VERSION, "params": relative}, indent=2))


_PATH_KEYS = {"pretrained", "checkpoint", "med_config", "tokenizer", "head", "clip_pretrained"}


def read_tiny_metric_assets(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The params written by `build_tiny_metric_assets(folder)`, with paths made absolute."""
    folder = Path(folder).resolve()
    manifest = json.loads((folder / MANIFEST).read_text())
    return {
        metric: {k: (str(folder / v) if k in _PATH_KEYS else v) for k, v in params.items()}
        for metric, params in manifest["params"].items()
    }


def build_tiny_metric_assets(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Write tiny seeded assets for all four metrics into `out_dir`; return {metric: MetricSpec params}.

    ~1.7M parameters of CLIP (mostly its token table), ~0.3M of ImageReward; a few seconds on a CPU.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_assets(out)
    log.info("wrote tiny metric assets to %s", out)
    return read_tiny_metric_assets(out)


def tiny_metric_params(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The shared tiny assets under `root` (default: `cache_root()`/tiny-metrics), built on first use.

    Safe under concurrency: each builder writes a private temporary folder and renames it into place;
    a builder that loses the race discards its copy (the assets are seeded, so both are identical).
    """
    base = Path(root) if root is not None else cache_root() / "tiny-metrics"
    final = base / ASSETS_VERSION
    if not (final / MANIFEST).is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{ASSETS_VERSION}-building-"))
        try:
            _write_assets(tmp)
            try:
                os.rename(tmp, final)
                log.info("built tiny metric assets in %s", final)
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return read_tiny_metric_assets(final)
