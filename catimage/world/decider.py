"""The scene decider: a learned, cheap stand-in for `scene_score` that a cascade can run online.

A cascade draws with a cheap generator, scores the picture and accepts it or draws again. If the
judge (`scene_score`) also decided, every figure would be an upper bound; so the decider has its
own perception, learned independently of the judge's, and shares only the rules (GenEval's recipe
with a detector in place of the verifier's classical vision):

1. `DetectorNet`, a small CNN (CenterNet-style, 8 x 8 output grid over the 32 x 32 image), reads the
   picture without the prompt: per object its centre, colour, nearest shape, shape fit, area, edge
   width, paint strength and whether it is an object at all; per image the background and the share
   of cleanly painted pixels. It is trained only on rendered training scenes degraded with known
   labels (`catimage.world.decider_data`), never on the judge's readings.
2. Its output becomes a `verify.Reading` (`decode`), and the world's rule checks
   (`verify.check(spec, reading)`, the prompt parsed with `catimage.world.parse`) turn it into a
   verdict: which asked object is present, right colour, shape, size, position, count, relation...
   That rule score is on scene_score's scale by construction and is the default output.
3. `Calibration` (optional), a tiny MLP over the verdict's check families and the detector's
   confidences, corrects the rule score towards scene_score. It is fitted on generated pictures of
   TRAINING scenes (their scene_score as labels); it lowers RMSE a little but ranks a prompt's
   draws slightly worse, so it is not the default. Held-out scenes are only ever used to report
   agreement (catimage/data/world/decider/MODEL_CARD.md).

Cost: the detector's FLOPs per image (`detector_flops`), a few percent of the cheapest generator.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from catimage.world.decider_data import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    GRID,
    REGRESS,
    SHAPE_FIT,
    SIZE,
    AugmentConfig,
    SpecBank,
    Targets,
    make_batch,
)
from catimage.world.scene import BACKGROUNDS, SHAPES, SceneSpec
from catimage.world.verify import Detection, Reading, Verdict, check

log = logging.getLogger(__name__)

WEIGHTS_FILE = "decider.safetensors"
CONFIG_FILE = "decider.json"
PEAK_THRESHOLD = 0.5  # detector heat above which a local maximum is an object
LARGE_FROM = 0.25  # canvas units (the rules' size boundary, for Detection.size only)
_SIDE = (lambda a: 2 * math.sqrt(a / math.pi), math.sqrt, lambda a: math.sqrt(2 * a))  # extent from area


# --- the detector ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorConfig:
    """Widths at the three resolutions (32, 16, 8 px); the head works at 8 x 8. One thin layer at
    full resolution: a second one there cost 10x the training time on 2 CPU cores for little."""

    widths: tuple[int, int, int] = (16, 48, 96)


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


N_OUT = 1 + len(COLOUR_NAMES) + len(SHAPES) + 1 + len(REGRESS)  # heat, colour, shape, is_object, regressions
N_GLOBAL = len(BACKGROUND_NAMES) + 1 + 1  # background classes incl. none, clean share


class DetectorNet(nn.Module):
    """32 x 32 RGB -> per-cell object outputs on an 8 x 8 grid and per-image background outputs."""

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        super().__init__()
        w1, w2, w3 = config.widths
        self.config = config
        self.body = nn.Sequential(
            _block(3, w1),
            _block(w1, w2, 2), _block(w2, w2),
            _block(w2, w3, 2), _block(w3, w3), _block(w3, w3),
        )
        self.head = nn.Sequential(nn.Conv2d(w3, w3, 1), nn.SiLU(), nn.Conv2d(w3, N_OUT, 1))
        self.globals = nn.Sequential(nn.Linear(2 * w3, w3), nn.SiLU(), nn.Linear(w3, N_GLOBAL))
        with torch.no_grad():  # start with few objects (CenterNet's prior on the heat logits)
            self.head[-1].bias[0] = -2.2

    @staticmethod
    def prepare(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 32, 32, 3) uint8 -> (B, 3, 32, 32) float in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images))
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        out = self.head(feats)
        n_c, n_s = len(COLOUR_NAMES), len(SHAPES)
        pooled = torch.cat([feats.mean((2, 3)), feats.amax((2, 3))], dim=1)
        glob = self.globals(pooled)
        return {
            "heat": out[:, 0],
            "colour": out[:, 1 : 1 + n_c],
            "shape": out[:, 1 + n_c : 1 + n_c + n_s],
            "is_object": out[:, 1 + n_c + n_s],
            "regress": out[:, 2 + n_c + n_s :],
            "background": glob[:, : len(BACKGROUND_NAMES) + 1],
            "clean_share": glob[:, -1],
        }


def focal_heat_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the centre heat map, per object."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target >= 1.0
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -((1 - target) ** 4 * p**2 * torch.log(1 - p))[~pos].sum()
    return (pos_loss + neg_loss) / max(1, int(pos.sum()))


def detector_loss(out: dict[str, torch.Tensor], t: Targets) -> tuple[torch.Tensor, dict[str, float]]:
    """Heat focal loss + per-object classification / regression at the owning cell + per-image terms."""
    mask = torch.from_numpy(t.mask)
    parts = {"heat": focal_heat_loss(out["heat"], torch.from_numpy(t.heat))}
    if mask.any():
        colour = out["colour"].permute(0, 2, 3, 1)[mask]
        shape = out["shape"].permute(0, 2, 3, 1)[mask]
        regress = out["regress"].permute(0, 2, 3, 1)[mask]
        parts["colour"] = F.cross_entropy(colour, torch.from_numpy(t.colour)[mask])
        parts["shape"] = F.cross_entropy(shape, torch.from_numpy(t.shape)[mask])
        parts["is_object"] = F.binary_cross_entropy_with_logits(out["is_object"][mask], torch.from_numpy(t.is_object)[mask])
        target = torch.from_numpy(t.regress).permute(0, 2, 3, 1)[mask]
        parts["regress"] = F.smooth_l1_loss(regress, target, beta=0.1) * len(REGRESS)
    parts["background"] = F.cross_entropy(out["background"], torch.from_numpy(t.background))
    parts["clean_share"] = F.smooth_l1_loss(out["clean_share"], torch.from_numpy(t.clean_share), beta=0.1)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


# --- reading a picture ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Confidence:
    """How sure the detector is about one detection (for the calibration head)."""

    heat: float
    colour: float
    shape: float
    is_object: float


def decode(out: dict[str, torch.Tensor], threshold: float = PEAK_THRESHOLD) -> list[tuple[Reading, list[Confidence]]]:
    """Detector outputs -> a `Reading` per image (the structure the rule checks read) and the
    detector's confidence in each detection."""
    heat = torch.sigmoid(out["heat"])
    peaks = (heat >= threshold) & (heat == F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0])
    colour_p = torch.softmax(out["colour"], 1)
    shape_p = torch.softmax(out["shape"], 1)
    obj_p = torch.sigmoid(out["is_object"])
    reg = out["regress"]
    bg_p = torch.softmax(out["background"], 1)
    results = []
    for i in range(heat.shape[0]):
        dets, confs = [], []
        for r, c in peaks[i].nonzero().tolist():
            dx, dy, log_area, edge, strength, fit = reg[i, :, r, c].tolist()
            area = float(math.exp(min(max(log_area, 0.0), 7.0)))
            k_col, k_shape = int(colour_p[i, :, r, c].argmax()), int(shape_p[i, :, r, c].argmax())
            extent = _SIDE[k_shape](area) / SIZE
            cx, cy = (c + dx) / GRID, (r + dy) / GRID
            if k_shape == 2:  # triangle: the box centre sits extent/6 above the mass centre
                cy -= extent / 6
            p_obj = float(obj_p[i, r, c])
            dets.append(Detection(
                colour=COLOUR_NAMES[k_col], shape=SHAPES[k_shape] if fit >= SHAPE_FIT else "blob",
                size="large" if extent >= LARGE_FROM else "small", cx=cx, cy=cy, extent=extent, area=area,
                fit=float(fit), edge_width=float(max(edge, 0.0)), purity=p_obj, strength=float(strength),
                is_object=p_obj >= 0.5,
            ))
            confs.append(Confidence(float(heat[i, r, c]), float(colour_p[i, k_col, r, c]),
                                    float(shape_p[i, k_shape, r, c]), p_obj))
        k_bg = int(bg_p[i].argmax())
        name = BACKGROUND_NAMES[k_bg] if k_bg < len(BACKGROUND_NAMES) else None
        rgb = tuple(float(v) for v in BACKGROUNDS[name]) if name else (float("nan"),) * 3
        clean = float(min(max(float(out["clean_share"][i]), 0.0), 1.0))
        results.append((Reading(rgb, name, tuple(dets), clean), confs))
    return results


