"""Training the world generators: prompt bank, batches of rendered scenes, one optimisation step.

Pure torch (no Ray): `jobs/train_world.py` wraps `WorldTrainer` in a Ray Train job with
checkpoints and resume; tests drive it directly for a few steps.

Data. A `PromptBank` holds training-only specs (never `is_heldout`), one paraphrased prompt each,
and their MiniLM token features (float16), computed once: MiniLM at ~70 prompts/s would otherwise
cost more than the UNet step. Every step draws a batch of bank entries and renders a fresh random
placement of each spec, so pictures never repeat even though texts do.

Objective. v-prediction on the cosine schedule with Min-SNR-gamma loss weights (Hang et al. 2023,
which speeds up convergence by not over-weighting the easy low-noise steps), text dropped to the
empty prompt 10 % of the time for classifier-free guidance, AdamW with warm-up then cosine decay,
gradient clipping, and an EMA of the weights (diffusers' `EMAModel`) that becomes the shipped model.

Determinism. Step k's batch, timesteps and noise come from generators seeded by (seed, k), so a
run resumed from a checkpoint at step k continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from catimage.world.grammar import describe, realize, sample_specs
from catimage.world.models import IMAGE_SIZE, MODELS, SCHEDULE, WorldModelSpec
from catimage.world.pipeline import pack, pad_tokens, text_tokens, with_coords
from catimage.world.render import render_array
from catimage.world.scene import SceneSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run (saved in the model card)."""

    model: str = "small"
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    text_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    seed: int = 0
    bank_size: int = 12000
    bank_seed: int = 1234

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown world model {self.model!r}; choose one of {list(MODELS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")


# --- the prompt bank ------------------------------------------------------------------------------


@dataclass
class PromptBank:
    """Training prompts with their specs and MiniLM token features (float16, zero-padded)."""

    specs: list[SceneSpec]
    prompts: list[str]
    tokens: np.ndarray  # (n, T, 384) float16
    empty: np.ndarray  # (T0, 384) float16: the empty prompt's tokens (classifier-free guidance)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": self.tokens, "empty": self.empty}, str(path / "tokens.safetensors"))
        (path / "prompts.json").write_text(json.dumps({"prompts": self.prompts, "keys": [s.key() for s in self.specs]}))
        return path

    @classmethod
    def load(cls, path: str | Path, bank_seed: int, size: int) -> PromptBank:
        """Reload a saved bank; the specs are re-drawn from the seed and checked against the saved keys."""
        from safetensors.numpy import load_file

        path = Path(path)
        doc = json.loads((path / "prompts.json").read_text())
        specs = sample_specs(np.random.default_rng(bank_seed), size, heldout=False)
        if [s.key() for s in specs] != doc["keys"]:
            raise ValueError(f"{path} was built with another grammar or seed; delete it to rebuild the bank")
        arrays = load_file(str(path / "tokens.safetensors"))
        return cls(specs, doc["prompts"], arrays["tokens"], arrays["empty"])


def build_prompt_bank(size: int, seed: int, embedder: Any, batch: int = 512) -> PromptBank:
    """`size` distinct training specs, one random paraphrase each, and their MiniLM tokens."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    specs = sample_specs(rng, size, heldout=False)
    prompts = [describe(s, rng) for s in specs]
    chunks = []
    for start in tqdm(range(0, size, batch), desc="MiniLM tokens of the prompt bank", unit="batch"):
        chunks.append(text_tokens(embedder, prompts[start : start + batch])[0])
    length = max(c.shape[1] for c in chunks)
    tokens = torch.cat([pad_tokens(c, c.abs().sum(-1) > 0, length)[0] for c in chunks]).numpy().astype(np.float16)
    empty = text_tokens(embedder, [""])[0][0].numpy().astype(np.float16)
    return PromptBank(specs, prompts, tokens, empty)


# --- batches --------------------------------------------------------------------------------------


def step_generators(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one step: a pure function of (seed, step)."""
    sequence = np.random.SeedSequence([seed, step])
    rng = np.random.default_rng(sequence)
    gen = torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0] % (2**63)))
    return rng, gen


