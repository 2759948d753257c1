"""What every quality metric shares: the `Scorer` contract, batching, device choice, and the checks
that turn "file not found deep inside torch" into an error that says which param to fix.

Kept free of heavy imports at module level (torch is imported lazily) so `catimage.metrics` can be
imported by code that only needs the names, e.g. the pool loader or the CLI's help text.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from catimage.errors import CatimageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]


class MetricError(CatimageError):
    """A metric cannot be built or run: a missing weight file, a bad param, mismatched inputs."""


class MetricParams(BaseModel):
    """Base of each metric's params model: unknown keys are an error (a typo must not silently fall
    back to a default model)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


P = TypeVar("P", bound=MetricParams)


def parse_params(model: type[P], metric: str, params: dict[str, Any]) -> P:
    """Validate a metric's params, re-raising pydantic's error as a `MetricError` naming the metric."""
    try:
        return model(**params)
    except ValidationError as e:
        allowed = ", ".join(model.model_fields)
        raise MetricError(
            f"bad params for metric {metric!r}: {e.errors(include_url=False)}; allowed params: {allowed}"
        ) from None


def resolve_device(device: str | None) -> torch.device:
    """The caller's device, else cuda when there is one, else cpu."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MetricError(f"device {device!r} was asked for but torch sees no CUDA device; pass device='cpu'")
    return dev


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on CUDA when asked; fp32 elsewhere (CPU half precision is slow and lossy).

    Autocast rather than casting the weights keeps one code path for every model: layer norms and
    softmax stay in fp32, which is what open_clip's own `precision='amp'` does.
    """
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        log.warning("precision=%s is only used on CUDA; running in fp32 on %s", precision, device)
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def require_file(path: str | Path | None, what: str, hint: str) -> Path:
    """`path` as a Path if it is an existing file; otherwise a `MetricError` saying what to pass."""
    if path is None or str(path) == "":
        raise MetricError(f"{what} is not set; {hint}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MetricError(f"{what} {str(p)!r} does not exist or is not a file; {hint}")
    return p


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a torch file without unpickling code
    (`weights_only=True`). A top-level 'state_dict' or 'model' wrapper is unwrapped."""
    import torch

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file or one that needs arbitrary unpickling
        raise MetricError(
            f"cannot read weights from {str(p)!r} with torch.load(weights_only=True): {e}; "
            "pass a plain state dict (.pt/.pth) or a .safetensors file"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise MetricError(f"{str(p)!r} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class Scorer(ABC):
    """One quality metric, loaded once and applied to (prompt, image) pairs in batches.

    Subclasses implement `_score_batch` on at most `batch_size` pairs; `score` does the length checks,
    the RGB conversion and the batching, so every metric behaves the same at the edges (empty input,
    mismatched lengths).
    """

    name: str

    def __init__(self, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise MetricError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> np.ndarray:
        """Score pair i = (prompts[i], images[i]); returns float64 of shape (n,)."""
        prompts, images = list(prompts), list(images)
        if len(prompts) != len(images):
            raise MetricError(
                f"{self.name}: got {len(prompts)} prompts and {len(images)} images; pass one prompt per image"
            )
        out = np.empty(len(images), dtype=np.float64)
        for start, stop in _chunks(len(images), self.batch_size):
            batch_images = [_rgb(im) for im in images[start:stop]]
            values = np.asarray(self._score_batch(prompts[start:stop], batch_images), dtype=np.float64)
            if values.shape != (stop - start,):
                raise AssertionError(f"{self.name} returned shape {values.shape} for {stop - start} pairs")
            out[start:stop] = values
        return out

    @abstractmethod
    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        """Scores for one batch of RGB images (len <= batch_size)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)
