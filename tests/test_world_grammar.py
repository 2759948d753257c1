"""The scene world's grammar, parser, realiser and renderer, checked against hand-made expectations
and against the geometry of the realised scenes (not against the verifier)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catimage.world import (
    ObjectSpec,
    PlacedObject,
    Relation,
    Scene,
    SceneSpec,
    WorldParseError,
    describe,
    is_heldout,
    parse,
    realize,
    render_array,
    sample_spec,
    sample_specs,
)
from catimage.world.scene import BACKGROUNDS, COLOURS, POSITIONS, SIZES

REPO = Path(__file__).resolve().parents[1]


def _specs(seed: int, n: int) -> list[SceneSpec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng) for _ in range(n)]


# ------------------------------------------------------------------------------- grammar <-> parser


def test_canonical_prompt_round_trips() -> None:
    for spec in _specs(0, 600):
        prompt = describe(spec)
        assert parse(prompt) == spec, prompt
        assert describe(parse(prompt)) == prompt  # prompt -> spec -> prompt


def test_paraphrased_prompt_round_trips() -> None:
    rng = np.random.default_rng(1)
    for spec in _specs(2, 600):
        prompt = describe(spec, rng)
        assert parse(prompt) == spec, prompt


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "there is a big blue square below a red circle",
            SceneSpec((ObjectSpec("square", "blue", "large"), ObjectSpec("circle", "red")), (Relation(0, "below", 1),)),
        ),
        ("3 green triangles", SceneSpec((ObjectSpec("triangle", "green", count=3),))),
        ("a violet circle on a grey background", SceneSpec((ObjectSpec("circle", "purple"),), background="gray")),
        ("A Red Circle.", SceneSpec((ObjectSpec("circle", "red"),))),
        (
            "one red square on top of a blue circle",
            SceneSpec((ObjectSpec("square", "red"), ObjectSpec("circle", "blue")), (Relation(0, "above", 1),)),
        ),
        (
            "a red circle, a blue square and a green triangle",
            SceneSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue"), ObjectSpec("triangle", "green"))),
        ),
        ("two tiny yellow squares at the top", SceneSpec((ObjectSpec("square", "yellow", "small", 2, "top"),))),
        (
            "a purple triangle in the upper-right corner",
            SceneSpec((ObjectSpec("triangle", "purple", position="top right"),)),
        ),
        ("blue circles", SceneSpec((ObjectSpec("circle", "blue", count=2),))),  # a bare plural: some, read as two
        (
            "a red circle on the left, above a blue square",  # a position before a relation
            SceneSpec(
                (ObjectSpec("circle", "red", position="left"), ObjectSpec("square", "blue")), (Relation(0, "above", 1),)
            ),
        ),
        (
            "a red circle below and to the left of a blue square",  # two relations between one pair
            SceneSpec(
                (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")),
                (Relation(0, "below", 1), Relation(0, "left of", 1)),
            ),
        ),
    ],
)
def test_parser_reads_prompts_written_differently(prompt: str, expected: SceneSpec) -> None:
    assert parse(prompt) == expected


@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "a red car on a white background", "circles and squares"])
def test_parser_rejects_prompts_outside_the_world(prompt: str) -> None:
    with pytest.raises(WorldParseError, match="names no object of the scene world"):
        parse(prompt)


@pytest.mark.parametrize("prompt", ["four red circles", "a blue square and 5 green triangles"])
def test_parser_rejects_counts_the_world_cannot_hold(prompt: str) -> None:
    with pytest.raises(WorldParseError, match="at most 3 of a kind"):
        parse(prompt)


# ------------------------------------------------------------------------------------ realisation


def _cell(obj: PlacedObject) -> tuple[int, int]:
    return int(obj.cy * 3), int(obj.cx * 3)


def test_realised_scenes_satisfy_their_specs_geometrically() -> None:
    rng = np.random.default_rng(3)
    for spec in _specs(4, 400):
        scene = realize(spec, rng)
        placed = list(scene.objects)
        assert len(placed) == spec.n_objects
        groups, k = [], 0
        for obj in spec.objects:
            groups.append(placed[k : k + obj.count])
            k += obj.count
        for obj, group in zip(spec.objects, groups):
            for p in group:
                assert (p.shape, p.colour) == (obj.shape, obj.colour)
                if obj.size is not None:
                    assert p.extent == SIZES[obj.size]
                assert 0 <= p.cx - p.extent / 2 and p.cx + p.extent / 2 <= 1
                assert 0 <= p.cy - p.extent / 2 and p.cy + p.extent / 2 <= 1
                if obj.position is not None:
                    row, col = POSITIONS[obj.position]
                    assert row is None or _cell(p)[0] == row
                    assert col is None or _cell(p)[1] == col
        for rel in spec.relations:
            for a in groups[rel.subject]:
                for b in groups[rel.target]:
                    ok = {
                        "left of": a.cx < b.cx,
                        "right of": a.cx > b.cx,
                        "above": a.cy < b.cy,
                        "below": a.cy > b.cy,
                    }[rel.relation]
                    assert ok, (describe(spec), rel, a, b)
        for i, a in enumerate(placed):  # never touching: no shared or edge-adjacent cell, boxes apart
            for b in placed[i + 1 :]:
                (ra, ca), (rb, cb) = _cell(a), _cell(b)
                assert abs(ra - rb) + abs(ca - cb) >= 2, (describe(spec), a, b)
                gap_x = abs(a.cx - b.cx) - (a.extent + b.extent) / 2
                gap_y = abs(a.cy - b.cy) - (a.extent + b.extent) / 2
                assert max(gap_x, gap_y) > 0, (describe(spec), a, b)
        assert scene.background == (spec.background or "black")


def test_unsatisfiable_spec_is_an_error() -> None:
    spec = SceneSpec((ObjectSpec("circle", "red", position="center"), ObjectSpec("square", "blue", position="center")))
    with pytest.raises(ValueError, match="no placement"):
        realize(spec, np.random.default_rng(0))


# ------------------------------------------------------------------------------------- held out


def test_heldout_split_is_a_tenth_and_disjoint() -> None:
    specs = {s.key(): s for s in _specs(5, 6000)}.values()
    share = np.mean([is_heldout(s) for s in specs])
    assert 0.07 < share < 0.13, share
    rng = np.random.default_rng(6)
    held, train = sample_specs(rng, 150, heldout=True), sample_specs(rng, 150, heldout=False)
    assert all(is_heldout(s) for s in held) and not any(is_heldout(s) for s in train)
    assert not {s.key() for s in held} & {s.key() for s in train}
    assert len({s.key() for s in held}) == 150


def test_heldout_split_is_stable_across_processes() -> None:
    """The split must not depend on Python's per-process string hashing (PYTHONHASHSEED)."""
    code = (
        "import numpy as np; from catimage.world import sample_spec, is_heldout; "
        "rng = np.random.default_rng(7); "
        "print(''.join('1' if is_heldout(sample_spec(rng)) else '0' for _ in range(300)))"
    )
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1 and "1" in outs.pop()


