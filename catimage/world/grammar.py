"""Prompts of graded complexity for the scene world, and random scenes that satisfy them.

`sample_spec(rng)` draws what a prompt asks for (1-3 object groups, counts, sizes, positions,
chained relations, a background); `describe(spec, rng)` words it, with paraphrases and distractor
words when given a random generator, canonically without one; `realize(spec, rng)` draws one
concrete `Scene` that satisfies the spec (distinct grid cells, jittered centres).

Held-out scenes: `is_heldout(spec)` reserves a fixed tenth of all specs (by a hash of the spec's
canonical key) that the generators never see in training; the quality tables, the router and the
demo use only those, so every evaluation is on scenes disjoint from the generators' training data.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np

from catimage.world.scene import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_BACKGROUND,
    MAX_COUNT,
    MAX_OBJECTS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    PlacedObject,
    Relation,
    Scene,
    SceneSpec,
)

HELDOUT_MODULUS = 10  # one spec in ten is held out from generator training

# Wording. The first entry of each list is the canonical form (what `describe(spec)` uses).
COUNT_WORDS = {1: ("a", "one"), 2: ("two", "a pair of"), 3: ("three",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top": ("at the top", "near the top", "along the top"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "at the centre"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_WORDS = ("on a {} background", "against a {} background", "with a {} background")
PREFIXES = ("", "a picture of ", "an image of ", "a simple drawing of ", "draw ", "a photo showing ",
            "a minimalist illustration of ", "please render ")
SUFFIXES = ("", ", simple", ", high quality", ", flat colors", ", clean lines", ", digital art")


# --- sampling specs -------------------------------------------------------------------------------


def sample_spec(rng: np.random.Generator, n_groups: int | None = None) -> SceneSpec:
    """A random spec: 1-3 groups (distinct colour-shape pairs), counts, sizes, positions, relations.

    Single objects next to each other in the prompt are related with probability 0.6 (a chain such
    as "A left of B above C"); unrelated single objects get a position with probability 0.35. Specs
    whose constraints no grid placement satisfies are redrawn.
    """
    while True:
        spec = _draw_spec(rng, n_groups)
        if _assign_cells(spec, rng) is not None:
            return spec


def _draw_spec(rng: np.random.Generator, n_groups: int | None) -> SceneSpec:
    k = n_groups if n_groups is not None else int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    pairs = list(itertools.product(COLOURS, SHAPES))
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]
    counts = []
    for _ in range(k):
        room = MAX_OBJECTS - sum(counts) - (k - len(counts) - 1)
        c = 1 if rng.random() < 0.72 else int(rng.integers(2, MAX_COUNT + 1))
        counts.append(max(1, min(c, room)))
    relations = []
    for i in range(k - 1):
        if counts[i] == 1 and counts[i + 1] == 1 and rng.random() < 0.6:
            relations.append(Relation(i, str(rng.choice(RELATIONS)), i + 1))
    related = {r.subject for r in relations} | {r.target for r in relations}
    objects = []
    for i, ((colour, shape), count) in enumerate(zip(chosen, counts)):
        size = str(rng.choice(list(SIZES))) if rng.random() < 0.35 else None
        position = None
        if count == 1 and i not in related and rng.random() < 0.35:
            position = str(rng.choice(list(POSITIONS)))
        objects.append(ObjectSpec(shape, colour, size, count, position))
    background = str(rng.choice(list(BACKGROUNDS))) if rng.random() < 0.2 else None
    return SceneSpec(tuple(objects), tuple(relations), background)


def is_heldout(spec: SceneSpec) -> bool:
    """True for the fixed tenth of specs that no generator trains on."""
    digest = hashlib.sha1(spec.key().encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELDOUT_MODULUS == 0


def sample_specs(rng: np.random.Generator, n: int, heldout: bool, unique: bool = True) -> list[SceneSpec]:
    """`n` specs from the held-out tenth (heldout=True) or from the training nine tenths."""
    out: list[SceneSpec] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise RuntimeError(f"could only draw {len(out)} distinct specs of {n} asked")
        spec = sample_spec(rng)
        if is_heldout(spec) != heldout or (unique and spec.key() in seen):
            continue
        seen.add(spec.key())
        out.append(spec)
    return out


def heldout_prompts(n: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """`n` paraphrased prompts of distinct held-out specs (none the generators trained on).

    `exclude` lists prompts whose specs must not recur (so that two prompt sets are disjoint scenes).
    """
    from catimage.world.parse import parse

    banned = {parse(p).key() for p in exclude}
    rng = np.random.default_rng(seed)
    specs = [s for s in sample_specs(rng, n + len(banned), heldout=True) if s.key() not in banned][:n]
    return [describe(s, rng) for s in specs]


# --- wording --------------------------------------------------------------------------------------


def _pick(options: Sequence[str], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def object_phrase(obj: ObjectSpec, rng: np.random.Generator | None = None) -> str:
    words = [_pick(COUNT_WORDS[obj.count], rng)]
    if obj.size is not None:
        words.append(_pick(SIZE_WORDS[obj.size], rng))
    words += [obj.colour, obj.shape + ("s" if obj.count > 1 else "")]
    phrase = " ".join(words)
    if obj.position is not None:
        phrase += " " + _pick(POSITION_WORDS[obj.position], rng)
    return phrase


def describe(spec: SceneSpec, rng: np.random.Generator | None = None) -> str:
    """The prompt for `spec`: canonical without `rng`, a random paraphrase with distractors with it.

    Relations are only worded between neighbouring objects (i, i+1), which is what the grammar
    samples and what the parser reads back.
    """
    rel_after = {r.subject: r for r in spec.relations if r.target == r.subject + 1}
    if len(rel_after) != len(spec.relations):
        raise ValueError("describe words relations between neighbouring objects (i, i + 1) only")
    text = ""
    for i, obj in enumerate(spec.objects):
        if i > 0:
            prev = rel_after.get(i - 1)
            if prev is not None:
                text += " " + _pick(RELATION_WORDS[prev.relation], rng) + " "
            elif i == len(spec.objects) - 1:
                text += " and "
            else:
                text += ", " if rng is None or rng.random() < 0.5 else " and "
        text += object_phrase(obj, rng)
    if spec.background is not None:
        text += " " + _pick(BACKGROUND_WORDS, rng).format(spec.background)
    if rng is not None:
        text = _pick(PREFIXES, rng) + text + _pick(SUFFIXES, rng)
    return text


# --- realising specs ------------------------------------------------------------------------------

CELLS = [(r, c) for r in range(3) for c in range(3)]
JITTER = 0.015  # centre jitter within a cell, canvas units


def _fits_position(cell: tuple[int, int], position: str | None) -> bool:
    if position is None:
        return True
    row, col = POSITIONS[position]
    return (row is None or cell[0] == row) and (col is None or cell[1] == col)


def _fits_relation(a: tuple[int, int], rel: str, b: tuple[int, int]) -> bool:
    if rel == "left of":
        return a[1] < b[1]
    if rel == "right of":
        return a[1] > b[1]
    if rel == "above":
        return a[0] < b[0]
    return a[0] > b[0]  # below


def _assign_cells(spec: SceneSpec, rng: np.random.Generator) -> list[list[tuple[int, int]]] | None:
    """Distinct grid cells for every object of every group satisfying all constraints, or None.

    No two objects share an edge-adjacent cell, so drawn shapes never touch (the verifier separates
    them by connected components). Randomised backtracking: each object tries the cells in random
    order, keeping those that fit its position and its relations to the objects placed so far;
    complete, so None means the spec is unsatisfiable.
    """
    owner = [g for g, obj in enumerate(spec.objects) for _ in range(obj.count)]
    cells: list[tuple[int, int]] = []

    def ok(cell: tuple[int, int], g: int) -> bool:
        if not _fits_position(cell, spec.objects[g].position):
            return False
        if any(abs(cell[0] - c[0]) + abs(cell[1] - c[1]) <= 1 for c in cells):
            return False  # same or edge-adjacent cell: shapes would touch and merge
        for r in spec.relations:
            for k, other in enumerate(cells):
                if r.subject == g and r.target == owner[k] and not _fits_relation(cell, r.relation, other):
                    return False
                if r.target == g and r.subject == owner[k] and not _fits_relation(other, r.relation, cell):
                    return False
        return True

    def place(i: int) -> bool:
        if i == len(owner):
            return True
        for j in rng.permutation(len(CELLS)):
            if ok(CELLS[j], owner[i]):
                cells.append(CELLS[j])
                if place(i + 1):
                    return True
                cells.pop()
        return False

    if not place(0):
        return None
    groups, k = [], 0
    for obj in spec.objects:
        groups.append(cells[k : k + obj.count])
        k += obj.count
    return groups


def realize(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """One random picture of `spec`: objects in distinct cells, sizes as asked (else either size)."""
    groups = _assign_cells(spec, rng)
    if groups is None:
        raise ValueError(f"no placement on the 3x3 grid satisfies {describe(spec)!r}")
    placed, cells = [], []
    for obj, group in zip(spec.objects, groups):
        for row, col in group:
            size = obj.size if obj.size is not None else str(rng.choice(list(SIZES)))
            cx = (col + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
            cy = (row + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
            placed.append(PlacedObject(obj.shape, obj.colour, float(cx), float(cy), SIZES[size]))
            cells.append((row, col))
    return Scene(tuple(placed), spec.background or DEFAULT_BACKGROUND, tuple(cells))