# --- calibration ----------------------------------------------------------------------------------

FAMILIES = ("present", "colour", "shape", "size", "position", "count", "relation", "background", "no_extra",
            "clean_colour", "crisp_edges")
N_FEATURES = 1 + 2 * len(FAMILIES) + 6


def features(spec: SceneSpec, verdict: Verdict, confs: list[Confidence]) -> np.ndarray:
    """What the calibration head sees: the rule score, each check family's weighted value and
    whether the prompt has it, the number of asked objects, and the detector's confidences in the
    matched detections (the weakest of each kind) and in the unmatched ones."""
    out = [verdict.score]
    for fam in FAMILIES:
        sel = [c for c in verdict.checks if c.name.split("(")[0] == fam]
        w = sum(c.weight for c in sel)
        out += [sum(c.weight * c.value for c in sel) / w if w else 1.0, float(w > 0)]
    matched = [confs[j] for j in verdict.matching if j is not None]
    unmatched = [confs[j] for j in range(len(confs)) if j not in set(verdict.matching)]
    out += [spec.n_objects / 4.0]
    for attr in ("heat", "colour", "shape", "is_object"):
        out.append(min((getattr(c, attr) for c in matched), default=0.0))
    out.append(max((c.heat for c in unmatched), default=0.0))
    return np.asarray(out, dtype=np.float32)


