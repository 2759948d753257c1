"""The real diffusers generator path on a GPU: what CI (CPU only) cannot check.

    CATIMAGE_CACHE=DIR HF_HUB_OFFLINE=1 python benchmarks/gpu_generators.py [--kinds sdxl sd]

Builds nothing from a hub: the tiny SD / SDXL pipelines (the real diffusers and transformers classes,
fixed-seed random weights; catimage.generators.tiny) load from CATIMAGE_CACHE, built beforehand on
any machine with `python -c "from catimage.generators.tiny import resolve_model; resolve_model('tiny:sdxl')"`.
For each dtype on CUDA it prints (and writes $OUT/gpu_check.json when OUT is set):
- how far the CUDA images are from the CPU float32 images of the same prompts and seeds (0-255 pixels);
- how far an image drawn in a batch of 8 is from the same prompt and seed drawn alone (seeds are
  per image: the initial noise is drawn on the CPU from each image's own generator);
- images per second in batches of 64 (64x64, 8 Euler steps; tiny models, so this measures the
  pipeline's overhead, not a production model's speed).

Measured 2026-12-04 on one NVIDIA H200 (torch 2.11.0+cu130, diffusers 0.39.0, transformers 4.55.4),
tiny SDXL: float32 mean |CUDA - CPU| 0.024 (max 1), batch vs alone max 1, 261 images/s;
float16 mean 0.074 (max 1), batch vs alone max 1, 263 images/s; bfloat16 mean 0.63 (max 5), batch vs
alone max 4, 198 images/s. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from catimage.generators import make_generator

PROMPTS = ["a red circle", "two blue squares", "a cat on a boat", "a castle at night"] * 2
SEEDS = list(range(100, 108))


def _pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def _rate(gen, seconds: float = 5.0) -> float:
    prompts, seeds = PROMPTS * 8, SEEDS * 8  # 64 images per call
    gen.generate(prompts, seeds)
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        gen.generate(prompts, seeds)
        n += len(prompts)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def check(kind: str) -> dict[str, dict[str, float]]:
    spec = {"model": f"tiny:{kind}", "steps": 8, "scheduler": "euler", "height": 64, "width": 64}
    cpu = _pixels(make_generator({**spec, "device": "cpu"}).generate(PROMPTS, SEEDS))
    figures = {}
    for dtype in ("float32", "float16", "bfloat16"):
        gen = make_generator({**spec, "device": "cuda", "dtype": dtype})
        batch = _pixels(gen.generate(PROMPTS, SEEDS))
        alone = _pixels([gen.generate([p], [s])[0] for p, s in zip(PROMPTS[:3], SEEDS[:3], strict=True)])
        figures[dtype] = {"mean_abs_vs_cpu_fp32": float(np.abs(batch - cpu).mean()),
                          "max_abs_vs_cpu_fp32": float(np.abs(batch - cpu).max()),
                          "max_abs_batch_vs_alone": float(np.abs(batch[:3] - alone).max()),
                          "images_per_s_batch64": _rate(gen)}
        print(kind, dtype, json.dumps(figures[dtype]), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["sdxl"], choices=("sd", "sdxl"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (CI and the CPU machine cannot)")
    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    out.update({kind: check(kind) for kind in args.kinds})
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
