"""Does a picture draw what a world prompt asks for? `verify(spec, image) -> Verdict`, score in [0, 1].

GenEval-style: the prompt's spec becomes a list of weighted checks, each with a value in [0, 1], and
the score is sum(weight * value) / sum(weight). `Verdict.checks` lists them, so a report can say why
an image lost points. Classical vision only (numpy / scipy / PIL): ~1 ms per image on one core.

Reading the picture (`read_image`, prompt-free; at 32 x 32, other sizes are box-resized to it):
1. Background: the median border colour when at least half the picture lies within `BG_RADIUS` of
   it (the usual case), else the border pixel whose colour the most pixels share (four large
   objects in the corners can cover most of the border, never most of the picture: <= 36 %);
   refined to the mean of the pixels within `BG_RADIUS`.
2. Colour unmixing: each pixel is explained as background + alpha * (palette colour - background)
   along the palette colour whose segment it lies nearest to (residual = RGB distance to that
   segment). Anti-aliased and blurred edges are exactly such mixtures, so on ground truth every
   pixel has residual ~0 and alpha = its coverage, on any background. Foreground = alpha >= 0.5 (the
   half-coverage line) or, for paint that fits no segment (residual > `CLEAN_RES`), farther than
   `FAR` from the background.
3. Objects: 4-connected components of the foreground of >= `AREA_MIN` px (drawn objects never
   share an edge-adjacent cell; diagonal neighbours may come within ~1 px, so not 8-connected).
   A component that reads badly (not an object, or a blob) is split at its solid cores (alpha >
   `CORE_ALPHA`, >= `CORE_MIN` px) when that turns it into good objects: large objects in diagonal
   cells can meet in the raster (their corners share a half-covered pixel).
   Colour = majority palette label of its pixels within `PAINT_RES` of a segment; purity = that
   label's share. Soft mask = alpha of that colour over the component and the `RING` px around it
   (only pixels of its own colour), divided by the object's largest alpha (its paint strength: a
   washed-out object keeps its shape and edges and pays in clean_colour instead).
4. Shape: the soft mask's IoU (sum min / sum max) with an ideal circle, square and upward triangle
   of the same area and mass centre (the triangle's box centre sits b/6 above its mass centre)
   whose edges ramp over the object's own edge width (so blur alone does not change the shape).
   The best fit names the shape if >= `SHAPE_FIT` (ground truth >= 0.93, sigma-1.2 blur >= 0.85,
   lumpy blobs ~0.65-0.7), else "blob". A component is an object only if its best fit is >=
   `PRESENT_FIT`, its purity >= `PURITY_MIN` and its area within [`AREA_MIN`, `AREA_MAX`] (noise
   fragments, off-palette smears and several objects merged are not). Position = the best
   template's box centre -> grid cell. Edge width = sum 4a(1-a) / template perimeter (px): a linear
   ramp of width w gives 2w/3, so ~0.65 px on anti-aliased ground truth, ~2.3 px after a sigma-1
   blur.

Checking a spec (`check`). Asked objects (every member of a group) are matched to detected objects
by the injective assignment that satisfies the most weighted checks (brute force: <= 4 asked,
<= `MAX_CANDIDATES` detections); a detection can stand for an asked object only if it has its
colour or its shape, so a colour swap reads as wrong colours, and a picture of other things as
missing objects. The checks, their weights and why:

    check         weight  per                   value
    present       1.0     asked object          1 if matched
    colour        1.0     asked object          1 if its match has the asked colour
    shape         1.0     asked object          1 if its match has the asked shape
    size          0.5     object with a size    1 if its match's area is on the asked side of the
                                                asked shape's area at extent `LARGE_FROM` (0.25,
                                                midway between small 0.2 and large 0.3)
    position      1.0     object with a place   share of the constrained axes (row / col) right
    count         1.0     group of 2-3          1 - |found - asked| / asked, >= 0 (found: objects
                                                of the group's colour and shape)
    relation      1.0     relation              share of (subject, target) member pairs whose
                                                centres are in order by > `REL_MARGIN` (1.6 px)
    background    0.5     asked background      1 if the estimated background is nearest the asked
                                                one (within `BG_NAME_DIST`)
    no_extra      1.0     image                 1 / (1 + components >= AREA_MIN left unmatched)
    clean_colour  0.5     image                 (foreground share within `CLEAN_RES` of a segment,
                                                0.5 -> 0 .. 0.9 -> 1) x (mean paint strength of the
                                                asked objects, 0.6 -> 0 .. 0.9 -> 1)
    crisp_edges   1.0     image                 mean over asked objects of their edge width,
                                                `EDGE_SHARP` px -> 1 .. `EDGE_BLUR` px -> 0

Why these weights: present, colour and shape are what a prompt is mostly about and what model
capacity changes (shape, colour binding), so each asked object brings 3; a count, a position or a
relation is one more object's worth of requirement; size (two sizes 1.5x apart) and background
(nearly always right) are coarse cues at 0.5. no_extra, clean_colour and crisp_edges are what the
number of diffusion steps changes (stray blobs, washed-out colour, blur): 2.5 in all, about a third
of a one-object scene's weight and a sixth of a four-object one's. background, no_extra,
clean_colour and crisp_edges are credited per asked object found (multiplied by the found share, or
averaged over asked objects with 0 for missing ones): a clean picture of something else, or a blank
canvas in the asked colour, draws nothing that was asked and earns nothing.

Measured (benchmarks/scene_score_check.py --n 2000): mean 1.0000, min 0.999 on 14,630 rendered
scenes of random specs and 6,000 four-object scenes with relations (2,000 per background); 0.000 on
uniform and Gaussian noise and on blank canvases, 0.058 on blotchy colour noise, 0.385 on pictures
of other specs; graded under blur (sigma 0.5 / 0.8 / 1.2 / 2: 0.99 / 0.95 / 0.88 / 0.65), blobs
(0.76), a dropped (0.65) or added (0.94) object and swapped colours (0.85). ~1,500 images/s of CPU
time on one thread.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from catimage.world.parse import parse
from catimage.world.scene import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SceneSpec

WORK = 32  # analysis resolution (the generators' size); thresholds in pixels refer to it
BG_RADIUS = 30.0  # RGB distance for "same background colour" (noise of a flat generated background)
NOISE_FLOOR = 8.0  # RGB distance from the background under which a pixel holds no paint (alpha < ~0.07)
CORE_ALPHA, CORE_MIN = 0.75, 4  # a solid core: > 0.75 coverage, >= 4 px (see _split_touching)
RING = 2  # px around a component whose partial pixels (of its colour) belong to its soft mask
FAR = 70.0  # RGB distance from the background beyond which an off-palette pixel is foreground
CLEAN_RES = 40.0  # RGB distance to a palette segment for a clean pixel (blue-purple, the nearest
# pair, are 118 apart: a third of that is still unambiguously one colour)
PAINT_RES = 60.0  # RGB distance to a palette segment for a pixel to count as painted in that colour
PURITY_MIN = 0.5  # share of a component painted in its colour for it to be an object
BG_NAME_DIST = 60.0  # the estimated background names a world background within this distance
AREA_MIN = 8.0  # px: a small triangle covers ~20 px, so 40 % of the smallest object
AREA_MAX = 230.0  # px: 2.5 x a large square (92 px); bigger is a smear, not an object
PRESENT_FIT = 0.5  # best template IoU for a component to count as an object at all
SHAPE_FIT = 0.8  # best template IoU for a shape name (below: a blob). Ground truth fits >= 0.93,
# a sigma-1.2 blur >= 0.85 (the templates' edges ramp like the object's); lumpy blobs ~0.65-0.7
LARGE_FROM = 0.25  # canvas units: midway between small (0.2) and large (0.3)
REL_MARGIN = 0.05  # canvas units (1.6 px): centres closer than this are in no order
EDGE_SHARP, EDGE_BLUR = 1.0, 2.2  # px of edge width: ground truth ~0.7, a sigma-1 blur ~2.3
CLEAN_LO, CLEAN_HI = 0.5, 0.9
STRENGTH_LO, STRENGTH_HI = 0.6, 0.9  # paint strength mapped to 0..1 for clean_colour
MAX_CANDIDATES = 7

WEIGHTS: dict[str, float] = {
    "present": 1.0,
    "colour": 1.0,
    "shape": 1.0,
    "size": 0.5,
    "position": 1.0,
    "count": 1.0,
    "relation": 1.0,
    "background": 0.5,
    "no_extra": 1.0,
    "clean_colour": 0.5,
    "crisp_edges": 1.0,
}

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64)
_YS, _XS = np.mgrid[0:WORK, 0:WORK].astype(np.float64) + 0.5
_XS, _YS = _XS.ravel(), _YS.ravel()
_ring = np.zeros((WORK, WORK), bool)
_ring[[0, -1], :] = _ring[:, [0, -1]] = True
_BORDER_ALL = np.flatnonzero(_ring.ravel())
_BORDER = _BORDER_ALL[::3]
_FOUR = ndimage.generate_binary_structure(2, 1)
_SQRT5 = np.sqrt(5.0)
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / extent^2


@dataclass(frozen=True)
class Check:
    """One requirement of the prompt: its name, weight, and how far the image meets it (0..1)."""

    name: str
    weight: float
    value: float


@dataclass(frozen=True)
class Detection:
    """One object read off the image (canvas units for position and extent)."""

    colour: str
    shape: str  # a world shape, or "blob" when no template fits well
    size: str
    cx: float
    cy: float
    extent: float
    area: float  # soft area, px at WORK resolution
    fit: float  # best template soft IoU
    edge_width: float  # px
    purity: float  # share of its pixels painted (within PAINT_RES) in its colour
    strength: float  # paint strength: alpha of its interior (1 = the palette colour, < 1 washed out)
    is_object: bool  # passes PRESENT_FIT and the area range (may be matched)

    def size_as(self, shape: str) -> str:
        """Small or large, judged as a `shape` of this area (so a size is right or wrong whatever
        shape was drawn): large if the area exceeds that of the shape at extent LARGE_FROM."""
        return "large" if self.area >= _FILL[shape] * (LARGE_FROM * WORK) ** 2 else "small"

    @property
    def cell(self) -> tuple[int, int]:
        return min(2, max(0, int(self.cy * 3))), min(2, max(0, int(self.cx * 3)))


@dataclass(frozen=True)
class Reading:
    """What the image shows, independent of any prompt."""

    background_rgb: tuple[float, float, float]
    background: str | None  # nearest world background within BG_NAME_DIST
    detections: tuple[Detection, ...]
    clean_share: float  # share of foreground pixels within CLEAN_RES of a palette segment


@dataclass(frozen=True)
class Verdict:
    """The score and the checks behind it."""

    score: float
    checks: tuple[Check, ...]
    reading: Reading
    matching: tuple[int | None, ...]  # detection index for each asked object (groups expanded)

    def value(self, prefix: str) -> float:
        """Weighted mean value of the checks whose name starts with `prefix` (e.g. "shape")."""
        sel = [c for c in self.checks if c.name.startswith(prefix)]
        if not sel:
            raise KeyError(f"no check named {prefix!r}*; have {[c.name for c in self.checks]}")
        return sum(c.weight * c.value for c in sel) / sum(c.weight for c in sel)


# --- reading the image ----------------------------------------------------------------------------


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """(WORK*WORK, 3) float64 RGB of the image box-resized to WORK x WORK."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (WORK, WORK):
        image = image.resize((WORK, WORK), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64).reshape(-1, 3)