class Calibration(nn.Module):
    """Tiny MLP: features -> scene_score scale, as the rule score plus a bounded correction."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x[:, 0].clamp(1e-3, 1 - 1e-3)
        return torch.sigmoid(torch.logit(raw) + self.net(x)[:, 0])


@dataclass(frozen=True)
class CalibrationSettings:
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-3
    hidden: int = 32
    seed: int = 0


def fit_calibration(x: np.ndarray, y: np.ndarray, settings: CalibrationSettings = CalibrationSettings()) -> Calibration:
    """Full-batch AdamW on squared error (a few thousand rows: seconds)."""
    torch.manual_seed(settings.seed)
    model = Calibration(settings.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.float32))
    for _ in range(settings.epochs):
        loss = F.mse_loss(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log.info("calibration fitted on %d rows: train RMSE %.4f", len(y), float(loss.detach()) ** 0.5)
    return model.eval()


# --- the scorer -----------------------------------------------------------------------------------


class SceneDecider:
    """Detector + rule checks (+ calibration): (spec, image) -> score on the scene_score scale."""

    def __init__(self, detector: DetectorNet, calibration: Calibration | None = None,
                 threshold: float = PEAK_THRESHOLD) -> None:
        self.detector = detector.eval()
        self.calibration = calibration.eval() if calibration is not None else None
        self.threshold = threshold

    @torch.inference_mode()
    def readings(self, images: list[Any]) -> list[tuple[Reading, list[Confidence]]]:
        """Readings of RGB images (PIL or uint8 arrays; other sizes are box-resized to 32 x 32)."""
        if not images:
            return []
        arrays = np.stack([_as_array(im) for im in images])
        return decode(self.detector(DetectorNet.prepare(arrays)), self.threshold)

    def verdicts(self, specs: list[SceneSpec], images: list[Any]) -> list[tuple[Verdict, np.ndarray]]:
        """The rule verdict on the detector's reading and the calibration features, per image."""
        out = []
        for spec, (reading, confs) in zip(specs, self.readings(images)):
            verdict = check(spec, reading)
            out.append((verdict, features(spec, verdict, confs)))
        return out

    @torch.inference_mode()
    def score(self, specs: list[SceneSpec], images: list[Any], calibrated: bool = False) -> np.ndarray:
        """Scores in [0, 1]: the rule score on the detector's reading, or with `calibrated` the
        calibration head's (when the decider has one). The raw rule score is the default: on the
        development set it ranks draws of a prompt better and agrees more often at every pass/fail
        threshold; the head lowers RMSE a little (see the model card)."""
        rows = self.verdicts(specs, images)
        raw = np.array([v.score for v, _ in rows], dtype=np.float64)
        if not calibrated or self.calibration is None or not rows:
            return raw
        x = torch.from_numpy(np.stack([f for _, f in rows]))
        return self.calibration(x).double().numpy()

    # --- files ---------------------------------------------------------------------------------

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """float16 safetensors of both networks + a JSON of their configs (no pickle)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"detector.{k}": v.half().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in self.detector.state_dict().items()}
        config: dict[str, Any] = {"detector": asdict(self.detector.config), "threshold": self.threshold,
                                  "calibration": None, **(extra or {})}
        if self.calibration is not None:
            tensors.update({f"calibration.{k}": v.half().contiguous() for k, v in self.calibration.state_dict().items()})
            config["calibration"] = {"hidden": self.calibration.net[0].out_features}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SceneDecider:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"no scene decider in {directory} (need {WEIGHTS_FILE} and {CONFIG_FILE}); train one with "
                "`python jobs/train_decider.py` or use the shipped one (catimage/data/world/decider)"
            )
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
        det_cfg = DetectorConfig(widths=tuple(config["detector"]["widths"]))
        detector = DetectorNet(det_cfg)
        detector.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("detector.")})
        calibration = None
        if config.get("calibration"):
            calibration = Calibration(int(config["calibration"]["hidden"]))
            calibration.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("calibration.")})
        return cls(detector, calibration, float(config.get("threshold", PEAK_THRESHOLD)))


def shipped_dir() -> Path:
    """The package's decider folder (catimage/data/world/decider)."""
    from importlib import resources

    return Path(str(resources.files("catimage") / "data" / "world" / "decider"))