def render_batch(specs: list[SceneSpec], rng: np.random.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, size, size) float32 in [-1, 1]: a fresh random picture of each spec."""
    arrays = np.stack([render_array(realize(s, rng), size) for s in specs])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class Batch:
    sample: torch.Tensor  # packed clean images (B, 12, 16, 16)
    tokens: torch.Tensor  # (B, T, 384) float32
    mask: torch.Tensor  # (B, T) bool


def make_batch(bank: PromptBank, settings: TrainSettings, rng: np.random.Generator) -> Batch:
    idx = rng.integers(0, len(bank.specs), size=settings.batch_size)
    images = render_batch([bank.specs[i] for i in idx], rng)
    tokens = torch.from_numpy(bank.tokens[idx].astype(np.float32))
    drop = torch.from_numpy(rng.random(settings.batch_size) < settings.text_dropout)
    if drop.any():
        empty = torch.zeros_like(tokens[0])
        empty[: bank.empty.shape[0]] = torch.from_numpy(bank.empty.astype(np.float32))
        tokens[drop] = empty
    return Batch(pack(images), tokens, tokens.abs().sum(-1) > 0)


# --- the trainer ----------------------------------------------------------------------------------


class WorldTrainer:
    """UNet + optimiser + LR schedule + EMA + noise schedule; `step()` runs one optimisation step."""

    def __init__(self, settings: TrainSettings, bank: PromptBank, spec: WorldModelSpec | None = None) -> None:
        """`spec` overrides the architecture named by `settings.model` (tests train tiny ones)."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        self.settings = settings
        self.bank = bank
        torch.manual_seed(settings.seed)
        self.unet = UNet2DConditionModel(**(spec or MODELS[settings.model]).unet_config())
        self.noise = DDPMScheduler(**SCHEDULE)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        floor = settings.min_lr / settings.lr
        cosine = get_cosine_schedule_with_warmup(self.optimizer, settings.warmup_steps, settings.steps)
        # Keep the decayed LR above min_lr: scale the cosine factor into [floor, 1].
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: floor + (1 - floor) * cosine.lr_lambdas[0](k) if k >= settings.warmup_steps
            else cosine.lr_lambdas[0](k)
        )
        self.ema = EMAModel(self.unet.parameters(), decay=settings.ema_decay, use_ema_warmup=True, power=2 / 3)
        self.step_index = 0
        self.history: list[dict[str, float]] = []
        snr = self.noise.alphas_cumprod / (1 - self.noise.alphas_cumprod)
        self.loss_weight = torch.clamp(snr, max=settings.min_snr_gamma) / (snr + 1)  # Min-SNR for v-prediction

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        x0 = batch.sample
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        noisy = self.noise.add_noise(x0, noise, t)
        target = self.noise.get_velocity(x0, noise, t)
        pred = self.unet(with_coords(noisy), t, encoder_hidden_states=batch.tokens, encoder_attention_mask=batch.mask).sample
        per_image = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return (self.loss_weight[t] * per_image).mean()

    def step(self) -> float:
        """One optimisation step on step k's deterministic batch; returns the weighted loss."""
        rng, gen = step_generators(self.settings.seed, self.step_index)
        batch = make_batch(self.bank, self.settings, rng)
        self.unet.train()
        loss = self.loss(batch, gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.step(self.unet.parameters())
        self.step_index += 1
        return float(loss.detach())

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Weights, EMA, optimiser and schedule state as safetensors + JSON (no pickle)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = [n for n, _ in self.unet.named_parameters()]
        ema_state = self.ema.state_dict()
        tensors = {f"unet.{k}": v.contiguous() for k, v in self.unet.state_dict().items()}
        tensors.update({f"ema.{n}": p.detach().contiguous() for n, p in zip(names, ema_state.pop("shadow_params"))})
        opt = self.optimizer.state_dict()
        opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "scalars": {}}
        for idx, slot in opt["state"].items():
            for key, value in slot.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    tensors[f"opt.{idx}.{key}"] = value.contiguous()
                else:
                    opt_meta["scalars"][f"{idx}.{key}"] = float(value)
        save_file(tensors, str(directory / "trainer.safetensors"))
        state = {
            "settings": asdict(self.settings),
            "step": self.step_index,
            "history": self.history,
            "ema": {k: v for k, v in ema_state.items() if not torch.is_tensor(v)},
            "optimizer": opt_meta,
            "lr_schedule": self.lr_schedule.state_dict(),
            **(extra or {}),
        }
        (directory / "trainer.json").write_text(json.dumps(state, default=_jsonable))
        return directory

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        directory = Path(directory)
        state = json.loads((directory / "trainer.json").read_text())
        if state["settings"] != asdict(self.settings):
            raise ValueError(f"{directory} was written with other settings: {state['settings']}")
        tensors = load_file(str(directory / "trainer.safetensors"))
        self.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        names = [n for n, _ in self.unet.named_parameters()]
        self.ema.load_state_dict({**state["ema"], "shadow_params": [tensors[f"ema.{n}"] for n in names]})
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                slots.setdefault(int(idx), {})[name] = value
        for key, value in state["optimizer"]["scalars"].items():
            idx, name = key.split(".", 1)
            slots.setdefault(int(idx), {})[name] = torch.tensor(value)
        self.optimizer.load_state_dict({"state": slots, "param_groups": state["optimizer"]["param_groups"]})
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step_index = int(state["step"])
        self.history = list(state["history"])
        return state

    # --- export --------------------------------------------------------------------------------

    def export(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Save a `WorldPipeline` with the EMA weights (float16 on disk: half the size, same images
        within rounding) and a DDIM scheduler with trailing timesteps."""
        import copy

        from diffusers import DDIMScheduler

        from catimage.world.pipeline import WorldPipeline

        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        pipe = WorldPipeline(unet=unet.to(dtype), scheduler=DDIMScheduler(**SCHEDULE))
        pipe.save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in trainer.json")
