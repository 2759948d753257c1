"""Is `scene_score` right on ground truth, low on noise, graded on degradations, and fast?

    PYTHONPATH=$PWD python benchmarks/scene_score_check.py [--n 2000] [--seed 0]

Prints the mean score on rendered scenes of random specs per complexity level (`SceneSpec.complexity`,
n per level), on noise and blank images, on pictures of another spec, and on degradations of the
rendered scenes, with the check families that fell (mean value; all are 1.00 on ground truth), so
the check a degradation hits is visible; then images/s on one thread (median of 3 timed passes, in
CPU time, which a busy shared machine distorts less than wall-clock time, and wall clock).
Targets (issue 8): >= 0.98 on ground truth, <= 0.1 on noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from catimage.world import SceneSpec, realize, render, sample_spec
from catimage.world.grammar import CELLS
from catimage.world.render import SUPERSAMPLE
from catimage.world.scene import BACKGROUNDS, COLOURS, SHAPES, PlacedObject, Scene
from catimage.world.verify import WEIGHTS, Verdict, verify

FAMILIES = tuple(WEIGHTS)


def specs_by_complexity(rng: np.random.Generator, n: int) -> dict[int, list[SceneSpec]]:
    """n random specs for each complexity level that sampling reaches often enough."""
    levels: dict[int, list[SceneSpec]] = defaultdict(list)
    draws = 0
    while draws < 400 * n:
        draws += 1
        spec = sample_spec(rng)
        if len(levels[spec.complexity]) < n:
            levels[spec.complexity].append(spec)
        if all(len(v) >= n for k, v in levels.items() if k <= 7) and len(levels) >= 7:
            break
    return dict(sorted(levels.items()))


def family_means(verdicts: list[Verdict]) -> dict[str, float]:
    out = {}
    for fam in FAMILIES:
        vals = [c.value for v in verdicts for c in v.checks if c.name.split("(")[0] == fam]
        if vals:
            out[fam] = float(np.mean(vals))
    return out


# --- degradations ---------------------------------------------------------------------------------


def blur(sigma: float) -> Callable[[Scene, np.random.Generator], Image.Image | None]:
    return lambda scene, rng: render(scene).filter(ImageFilter.GaussianBlur(sigma))


def drop_object(scene: Scene, rng: np.random.Generator) -> Image.Image | None:
    if len(scene.objects) < 2:
        return None
    k = int(rng.integers(len(scene.objects)))
    keep = [i for i in range(len(scene.objects)) if i != k]
    return render(Scene(tuple(scene.objects[i] for i in keep), scene.background, tuple(scene.cells[i] for i in keep)))


def add_object(scene: Scene, rng: np.random.Generator) -> Image.Image | None:
    free = [c for c in CELLS if all(abs(c[0] - o[0]) + abs(c[1] - o[1]) > 1 for o in scene.cells)]
    if not free:
        return None
    row, col = free[int(rng.integers(len(free)))]
    extra = PlacedObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), (col + 0.5) / 3, (row + 0.5) / 3,
                         float(rng.choice([0.2, 0.3])))
    return render(Scene(scene.objects + (extra,), scene.background, scene.cells + ((row, col),)))


def swap_colours(scene: Scene, rng: np.random.Generator) -> Image.Image | None:
    pairs = [(i, j) for i in range(len(scene.objects)) for j in range(i + 1, len(scene.objects))
             if scene.objects[i].colour != scene.objects[j].colour and scene.objects[i].shape != scene.objects[j].shape]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    objs = list(scene.objects)
    a, b = objs[i], objs[j]
    objs[i] = PlacedObject(a.shape, b.colour, a.cx, a.cy, a.extent)
    objs[j] = PlacedObject(b.shape, a.colour, b.cx, b.cy, b.extent)
    return render(Scene(tuple(objs), scene.background, scene.cells))


_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def morph_blobs(scene: Scene, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Each object redrawn as a lumpy blob of the same colour, centre and area."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    for obj in scene.objects:
        side = obj.extent * big
        radius = np.sqrt(_FILL[obj.shape] * side * side / np.pi)
        wobble = 1 + 0.3 * np.sin(2 * theta + rng.uniform(0, 6.3)) + 0.2 * np.sin(3 * theta + rng.uniform(0, 6.3))
        r = radius * wobble / np.sqrt(np.mean(wobble**2))
        pts = list(zip(obj.cx * big + r * np.cos(theta), obj.cy * big + r * np.sin(theta)))
        draw.polygon(pts, fill=COLOURS[obj.colour])
    return image.resize((size, size), Image.Resampling.BOX)


def other_spec(scene: Scene, rng: np.random.Generator) -> Image.Image:
    return render(realize(sample_spec(rng), rng))


def uniform_noise(scene: Scene, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def gaussian_noise(scene: Scene, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(np.clip(rng.normal(128, 64, (32, 32, 3)), 0, 255).astype(np.uint8))


def smooth_noise(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Low-frequency colour noise: blotches the size of objects (the hardest noise for a segmenter)."""
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((32, 32), Image.Resampling.BICUBIC)