def _as_array(image: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def detector_flops(config: DetectorConfig = DetectorConfig()) -> float:
    """FLOPs of one image through the detector (torch's flop counter; the rule checks and the
    calibration MLP are a few thousand operations more and are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = DetectorNet(config).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, 3, SIZE, SIZE))
    return float(counter.get_total_flops())


# --- training the detector ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeciderSettings:
    """Everything that determines a detector training run (saved in the training log)."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    seed: int = 0
    bank_size: int = 4000
    bank_seed: int = 4321
    widths: tuple[int, int, int] = (16, 48, 96)
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentConfig overrides

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        AugmentConfig(**self.augment)  # unknown keys fail here, not mid-run


def step_rng(seed: int, step: int) -> np.random.Generator:
    """Step k's data generator: a pure function of (seed, step), so resumed runs repeat exactly."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, 7]))


class DetectorTrainer:
    """Detector + AdamW + warm-up/cosine LR; `step()` trains on step k's synthetic batch."""

    def __init__(self, settings: DeciderSettings, bank: SpecBank | None = None) -> None:
        self.settings = settings
        self.bank = bank or SpecBank(settings.bank_size, settings.bank_seed)
        self.augment = AugmentConfig(**settings.augment)
        torch.manual_seed(settings.seed)
        self.net = DetectorNet(DetectorConfig(tuple(settings.widths)))
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step_index = 0
        self.history: list[dict[str, float]] = []

    def _lr_factor(self, k: int) -> float:
        s = self.settings
        if k < s.warmup_steps:
            return (k + 1) / s.warmup_steps
        progress = min(1.0, (k - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
        floor = s.min_lr / s.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def step(self) -> dict[str, float]:
        """One optimisation step; returns the loss and its parts."""
        images, targets = make_batch(self.bank, step_rng(self.settings.seed, self.step_index),
                                     self.settings.batch_size, self.augment)
        self.net.train()
        loss, parts = detector_loss(self.net(DetectorNet.prepare(images)), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.step_index += 1
        return {"loss": float(loss.detach()), **parts}

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Weights (incl. BatchNorm statistics), optimiser state and schedule as safetensors + JSON."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        opt = self.optimizer.state_dict()
        scalars: dict[str, float] = {}
        for idx, slot in opt["state"].items():
            for key, value in slot.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    tensors[f"opt.{idx}.{key}"] = value.contiguous()
                else:
                    scalars[f"{idx}.{key}"] = float(value)
        save_file(tensors, str(directory / "trainer.safetensors"))
        state = {"settings": _settings_json(self.settings), "step": self.step_index, "history": self.history,
                 "param_groups": opt["param_groups"], "scalars": scalars, "lr_schedule": self.lr_schedule.state_dict()}
        (directory / "trainer.json").write_text(json.dumps(state))
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        state = json.loads((directory / "trainer.json").read_text())
        if state["settings"] != _settings_json(self.settings):
            raise ValueError(f"{directory} was written with other settings: {state['settings']}")
        tensors = load_file(str(directory / "trainer.safetensors"))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                slots.setdefault(int(idx), {})[name] = value
        for key, value in state["scalars"].items():
            idx, name = key.split(".", 1)
            slots.setdefault(int(idx), {})[name] = torch.tensor(value)
        self.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step_index = int(state["step"])
        self.history = list(state["history"])


def _settings_json(settings: DeciderSettings) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(settings)))
