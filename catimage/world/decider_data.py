"""Training pictures for the scene decider's detector: rendered scenes, degraded the way generators
degrade them, with labels computed from the degradation itself.

Why synthetic: the renderer knows every object's shape, colour, extent and centre, and a degradation
that we apply ourselves (blur, washed-out paint, colour mixing, shape morphs and warps, stray blobs,
tinted and noisy backgrounds) knows how it changed them. So every picture comes with exact labels,
without limit, and without asking the judge (`catimage.world.verify.read_image`) what it sees: the
decider's perception is learned independently of the judge's, only the rule checks are shared.

What a label means follows the rules the checks are written against (the docstring of
`catimage.world.verify`), evaluated on the *known* clean coverage of each object rather than on the
noisy pixels:

* an object is visible when at least `AREA_MIN` pixels are at least half covered by its paint;
* its soft mask is coverage / paint strength (the strength being its largest coverage), its area and
  mass centre are the soft mask's, its edge width is sum 4a(1-a) over the template perimeter;
* its shape fit is the soft IoU of that mask with an ideal circle, square and triangle of the same
  area and centre whose edges ramp like the object's; the best names the shape (below
  `SHAPE_FIT`: a blob);
* its colour is the palette colour most of its half-covered pixels are painted in (the nearest
  palette colour within `PAINT_RES`), its purity that colour's share;
* an object "is an object" (may stand for an asked one) when fit >= `PRESENT_FIT`, purity >=
  `PURITY_MIN` and its area is in range.

Scenes are laid out by the world's own grammar on TRAINING specs only (`sample_specs(...,
heldout=False)`), then perturbed (objects dropped, recoloured, reshaped, resized, moved; extra
objects and fragments added) so that the detector also sees the layouts generators get wrong.

Everything is a pure function of a numpy generator, so a training step's batch is a pure function
of (seed, step) and a resumed run sees the same pictures as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from catimage.world.grammar import realize, sample_specs
from catimage.world.scene import BACKGROUNDS, COLOURS, SHAPES, PlacedObject, SceneSpec

SIZE = 32  # canvas side (px), the generators' and the checks' resolution
SUPER = 4  # supersampling per side for coverage (as the renderer)
GRID = 8  # detector output grid (stride SIZE / GRID = 4 px)
STRIDE = SIZE // GRID

# The rules' constants, in the units of `catimage.world.verify` (restated, not imported from the
# judge's perception; they define what the checks ask, not how the judge reads pixels).
AREA_MIN, AREA_MAX = 8.0, 230.0
PRESENT_FIT, SHAPE_FIT = 0.5, 0.8
PURITY_MIN = 0.5
PAINT_RES, CLEAN_RES = 60.0, 40.0
BG_NAME_DIST = 60.0
RING = 2

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)  # class len(...) = "no world background"
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64)
_BG_RGB = np.array([BACKGROUNDS[b] for b in BACKGROUND_NAMES], dtype=np.float64)
_PERIMETER = np.array([np.pi, 4.0, 1.0 + np.sqrt(5.0)])  # perimeter / extent: circle, square, triangle
_YS, _XS = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


@dataclass(frozen=True)
class AugmentConfig:
    """How often and how strongly pictures are degraded (probabilities per object or per image)."""

    p_drop: float = 0.08  # an asked object is not drawn
    p_recolour: float = 0.12  # drawn in another palette colour
    p_reshape: float = 0.12  # drawn as another shape
    p_resize: float = 0.5  # extent scaled by resize_range
    resize_range: tuple[float, float] = (0.7, 1.35)
    p_move: float = 0.25  # centre moved by up to move_max (canvas units)
    move_max: float = 0.09
    p_extra: float = 0.25  # image: 1-2 extra random objects
    p_fragment: float = 0.25  # image: 1-3 small stray blobs
    p_morph: float = 0.25  # shape halfway towards another shape (signed-distance blend)
    morph_max: float = 0.8
    p_warp: float = 0.25  # smooth random displacement of the shape
    warp_max: float = 0.35  # x half-extent
    p_blur: float = 0.6
    blur_range: tuple[float, float] = (0.2, 1.5)
    p_wash: float = 0.12  # paint strength below 1
    wash_range: tuple[float, float] = (0.3, 0.95)
    p_mix: float = 0.2  # paint mixed towards another palette colour
    mix_max: float = 0.6
    p_split: float = 0.08  # two colours across the object (a gradient)
    colour_jitter: float = 8.0  # RGB sd of a per-object colour offset
    p_paint_noise: float = 0.3  # per-pixel chromatic noise in the paint (labels see it: purity drops)
    paint_noise_max: float = 35.0
    p_tint: float = 0.3  # background colour moved off the world's
    tint_max: float = 70.0
    noise_max: float = 8.0  # RGB sd of per-pixel noise (uniform 0..max per image)
    p_lowfreq: float = 0.3  # smooth background shading
    lowfreq_max: float = 12.0
    p_blank: float = 0.03  # an empty canvas


@dataclass
class ObjectLabel:
    """What the rules see in one drawn object (canvas units for cx, cy, extent; px for area, edge)."""

    colour: int
    shape: int  # index into SHAPES of the best template (the blob decision is fit < SHAPE_FIT)
    cx: float  # mass centre
    cy: float
    box_cy: float  # the shape's box centre (a triangle's sits extent/6 above its mass centre)
    extent: float
    area: float
    fit: float
    edge_width: float
    strength: float
    purity: float
    is_object: bool


@dataclass
class Sample:
    """One training picture and its labels."""

    image: np.ndarray  # (SIZE, SIZE, 3) uint8
    objects: list[ObjectLabel] = field(default_factory=list)
    background: int = 0  # index into BACKGROUND_NAMES, len(BACKGROUND_NAMES) = none
    clean_share: float = 1.0


# --- shapes as signed distances (px, positive inside) ------------------------------------------


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Signed distance (px, > 0 inside) of the renderer's shapes: a circle filling its box, the box,
    and an upward triangle with its base on the box's bottom edge, centred at the box centre."""
    if shape == "circle":
        return half - np.hypot(dx, dy)
    if shape == "square":
        return half - np.maximum(np.abs(dx), np.abs(dy))
    # triangle: apex (0, -half), base corners (+-half, half); edges' inward normals
    s5 = np.sqrt(5.0)
    base = half - dy
    right = (half - 2 * dx + dy) / s5
    left = (half + 2 * dx + dy) / s5
    return np.minimum(base, np.minimum(left, right))


