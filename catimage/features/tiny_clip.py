"""A tiny randomly initialised open_clip model (both towers) for tests and dry runs.

No CLIP weights can be downloaded on the development machines, yet the `clip` embedder and the
CLIP-based metrics must exercise the real open_clip code paths (tokenizer, `create_model`,
checkpoint loading). This module provides an architecture config small enough to build in well
under a second and a helper that saves its random weights as a local checkpoint.

The config is registered with open_clip under the name ``catimage-tiny-clip``. open_clip keeps its
registry per process, so every process that names the model (a test, a Ray actor, a Serve replica)
must register it first. Call `ensure_open_clip_model(name)` before `open_clip.create_model*` or
`open_clip.get_tokenizer`; it registers ``catimage-tiny-clip`` (and any ``*.json`` config path you
pass) and returns the name open_clip knows. The catimage embedder and metrics do this for you, so a
spec such as ``{"model": "catimage-tiny-clip", "pretrained": "/path/tiny_clip.safetensors"}`` works
in a fresh process.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catimage.errors import CatimageError

log = logging.getLogger(__name__)

TINY_CLIP_NAME = "catimage-tiny-clip"

# 2-layer towers of width 32; the text side keeps the real CLIP tokenizer contract (77 tokens,
# 49,408-token BPE vocabulary) so open_clip.get_tokenizer works unchanged. ~1.7M parameters, most of
# them the token embedding table.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TinyClip:
    """What `build_tiny_clip` wrote: pass both to `open_clip.create_model_and_transforms`."""

    model_name: str
    checkpoint: str


def _config_dir() -> Path:
    root = os.environ.get("CATIMAGE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "catimage"
    return base / "open_clip_configs"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def ensure_tiny_clip_registered() -> str:
    """Register ``catimage-tiny-clip`` with this process's open_clip; return the name. Idempotent."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        path = _config_dir() / f"{TINY_CLIP_NAME}.json"
        text = json.dumps(TINY_CLIP_CONFIG, indent=2)
        if not path.exists() or path.read_text() != text:
            _write_atomic(path, text)
        open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def ensure_open_clip_model(model: str) -> str:
    """Make `model` known to open_clip in this process and return the name to pass to it.

    Accepts a built-in architecture name (``ViT-B-32``), ``catimage-tiny-clip``, or the path of an
    open_clip architecture JSON (``/cfg/my-clip.json``: registered under its file stem).
    """
    import open_clip

    if model == TINY_CLIP_NAME:
        return ensure_tiny_clip_registered()
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise CatimageError(f"open_clip model config {model} does not exist; pass an existing JSON file")
        open_clip.add_model_config(path)
        name = path.stem
        if name not in open_clip.list_models():
            raise CatimageError(
                f"{model} is not an open_clip model config: it needs 'embed_dim', 'vision_cfg' and 'text_cfg'"
            )
        return name
    if model.startswith("hf-hub:") or model.replace("/", "-") in open_clip.list_models():
        return model
    raise CatimageError(
        f"unknown open_clip model {model!r}; use one of open_clip.list_models() (e.g. ViT-B-32), "
        f"{TINY_CLIP_NAME!r}, or the path of an architecture JSON"
    )


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> TinyClip:
    """Build the tiny CLIP with seeded random weights and save them to ``out_dir`` (safetensors).

    The global torch RNG is left as it was, so calling this inside a test does not change what
    later random draws produce.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    name = ensure_tiny_clip_registered()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    ckpt = out / f"{name}.safetensors"
    save_file(state, str(ckpt))
    log.info("wrote a tiny random open_clip checkpoint to %s", ckpt)
    return TinyClip(model_name=name, checkpoint=str(ckpt))