def blank(name: str) -> Callable[[Scene, np.random.Generator], Image.Image]:
    return lambda scene, rng: Image.new("RGB", (32, 32), BACKGROUNDS[name])


# --- driver ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="scenes per complexity level")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    levels = specs_by_complexity(rng, args.n)

    print(f"ground truth: mean scene_score per complexity level ({args.n} scenes each where reached)")
    scenes: list[tuple[SceneSpec, Scene]] = []
    all_gt: list[Verdict] = []
    for level, specs in levels.items():
        verdicts = []
        for spec in specs:
            scene = realize(spec, rng)
            scenes.append((spec, scene))
            verdicts.append(verify(spec, render(scene)))
        all_gt += verdicts
        s = np.array([v.score for v in verdicts])
        print(f"  complexity {level:2d}: n={len(s):5d}  mean={s.mean():.4f}  min={s.min():.3f}  "
              f"share<1: {np.mean(s < 0.999):.4f}")
    gt_scores = np.array([v.score for v in all_gt])
    print(f"  all: n={len(gt_scores)} mean={gt_scores.mean():.4f} min={gt_scores.min():.3f}")
    for bg in BACKGROUNDS:
        sel = [v.score for (spec, scene), v in zip(scenes, all_gt) if scene.background == bg]
        print(f"  background {bg:5s}: n={len(sel):5d} mean={np.mean(sel):.4f} min={np.min(sel):.3f}")
    print(f"hardest scenes: 4 objects with >= 1 relation, {args.n} per background")
    for bg in BACKGROUNDS:
        hard = []
        while len(hard) < args.n:
            spec = sample_spec(rng, n_groups=int(rng.choice([2, 3])))
            if spec.n_objects == 4 and spec.relations:
                spec = dataclasses.replace(spec, background=bg)
                hard.append(verify(spec, render(realize(spec, rng))).score)
        h = np.array(hard)
        print(f"  {bg:5s}: n={len(h)} mean={h.mean():.4f} min={h.min():.3f} share<1: {np.mean(h < 0.999):.4f}")

    pick = rng.permutation(len(scenes))[: min(2000, len(scenes))]
    sample, sample_gt = [scenes[i] for i in pick], [all_gt[i] for i in pick]
    cases: dict[str, Callable[[Scene, np.random.Generator], Image.Image | None]] = {
        "uniform noise": uniform_noise,
        "gaussian noise": gaussian_noise,
        "smooth colour noise": smooth_noise,
        **{f"blank {bg}": blank(bg) for bg in BACKGROUNDS},
        "picture of another spec": other_spec,
        "blur sigma 0.5": blur(0.5),
        "blur sigma 0.8": blur(0.8),
        "blur sigma 1.2": blur(1.2),
        "blur sigma 2.0": blur(2.0),
        "shapes morphed to blobs": morph_blobs,
        "one object dropped": drop_object,
        "one object added": add_object,
        "two objects' colours swapped": swap_colours,
    }
    print(f"\nother images ({len(sample)} scenes each; then the check families that fell, biggest first,"
          " with their mean value: 1.00 on ground truth)")
    for name, make in cases.items():
        verdicts, base = [], []
        for (spec, scene), gt in zip(sample, sample_gt):
            image = make(scene, rng)
            if image is None:
                continue
            verdicts.append(verify(spec, image))
            base.append(gt)
        s = np.array([v.score for v in verdicts])
        fam, fam0 = family_means(verdicts), family_means(base)
        drops = sorted((fam[k] - fam0[k], k) for k in fam if abs(fam[k] - fam0[k]) >= 0.02)
        if drops and all(fam[k] <= 0.1 for k in fam):
            moved = "every check <= 0.10"
        else:
            moved = ", ".join(f"{k} {fam[k]:.2f}" for _, k in drops[:6]) + (" ..." if len(drops) > 6 else "")
        print(f"  {name:30s} n={len(s):5d} mean={s.mean():.3f}  {moved}")

    images = [(spec, render(scene)) for spec, scene in sample]
    wall, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for spec, image in images:
            verify(spec, image)
        wall.append(len(images) / (time.perf_counter() - t0))
        cpu.append(len(images) / (time.process_time() - c0))
    print(f"\nspeed (median of 3 passes of {len(images)} PIL images + spec, one thread): "
          f"{statistics.median(cpu):.0f} images/s of CPU time, {statistics.median(wall):.0f} images/s wall clock "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