def _coverage(
    shape: str, cx: float, cy: float, extent: float, rng: np.random.Generator, aug: AugmentConfig
) -> np.ndarray:
    """(SIZE, SIZE) coverage of one object, supersampled, with random morph / warp applied."""
    half = extent * SIZE / 2
    pad = half * (1.6 + aug.warp_max) + 2
    x0, x1 = max(0, int(cx * SIZE - pad)), min(SIZE, int(np.ceil(cx * SIZE + pad)))
    y0, y1 = max(0, int(cy * SIZE - pad)), min(SIZE, int(np.ceil(cy * SIZE + pad)))
    out = np.zeros((SIZE, SIZE))
    if x1 <= x0 or y1 <= y0:
        return out
    sub = (np.arange(SUPER) + 0.5) / SUPER
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel()
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel()
    gx, gy = np.meshgrid(xs, ys)
    dx, dy = gx - cx * SIZE, gy - cy * SIZE
    if rng.random() < aug.p_warp:
        amp = rng.uniform(0.05, aug.warp_max) * half
        k = rng.uniform(0.5, 2.0, size=4) / max(half, 1.0)
        ph = rng.uniform(0, 2 * np.pi, size=4)
        dx = dx + amp * np.sin(k[0] * dy + ph[0]) * np.cos(k[1] * dx + ph[1])
        dy = dy + amp * np.sin(k[2] * dx + ph[2]) * np.cos(k[3] * dy + ph[3])
    sdf = _sdf(shape, dx, dy, half)
    if rng.random() < aug.p_morph:
        other = SHAPES[int(rng.integers(len(SHAPES)))]
        t = rng.uniform(0.1, aug.morph_max)
        sdf = (1 - t) * sdf + t * _sdf(other, dx, dy, half)
    inside = (sdf > 0).astype(np.float64).reshape(y1 - y0, SUPER, x1 - x0, SUPER)
    out[y0:y1, x0:x1] = inside.mean(axis=(1, 3))
    return out


def _fragment(rng: np.random.Generator) -> np.ndarray:
    """A small irregular stray blob: a few Gaussian lumps, thresholded and softened."""
    cx, cy = rng.uniform(2, SIZE - 2, size=2)
    field_ = np.zeros((SIZE, SIZE))
    for _ in range(int(rng.integers(1, 4))):
        ox, oy = rng.normal(0, 1.5, size=2)
        s = rng.uniform(0.8, 2.2)
        field_ += np.exp(-((_XS - cx - ox) ** 2 + (_YS - cy - oy) ** 2) / (2 * s * s))
    return np.clip((field_ - rng.uniform(0.2, 0.6)) * rng.uniform(1.5, 4.0), 0.0, 1.0)