def _background(px: np.ndarray) -> np.ndarray:
    """The background colour: the median border colour when most of the picture shares it (the
    usual case, fast), else the border pixel whose colour the most pixels share."""
    guess = np.median(px[_BORDER_ALL], axis=0)
    near = ((px - guess) ** 2).sum(1) < BG_RADIUS**2
    if near.mean() >= 0.5:
        return px[near].mean(0)
    cand = px[_BORDER]
    d2 = (cand * cand).sum(1)[:, None] - 2.0 * cand @ px.T + (px * px).sum(1)[None, :]
    near_all = d2 < BG_RADIUS**2
    best = int(np.argmax(near_all.sum(1)))
    return px[near_all[best]].mean(0)


def _templates(
    area: np.ndarray, cx: np.ndarray, cy: np.ndarray, ramp: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Coverage (3, n) of an ideal circle, square and triangle at pixel centres (xs, ys), n pixels,
    each pixel given the area, mass centre and edge ramp width (px) of its own component."""
    dx, dy = xs - cx, ys - cy
    circle = np.sqrt(area / np.pi) - np.hypot(dx, dy)
    square = np.sqrt(area) / 2 - np.maximum(np.abs(dx), np.abs(dy))
    b = np.sqrt(2 * area)
    top = dy + b * (1 / 6 + 1 / 2)  # y below the apex (the mass centre is 2b/3 below it)
    triangle = np.minimum(np.minimum(b - top, (2 * dx + top) / _SQRT5), (-2 * dx + top) / _SQRT5)
    return np.clip(0.5 + np.stack([circle, square, triangle]) / ramp, 0.0, 1.0)


def _unmix(d: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixels d (= rgb - background): alpha (n, 5) along each background->palette segment,
    the nearest segment's index (n,) and the RGB distance to it (n,)."""
    v = _PALETTE - bg
    vv = np.maximum((v * v).sum(1), 100.0)  # a palette colour equal to the background has no segment
    dots = d @ v.T
    alpha = np.clip(dots / vv, 0.0, 1.0)
    res2 = (d * d).sum(1)[:, None] - 2 * alpha * dots + alpha * alpha * vv
    best = np.argmin(res2, axis=1)
    return alpha, best, np.sqrt(np.maximum(res2[np.arange(len(d)), best], 0.0))


def _split_touching(labels: np.ndarray, n: int, strong: np.ndarray) -> tuple[np.ndarray, int]:
    """Split components that hold two or more solid cores (pixels with alpha > CORE_ALPHA, >=
    CORE_MIN px each) joined only by partial pixels: two diagonal neighbours whose corners touch
    in the raster (large objects in diagonal cells can overlap by a fraction of a pixel). Each
    pixel of such a component goes to the core it reaches first, growing 4-connected."""
    cores, n_cores = ndimage.label(strong, _FOUR)
    if n_cores < 2:
        return labels, n
    solid = np.bincount(cores.ravel(), minlength=n_cores + 1) >= CORE_MIN
    solid[0] = False
    parent = np.zeros(n_cores + 1, dtype=np.int64)
    parent[cores.ravel()] = labels.ravel()
    per_comp = np.bincount(parent[solid], minlength=n + 1)
    labels = labels.copy()
    for comp in np.flatnonzero(per_comp >= 2):
        mask = labels == comp
        seeds = np.where(mask & solid[cores], cores, 0)
        for _ in range(WORK):
            if not (mask & (seeds == 0)).any():
                break
            grown = ndimage.grey_dilation(seeds, footprint=_FOUR)
            seeds = np.where(mask & (seeds == 0), grown, seeds)
        ids = np.unique(seeds[mask & (seeds > 0)])
        new = np.zeros(n_cores + 1, dtype=np.int64)
        new[ids] = np.arange(n + 1, n + 1 + len(ids))
        labels[mask] = new[seeds[mask]]  # pixels no core reached (0) drop out of every component
        n += len(ids)
    return labels, n


def _strength(comp: np.ndarray, alpha: np.ndarray, k: int) -> np.ndarray:
    """Per component 1..k, the largest alpha: its paint strength (1 on ground truth; a washed-out
    object is a plateau of alpha < 1). The maximum rather than a quantile, so that a blurred small
    object (a peak, not a plateau) is rescaled as little as possible."""
    out = np.zeros(k + 1)
    np.maximum.at(out, comp, alpha)
    return np.maximum(out[1:], 0.5)


@dataclass(frozen=True)
class _Paint:
    """Per-pixel unmixing of the pixels that may hold paint (`sub`, flat indices)."""

    sub: np.ndarray
    alpha: np.ndarray  # (n, 5) along each background -> palette segment
    best: np.ndarray  # nearest segment
    res: np.ndarray  # RGB distance to it
    fg: np.ndarray  # foreground (bool)

    @property
    def clean(self) -> np.ndarray:
        return self.res <= CLEAN_RES


def _paint(px: np.ndarray, bg: np.ndarray) -> _Paint:
    d = px - bg
    dist2 = (d * d).sum(1)
    sub = np.flatnonzero(dist2 > NOISE_FLOOR**2)  # all other pixels: alpha ~ 0
    alpha, best, res = _unmix(d[sub], bg)
    a_best = alpha[np.arange(len(sub)), best]
    fg = (a_best >= 0.5) | ((dist2[sub] > FAR**2) & (res > CLEAN_RES))
    return _Paint(sub, alpha, best, res, fg)


def _components(paint: _Paint, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Object regions from connected-component `labels`: per paint pixel its component 1..k (0 =
    none: background, specks, or a partial pixel of another colour), their foreground areas, k."""
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= AREA_MIN
    keep[0] = False
    k = int(keep.sum())
    ids = np.zeros(n + 1, dtype=np.int64)
    ids[keep] = np.arange(1, k + 1)
    own = labels.ravel()[paint.sub]
    near = ndimage.maximum_filter(labels, size=2 * RING + 1).ravel()[paint.sub]
    comp = ids[np.where(paint.fg, own, np.where(paint.clean, near, 0))]
    return comp, areas[keep], k


def _detections(paint: _Paint, comp: np.ndarray, fg_area: np.ndarray, k: int) -> list[Detection]:
    """Colour, soft mask, shape fit, extent, position and edge width of components 1..k."""
    painted = paint.fg & (comp > 0) & (paint.res <= PAINT_RES)
    n_col = len(_PALETTE)
    votes = np.bincount(comp[painted] * n_col + paint.best[painted], minlength=(k + 1) * n_col)
    votes = votes.reshape(k + 1, n_col)[1:]
    colour = np.argmax(votes, axis=1)
    purity = votes[np.arange(k), colour] / fg_area

    colour_of = np.concatenate([[0], colour])[comp]
    sel = np.flatnonzero((comp > 0) & (paint.fg | (paint.best == colour_of)))  # ring: own colour only
    c = comp[sel]
    raw = paint.alpha[sel, colour_of[sel]]
    xs, ys = _XS[paint.sub[sel]], _YS[paint.sub[sel]]
    strength = _strength(c, raw, k)

    def per_pixel(per_object: np.ndarray) -> np.ndarray:
        return np.concatenate([[1.0], per_object])[c]

    def per_object(per_pixel: np.ndarray) -> np.ndarray:
        return np.bincount(c, weights=per_pixel, minlength=k + 1)[1:]

    soft = np.minimum(raw / per_pixel(strength), 1.0)  # washed-out paint rescaled
    area = np.maximum(per_object(soft), 1e-9)
    cx, cy = per_object(soft * xs) / area, per_object(soft * ys) / area
    band = per_object(4 * soft * (1 - soft))
    # edge ramp width: a linear ramp of width w gives sum 4a(1-a) = 2w/3 per unit of perimeter
    # (circle-equivalent perimeter here; the shapes' perimeters differ by < 25 %)
    ramp = np.maximum(1.0, 1.5 * band / (2 * np.sqrt(np.pi * area)))
    cover = _templates(per_pixel(area), per_pixel(cx), per_pixel(cy), per_pixel(ramp), xs, ys)
    inter = np.stack([per_object(np.minimum(cover[s], soft)) for s in range(3)], axis=1)
    iou = inter / (2 * area[:, None] - inter)  # the templates' own mass is the object's area
    which = np.argmax(iou, axis=1)
    fit = iou[np.arange(k), which]
    side = np.stack([2 * np.sqrt(area / np.pi), np.sqrt(area), np.sqrt(2 * area)], axis=1)
    extent = side[np.arange(k), which]
    box_cy = np.where(which == 2, cy - extent / 6, cy)
    edge = band / (extent * np.array([np.pi, 4.0, 1 + _SQRT5])[which])
    return [
        Detection(
            colour=_COLOUR_NAMES[colour[i]],
            shape=SHAPES[which[i]] if fit[i] >= SHAPE_FIT else "blob",
            size="large" if extent[i] / WORK >= LARGE_FROM else "small",
            cx=float(cx[i] / WORK),
            cy=float(box_cy[i] / WORK),
            extent=float(extent[i] / WORK),
            area=float(area[i]),
            fit=float(fit[i]),
            edge_width=float(edge[i]),
            purity=float(purity[i]),
            strength=float(strength[i]),
            is_object=bool(fit[i] >= PRESENT_FIT and purity[i] >= PURITY_MIN and AREA_MIN <= area[i] <= AREA_MAX),
        )
        for i in range(k)
    ]


def _objects(paint: _Paint, labels: np.ndarray, n: int) -> list[Detection]:
    comp, fg_area, k = _components(paint, labels, n)
    return _detections(paint, comp, fg_area, k) if k else []


def _good(det: Detection) -> bool:
    return det.is_object and det.shape != "blob"


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Background, objects and colour cleanliness of one image (see the module docstring)."""
    px = _pixels(image)
    bg = _background(px)
    paint = _paint(px, bg)
    n_fg = int(paint.fg.sum())
    clean_share = float((paint.fg & paint.clean).sum() / n_fg) if n_fg else 1.0
    fg = np.zeros(WORK * WORK, dtype=bool)
    fg[paint.sub[paint.fg]] = True
    labels, n = ndimage.label(fg.reshape(WORK, WORK), _FOUR)
    dets = _objects(paint, labels, n)
    if not all(_good(d) for d in dets):
        # Two shapes whose corners meet in the raster read as one blob: split such a component at
        # its solid cores, and keep the split only if it turns bad readings into good objects
        # (splitting a noise smear yields more bad pieces, not fewer)
        strong = np.zeros(WORK * WORK, dtype=bool)
        strong[paint.sub[paint.fg & (paint.alpha[np.arange(len(paint.sub)), paint.best] > CORE_ALPHA)]] = True
        split, n_split = _split_touching(labels, n, strong.reshape(WORK, WORK))
        if n_split > n:
            again = _objects(paint, split, n_split)
            bad, bad_again = sum(not _good(d) for d in dets), sum(not _good(d) for d in again)
            if bad_again < bad and len(again) - bad_again > len(dets) - bad:
                dets = again
    return Reading(tuple(bg.tolist()), _name_background(bg), tuple(dets), clean_share)


def _name_background(bg: np.ndarray) -> str | None:
    dist = np.sqrt(((_BG_RGB - bg) ** 2).sum(1))
    i = int(np.argmin(dist))
    return _BG_NAMES[i] if dist[i] <= BG_NAME_DIST else None


# --- checking a spec against a reading ------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _matchings(n: int, m: int) -> np.ndarray:
    """All injective maps of n asked objects onto m detections that match min(n, m) of them:
    (R, n) int, -1 = unmatched."""
    if m >= n:
        return np.array(list(itertools.permutations(range(m), n)), dtype=np.int64).reshape(-1, n)
    rows = set()
    for inst in itertools.permutations(range(n), m):  # inst[j] = asked object given detection j
        row = [-1] * n
        for j, i in enumerate(inst):
            row[i] = j
        rows.add(tuple(row))
    return np.array(sorted(rows, reverse=True), dtype=np.int64).reshape(-1, n)


def _order(relation: str, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """(m + 1, m + 1): 1 where detection a <relation> detection b by more than REL_MARGIN; the last
    row and column (no detection) are 0."""
    m = len(cx)
    out = np.zeros((m + 1, m + 1))
    if relation == "left of":
        out[:m, :m] = cx[:, None] < cx[None, :] - REL_MARGIN
    elif relation == "right of":
        out[:m, :m] = cx[:, None] > cx[None, :] + REL_MARGIN
    elif relation == "above":
        out[:m, :m] = cy[:, None] < cy[None, :] - REL_MARGIN
    else:  # below
        out[:m, :m] = cy[:, None] > cy[None, :] + REL_MARGIN
    return out


def _position_value(det: Detection, position: str) -> float:
    row, col = POSITIONS[position]
    r, c = det.cell
    wanted = [(want, got) for want, got in ((row, r), (col, c)) if want is not None]
    return sum(want == got for want, got in wanted) / len(wanted)


def _ramp(x: float, zero_at: float, one_at: float) -> float:
    """x mapped linearly from `zero_at` (-> 0) to `one_at` (-> 1), clipped to [0, 1]."""
    return min(1.0, max(0.0, (x - zero_at) / (one_at - zero_at)))


def _label(spec: SceneSpec, g: int, member: int) -> str:
    obj = spec.objects[g]
    name = f"{obj.colour} {obj.shape}"
    return f"{name} #{member + 1}" if obj.count > 1 else name


def _candidates(reading: Reading) -> list[int]:
    """Indices of the detections that may stand for asked objects (the best MAX_CANDIDATES)."""
    cand = [j for j, det in enumerate(reading.detections) if det.is_object]
    if len(cand) > MAX_CANDIDATES:
        dets = reading.detections
        cand = sorted(sorted(cand, key=lambda j: -dets[j].fit * dets[j].area)[:MAX_CANDIDATES])
    return cand


def _object_checks(spec: SceneSpec, owner: list[int], dets: list[Detection]) -> dict[str, np.ndarray]:
    """Per family, (n asked, m + 1) values of asked object i's own checks if matched to dets[j]
    (column m: unmatched, all 0). A detection with neither the asked colour nor the asked shape
    cannot stand for the object: "compatible" is 0 there and so is every value."""
    n, m = len(owner), len(dets)
    out = {name: np.zeros((n, m + 1)) for name in ("compatible", "present", "colour", "shape", "size", "position")}
    for i, g in enumerate(owner):
        obj = spec.objects[g]
        for j, det in enumerate(dets):
            colour, shape = det.colour == obj.colour, det.shape == obj.shape
            if not (colour or shape):
                continue
            out["compatible"][i, j] = out["present"][i, j] = 1.0
            out["colour"][i, j], out["shape"][i, j] = float(colour), float(shape)
            if obj.size is not None:
                out["size"][i, j] = float(det.size_as(obj.shape) == obj.size)
            if obj.position is not None:
                out["position"][i, j] = _position_value(det, obj.position)
    return out


def check(spec: SceneSpec, reading: Reading) -> Verdict:
    """The checks of `spec` on an image's `reading` (see the module docstring)."""
    owner = [g for g, obj in enumerate(spec.objects) for _ in range(obj.count)]
    members = [[i for i, g in enumerate(owner) if g == k] for k in range(len(spec.objects))]
    cand = _candidates(reading)
    dets = [reading.detections[j] for j in cand]
    n, m = len(owner), len(dets)

    parts = _object_checks(spec, owner, dets)
    unary = sum(WEIGHTS[name] * parts[name] for name in ("present", "colour", "shape", "size", "position"))
    cols = np.arange(n)[None, :]
    rows = _matchings(n, m)
    rows = np.where(parts["compatible"][cols, rows] > 0, rows, -1)  # incompatible pairs stay unmatched
    total = unary[cols, rows].sum(1)
    cx, cy = np.array([d.cx for d in dets]), np.array([d.cy for d in dets])
    rel_values = []
    for r in spec.relations:
        ok = _order(r.relation, cx, cy)
        pairs = [(s, t) for s in members[r.subject] for t in members[r.target]]
        val = np.mean([ok[rows[:, s], rows[:, t]] for s, t in pairs], axis=0)
        rel_values.append(val)
        total = total + WEIGHTS["relation"] * val
    best = int(np.argmax(total))
    row = rows[best]

    checks: list[Check] = []
    for i, g in enumerate(owner):
        obj, lab = spec.objects[g], _label(spec, g, members[g].index(i))
        names = ["present", "colour", "shape"] + ["size"] * (obj.size is not None)
        names += ["position"] * (obj.position is not None)
        checks += [Check(f"{name}({lab})", WEIGHTS[name], float(parts[name][i, row[i]])) for name in names]
    for obj in spec.objects:
        if obj.count > 1:
            found = sum(d.colour == obj.colour and d.shape == obj.shape for d in dets)
            value = max(0.0, 1.0 - abs(found - obj.count) / obj.count)
            checks.append(Check(f"count({obj.count} {obj.colour} {obj.shape}s)", WEIGHTS["count"], value))
    for r, val in zip(spec.relations, rel_values):
        a, b = spec.objects[r.subject], spec.objects[r.target]
        name = f"relation({a.colour} {a.shape} {r.relation} {b.colour} {b.shape})"
        checks.append(Check(name, WEIGHTS["relation"], float(val[best])))
    matched = [dets[j] for j in row if j >= 0]
    checks += _image_checks(spec, reading, matched, n)

    score = sum(c.weight * c.value for c in checks) / sum(c.weight for c in checks)
    matching = tuple(cand[int(j)] if j >= 0 else None for j in row)
    return Verdict(float(score), tuple(checks), reading, matching)


def _image_checks(spec: SceneSpec, reading: Reading, matched: list[Detection], n: int) -> list[Check]:
    """background, no_extra, clean_colour, crisp_edges: credited per asked object found."""
    found = len(matched) / n
    out = []
    if spec.background is not None:
        value = found * float(reading.background == spec.background)
        out.append(Check(f"background({spec.background})", WEIGHTS["background"], value))
    n_extra = len(reading.detections) - len(matched)
    out.append(Check("no_extra", WEIGHTS["no_extra"], found / (1 + n_extra)))
    clean = _ramp(reading.clean_share, CLEAN_LO, CLEAN_HI)
    full = sum(_ramp(d.strength, STRENGTH_LO, STRENGTH_HI) for d in matched) / n
    out.append(Check("clean_colour", WEIGHTS["clean_colour"], clean * full))
    crisp = sum(_ramp(d.edge_width, EDGE_BLUR, EDGE_SHARP) for d in matched) / n
    out.append(Check("crisp_edges", WEIGHTS["crisp_edges"], crisp))
    return out


@functools.lru_cache(maxsize=4096)
def _parse_cached(prompt: str) -> SceneSpec:
    return parse(prompt)


def verify(spec: SceneSpec | str, image: Image.Image | np.ndarray) -> Verdict:
    """Check `image` against `spec` (a `SceneSpec` or a world prompt; a non-world prompt raises
    `WorldParseError`)."""
    if isinstance(spec, str):
        spec = _parse_cached(spec)
    return check(spec, read_image(image))


def scene_score(spec: SceneSpec | str, image: Image.Image | np.ndarray) -> float:
    """`verify(spec, image).score`."""
    return verify(spec, image).score