# ------------------------------------------------------------------------------------- renderer


def test_renderer_large_red_square_at_the_centre() -> None:
    """Extent 0.3: at 4x supersampling (128 px) the box is x, y in [44.8, 83.2]. PIL truncates float
    corners and fills inclusively, so sub-pixels 44..83 are red: pixels 11..20 exactly red (a 10 px
    square, 0.4 px more than 9.6), pixels 10 and 21 exactly background."""
    scene = Scene((PlacedObject("square", "red", 0.5, 0.5, 0.3),), "black")
    img = render_array(scene).astype(int)
    red, black = np.array(COLOURS["red"]), np.array(BACKGROUNDS["black"])
    assert img.shape == (32, 32, 3)
    assert (img[11:21, 11:21] == red).all()
    assert (img[:11] == black).all() and (img[21:] == black).all()
    assert (img[:, :11] == black).all() and (img[:, 21:] == black).all()
    # off-centre by a quarter pixel: the box [45.8, 84.2] -> sub-pixels 45..84, so pixel 11 is 3/4
    # red: 18 + 0.75 * (225 - 18) = 173.25 -> 173 and 18 + 0.75 * (35 - 18) = 30.75 -> 31 (the box
    # filter rounds to nearest)
    shifted = render_array(Scene((PlacedObject("square", "red", 0.5 + 1 / 128, 0.5, 0.3),), "black")).astype(int)
    assert tuple(shifted[16, 11]) == (173, 31, 31)


def test_renderer_triangle_points_up_and_circle_is_round() -> None:
    scene = Scene((PlacedObject("triangle", "green", 0.5, 0.5, 0.3),), "white")
    img = render_array(scene).astype(float)
    green = np.array(COLOURS["green"], float)
    white = np.array(BACKGROUNDS["white"], float)
    cover = 1 - np.linalg.norm(img - green, axis=2) / np.linalg.norm(white - green)
    top, bottom = cover[11:16].sum(), cover[16:21].sum()
    # an upward triangle of base b: the top half of its box holds 1/4 of its area, the bottom 3/4
    assert bottom / (top + bottom) == pytest.approx(0.75, abs=0.05)
    # PIL fills polygons inclusively: about half a sub-pixel (1/8 px) more along the perimeter
    assert cover.sum() == pytest.approx(0.5 * 9.6**2 + 9.6 * (1 + 5**0.5) / 8, rel=0.05)

    circle = render_array(Scene((PlacedObject("circle", "blue", 0.5, 0.5, 0.3),), "gray")).astype(float)
    blue, gray = np.array(COLOURS["blue"], float), np.array(BACKGROUNDS["gray"], float)
    cover = 1 - np.linalg.norm(circle - blue, axis=2) / np.linalg.norm(gray - blue)
    assert cover.sum() == pytest.approx(np.pi / 4 * 9.6**2 + np.pi * 9.6 / 8, rel=0.05)
    assert (circle[16, 16] == blue).all() and (circle[11, 11] == gray).all()  # corner of its box: empty