# --- labels from a known soft mask --------------------------------------------------------------


def _templates(area: float, cx: float, cy: float, ramp: float) -> np.ndarray:
    """(3, SIZE, SIZE) coverage of an ideal circle, square and upward triangle with the given area
    and mass centre (px), edges ramped over `ramp` px: the rules' shape references."""
    dx, dy = _XS - cx, _YS - cy
    circle = np.sqrt(area / np.pi) - np.hypot(dx, dy)
    square = np.sqrt(area) / 2 - np.maximum(np.abs(dx), np.abs(dy))
    b = np.sqrt(2 * area)
    top = dy + b * (2 / 3)  # the mass centre sits 2b/3 below the apex
    s5 = np.sqrt(5.0)
    triangle = np.minimum(np.minimum(b - top, (2 * dx + top) / s5), (-2 * dx + top) / s5)
    return np.clip(0.5 + np.stack([circle, square, triangle]) / ramp, 0.0, 1.0)


def nearest_paint(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For paint colours (..., 3): the nearest palette colour's index and the RGB distance to it."""
    d = np.sqrt(((rgb[..., None, :] - PALETTE) ** 2).sum(-1))
    idx = np.argmin(d, axis=-1)
    return idx, np.take_along_axis(d, idx[..., None], -1)[..., 0]


def object_label(alpha: np.ndarray, paint: np.ndarray) -> ObjectLabel | None:
    """The rules' view of one object from its known coverage x strength `alpha` (SIZE, SIZE) and
    per-pixel paint colour `paint` (SIZE, SIZE, 3); None when it would not be seen at all."""
    fg = alpha >= 0.5
    if fg.sum() < AREA_MIN:
        return None
    strength = max(0.5, float(alpha.max()))
    support = ndimage.binary_dilation(fg, iterations=RING) & (alpha > 0.02)
    soft = np.where(support, np.minimum(alpha / strength, 1.0), 0.0)
    area = float(soft.sum())
    cx, cy = float((soft * _XS).sum() / area), float((soft * _YS).sum() / area)
    band = float((4 * soft * (1 - soft)).sum())
    ramp = max(1.0, 1.5 * band / (2 * np.sqrt(np.pi * area)))
    cover = _templates(area, cx, cy, ramp)
    inter = np.minimum(cover, soft[None]).sum(axis=(1, 2))
    iou = inter / (2 * area - inter)
    shape = int(np.argmax(iou))
    fit = float(iou[shape])
    extent = float([2 * np.sqrt(area / np.pi), np.sqrt(area), np.sqrt(2 * area)][shape])
    idx, dist = nearest_paint(paint[fg])
    # a half-covered pixel's colour distance scales with its coverage (it is a mix with the background)
    painted = dist * np.minimum(alpha[fg], 1.0) <= PAINT_RES
    votes = np.bincount(idx[painted], minlength=len(PALETTE))
    colour = int(np.argmax(votes))
    purity = float(votes[colour] / fg.sum())
    return ObjectLabel(
        colour=colour, shape=shape, cx=cx / SIZE, cy=cy / SIZE,
        box_cy=(cy - extent / 6) / SIZE if shape == 2 else cy / SIZE, extent=extent / SIZE, area=area, fit=fit,
        edge_width=band / (extent * _PERIMETER[shape]), strength=strength, purity=purity,
        is_object=bool(fit >= PRESENT_FIT and purity >= PURITY_MIN and AREA_MIN <= area <= AREA_MAX),
    )


# --- pictures -----------------------------------------------------------------------------------


def _paint_field(colour: int, rng: np.random.Generator, aug: AugmentConfig, cx: float, cy: float) -> np.ndarray:
    """(SIZE, SIZE, 3) paint colour of one object: its palette colour, maybe mixed or split."""
    base = PALETTE[colour] + rng.normal(0, aug.colour_jitter, size=3)
    paint = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    other = PALETTE[int(rng.integers(len(PALETTE)))]
    if rng.random() < aug.p_mix:
        paint = paint + rng.uniform(0.05, aug.mix_max) * (other - paint)
    elif rng.random() < aug.p_split:
        theta = rng.uniform(0, 2 * np.pi)
        t = (np.cos(theta) * (_XS - cx * SIZE) + np.sin(theta) * (_YS - cy * SIZE)) / rng.uniform(2.0, 6.0)
        w = np.clip(0.5 + t + rng.uniform(-0.5, 0.5), 0.0, 1.0)[..., None]
        paint = paint * (1 - w) + other * w
    if rng.random() < aug.p_paint_noise:
        paint = paint + rng.normal(0, rng.uniform(5.0, aug.paint_noise_max), size=paint.shape)
    return np.clip(paint, 0, 255)


def _layout(spec: SceneSpec, rng: np.random.Generator, aug: AugmentConfig) -> tuple[list[PlacedObject], str]:
    """A realisation of `spec`, then perturbed: dropped, recoloured, reshaped, resized, moved
    objects, and extra ones where there is room."""
    scene = realize(spec, rng)
    placed: list[PlacedObject] = []
    for obj in scene.objects:
        if rng.random() < aug.p_drop:
            continue
        colour = COLOUR_NAMES[int(rng.integers(5))] if rng.random() < aug.p_recolour else obj.colour
        shape = SHAPES[int(rng.integers(3))] if rng.random() < aug.p_reshape else obj.shape
        extent = obj.extent * (rng.uniform(*aug.resize_range) if rng.random() < aug.p_resize else 1.0)
        cx, cy = obj.cx, obj.cy
        if rng.random() < aug.p_move:
            cx, cy = np.clip([cx, cy] + rng.uniform(-aug.move_max, aug.move_max, size=2), 0.08, 0.92)
        placed.append(PlacedObject(shape, colour, float(cx), float(cy), float(extent)))
    if rng.random() < aug.p_extra:
        for _ in range(int(rng.integers(1, 3))):
            cand = PlacedObject(SHAPES[int(rng.integers(3))], COLOUR_NAMES[int(rng.integers(5))],
                                float(rng.uniform(0.12, 0.88)), float(rng.uniform(0.12, 0.88)),
                                float(rng.uniform(0.15, 0.34)))
            if all(np.hypot(cand.cx - o.cx, cand.cy - o.cy) > (cand.extent + o.extent) * 0.75 + 0.05 for o in placed):
                placed.append(cand)
    return placed, scene.background


def _background(name: str, rng: np.random.Generator, aug: AugmentConfig) -> tuple[np.ndarray, int]:
    """(SIZE, SIZE, 3) background and its class (the world background it is nearest, or none)."""
    rgb = np.array(BACKGROUNDS[name], dtype=np.float64)
    if rng.random() < aug.p_tint:
        direction = rng.normal(size=3)
        rgb = np.clip(rgb + direction / np.linalg.norm(direction) * rng.uniform(0, aug.tint_max), 0, 255)
    dist = np.sqrt(((_BG_RGB - rgb) ** 2).sum(1))
    cls = int(np.argmin(dist)) if dist.min() <= BG_NAME_DIST else len(BACKGROUND_NAMES)
    canvas = np.broadcast_to(rgb, (SIZE, SIZE, 3)).copy()
    if rng.random() < aug.p_lowfreq:
        amp = rng.uniform(0, aug.lowfreq_max)
        k, ph = rng.uniform(0.05, 0.3, size=2), rng.uniform(0, 2 * np.pi, size=2)
        canvas += (amp * np.sin(k[0] * _XS + ph[0]) * np.cos(k[1] * _YS + ph[1]))[..., None]
    return canvas, cls


def synthesize(spec: SceneSpec, rng: np.random.Generator, aug: AugmentConfig) -> Sample:
    """One degraded picture of a (perturbed) realisation of `spec`, with its labels."""
    if rng.random() < aug.p_blank:
        placed, bg_name = [], str(rng.choice(BACKGROUND_NAMES))
    else:
        placed, bg_name = _layout(spec, rng, aug)
    canvas, bg_cls = _background(bg_name, rng, aug)
    alphas, paints = [], []
    for obj in placed:
        cov = _coverage(obj.shape, obj.cx, obj.cy, obj.extent, rng, aug)
        alphas.append(cov)
        paints.append(_paint_field(COLOUR_NAMES.index(obj.colour), rng, aug, obj.cx, obj.cy))
    if rng.random() < aug.p_fragment:
        for _ in range(int(rng.integers(1, 4))):
            alphas.append(_fragment(rng))
            colour = rng.uniform(0, 255, size=3) if rng.random() < 0.3 else PALETTE[int(rng.integers(5))]
            paints.append(np.broadcast_to(colour, (SIZE, SIZE, 3)).copy())
    labels: list[ObjectLabel] = []
    n_fg = n_clean = 0
    for cov, paint in zip(alphas, paints):
        if rng.random() < aug.p_blur:
            cov = ndimage.gaussian_filter(cov, rng.uniform(*aug.blur_range), mode="constant")
        if rng.random() < aug.p_wash:
            cov = cov * rng.uniform(*aug.wash_range)
        canvas = canvas * (1 - cov[..., None]) + cov[..., None] * paint
        label = object_label(cov, paint)
        fg = cov >= 0.5
        _, dist = nearest_paint(paint[fg])
        n_fg += int(fg.sum())
        n_clean += int((dist * cov[fg] <= CLEAN_RES).sum())
        if label is not None:
            labels.append(label)
    canvas = canvas + rng.normal(0, rng.uniform(0, aug.noise_max), size=canvas.shape)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return Sample(image, labels, bg_cls, n_clean / n_fg if n_fg else 1.0)


class SpecBank:
    """A fixed list of training-scene specs (never held out) to lay pictures out from: drawing specs
    with the grammar's rejection sampling is slower than rendering, so it is done once."""

    def __init__(self, size: int = 4000, seed: int = 4321) -> None:
        self.specs = sample_specs(np.random.default_rng(seed), size, heldout=False)

    def draw(self, rng: np.random.Generator) -> SceneSpec:
        return self.specs[int(rng.integers(len(self.specs)))]


# --- detector targets ---------------------------------------------------------------------------

HEAT_SIGMA = 0.6  # grid cells


@dataclass
class Targets:
    """Dense targets of a batch on the GRID x GRID output (see `encode`)."""

    heat: np.ndarray  # (B, G, G) float32: Gaussian bumps at object centres
    mask: np.ndarray  # (B, G, G) bool: the cell holding an object's centre
    colour: np.ndarray  # (B, G, G) int64
    shape: np.ndarray  # (B, G, G) int64
    is_object: np.ndarray  # (B, G, G) float32
    regress: np.ndarray  # (B, 6, G, G) float32: dx, dy (in-cell), log area, edge, strength, fit
    background: np.ndarray  # (B,) int64
    clean_share: np.ndarray  # (B,) float32


REGRESS = ("dx", "dy", "log_area", "edge_width", "strength", "fit")


def encode(samples: list[Sample]) -> Targets:
    """Per-cell targets: each visible object is owned by the grid cell holding its mass centre."""
    b = len(samples)
    t = Targets(
        heat=np.zeros((b, GRID, GRID), np.float32), mask=np.zeros((b, GRID, GRID), bool),
        colour=np.zeros((b, GRID, GRID), np.int64), shape=np.zeros((b, GRID, GRID), np.int64),
        is_object=np.zeros((b, GRID, GRID), np.float32), regress=np.zeros((b, len(REGRESS), GRID, GRID), np.float32),
        background=np.array([s.background for s in samples], np.int64),
        clean_share=np.array([s.clean_share for s in samples], np.float32),
    )
    centres = (np.arange(GRID) + 0.5)
    for i, s in enumerate(samples):
        for o in s.objects:
            gx, gy = o.cx * GRID, o.cy * GRID
            bump = np.exp(-((centres[None, :] - gx) ** 2 + (centres[:, None] - gy) ** 2) / (2 * HEAT_SIGMA**2))
            t.heat[i] = np.maximum(t.heat[i], bump)
            c, r = min(GRID - 1, int(gx)), min(GRID - 1, int(gy))
            t.heat[i, r, c] = 1.0
            t.mask[i, r, c] = True
            t.colour[i, r, c], t.shape[i, r, c], t.is_object[i, r, c] = o.colour, o.shape, float(o.is_object)
            t.regress[i, :, r, c] = (gx - c, gy - r, np.log(o.area), o.edge_width, o.strength, o.fit)
    return t


def mirror(sample: Sample) -> Sample:
    """The left-right mirror image: every world shape is symmetric about its vertical axis, so only
    the centres move (the rules' labels are otherwise unchanged)."""
    objects = [replace(o, cx=1.0 - o.cx) for o in sample.objects]
    return Sample(np.ascontiguousarray(sample.image[:, ::-1]), objects, sample.background, sample.clean_share)


def make_batch(bank: SpecBank, rng: np.random.Generator, batch_size: int, aug: AugmentConfig) -> tuple[np.ndarray, Targets]:
    """(B, SIZE, SIZE, 3) uint8 pictures and their targets: B/2 synthesized pictures and their mirror
    images (synthesis costs more than a training step on 2 cores; mirroring halves it)."""
    half = [synthesize(bank.draw(rng), rng, aug) for _ in range((batch_size + 1) // 2)]
    samples = (half + [mirror(s) for s in half])[:batch_size]
    return np.stack([s.image for s in samples]), encode(samples)
