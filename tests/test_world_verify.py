"""scene_score: right on ground truth, ~0 on noise, and each hand-made defect costs exactly the checks
it should (expected check values worked out by hand from the scene, not read off the verifier)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from catimage.metrics import MetricError, MetricSpec, make_scorer
from catimage.world import PlacedObject, Scene, SceneSpec, describe, parse, realize, render, sample_spec
from catimage.world.scene import BACKGROUNDS, COLOURS
from catimage.world.verify import WEIGHTS, Verdict, verify

P = PlacedObject
LEFT, MID, RIGHT = 1 / 6, 1 / 2, 5 / 6  # cell centres (canvas units)


def _scenes(seed: int, n: int) -> list[tuple[SceneSpec, Scene]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        spec = sample_spec(rng)
        out.append((spec, realize(spec, rng)))
    return out


def _failed(v: Verdict) -> dict[str, float]:
    return {c.name: round(c.value, 3) for c in v.checks if c.value < 0.999}


def _expected_score(v: Verdict, failed: dict[str, float]) -> float:
    """The score if exactly the checks in `failed` have those values and every other check is 1."""
    total = sum(c.weight for c in v.checks)
    return sum(c.weight * failed.get(c.name, 1.0) for c in v.checks) / total


# ------------------------------------------------------------------------------------ ground truth


def test_ground_truth_scores_one() -> None:
    scores = np.array([verify(spec, render(scene)).score for spec, scene in _scenes(0, 300)])
    assert scores.mean() >= 0.98
    assert scores.min() >= 0.9


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_hardest_ground_truth_scenes_score_one(background: str) -> None:
    """Four objects with relations, on each background, prompt given as text."""
    rng = np.random.default_rng(list(BACKGROUNDS).index(background))
    done = 0
    while done < 40:
        spec = sample_spec(rng, n_groups=int(rng.choice([2, 3])))
        if spec.n_objects != 4 or not spec.relations:
            continue
        spec = dataclasses.replace(spec, background=background)
        v = verify(describe(spec, rng), render(realize(spec, rng)))
        assert v.score >= 0.98, (describe(spec), _failed(v))
        done += 1


def test_ground_truth_at_other_canvas_sizes() -> None:
    spec, scene = parse("a red circle to the left of a blue square"), _pair()
    for size in (24, 64, 128):
        assert verify(spec, render(scene, size)).score >= 0.98


def test_diagonal_neighbours_touching_in_the_raster_are_two_objects() -> None:
    """Large objects in diagonal cells, jittered towards each other, meet in one half-covered pixel
    (a real realised scene): still two green squares."""
    scene = Scene((P("square", "green", 0.8288, 0.5145, 0.3), P("square", "green", 0.5143, 0.8220, 0.3)))
    arr = np.asarray(render(scene), dtype=int)
    assert arr[21, 21, 1] > 18  # the corners share a pixel
    assert verify("two green squares", render(scene)).score == 1.0


def test_small_pixel_noise_and_colour_shift_cost_little() -> None:
    """What a good generator's output differs by: a little noise, a slightly faded palette."""
    rng = np.random.default_rng(1)
    noisy, faded = [], []
    for spec, scene in _scenes(2, 60):
        arr = np.asarray(render(scene), dtype=float)
        grainy = np.clip(arr + rng.normal(0, 5, arr.shape), 0, 255).astype(np.uint8)
        noisy.append(verify(spec, Image.fromarray(grainy)).score)
        faded.append(verify(spec, Image.fromarray((arr * 0.88 + 12).astype(np.uint8))).score)
    assert np.mean(noisy) >= 0.95 and np.mean(faded) >= 0.95


# ----------------------------------------------------------------------------------------- noise


def test_noise_scores_low() -> None:
    rng = np.random.default_rng(3)
    specs = [spec for spec, _ in _scenes(4, 100)]
    uniform = [verify(s, Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))).score for s in specs]
    gauss = [
        verify(s, Image.fromarray(np.clip(rng.normal(128, 64, (32, 32, 3)), 0, 255).astype(np.uint8))).score
        for s in specs
    ]
    # low-frequency colour blotches the size of objects: the hardest noise for a segmenter
    blotches = [
        verify(s, Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC)).score
        for s in specs
    ]
    assert np.mean(uniform) <= 0.1 and np.mean(gauss) <= 0.1 and np.mean(blotches) <= 0.1


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_canvas_scores_zero(background: str) -> None:
    """Nothing drawn: no object is found, and every other check is credited only for found objects."""
    blank = Image.new("RGB", (32, 32), BACKGROUNDS[background])
    for spec, _ in _scenes(5, 30):
        spec = dataclasses.replace(spec, background=background)  # even the asked background is no credit
        assert verify(spec, blank).score == 0.0


def test_picture_of_another_spec_scores_lower() -> None:
    pairs = _scenes(6, 120)
    other = [verify(pairs[i][0], render(pairs[(i + 1) % len(pairs)][1])).score for i in range(len(pairs))]
    assert np.mean(other) < 0.6


# ------------------------------------------------------------------------- hand-made degradations


def _pair(red: str = "red", blue: str = "blue") -> Scene:
    """The ground truth of "a red circle to the left of a blue square": both large, middle row."""
    return Scene((P("circle", red, LEFT, MID, 0.3), P("square", blue, RIGHT, MID, 0.3)))


PAIR = "a red circle to the left of a blue square"


def _blob_instead_of_square() -> Image.Image:
    """The red circle, and a flat 12 x 6 px blue ellipse where the square should be."""
    image = render(Scene(_pair().objects[:1]))
    ImageDraw.Draw(image).ellipse((20, 13, 32, 19), fill=COLOURS["blue"])
    return image


CASES = {
    "ground truth": (PAIR, lambda: render(_pair()), {}),
    # the square is gone: its own three checks and the relation fail; the image-level checks are
    # credited for the half of the asked objects that was found
    "drop": (
        PAIR,
        lambda: render(Scene(_pair().objects[:1])),
        {
            "present(blue square)": 0.0,
            "colour(blue square)": 0.0,
            "shape(blue square)": 0.0,
            "relation(red circle left of blue square)": 0.0,
            "no_extra": 0.5,
            "clean_colour": 0.5,
            "crisp_edges": 0.5,
        },
    ),
    # one unasked object: no_extra = 1 / (1 + 1)
    "add": (
        PAIR,
        lambda: render(Scene(_pair().objects + (P("triangle", "green", MID, LEFT, 0.2),))),
        {"no_extra": 0.5},
    ),
    # a blue circle on the left, a red square on the right: read as right shapes in the wrong colours
    # (that reading keeps the relation; the other reading, right colours in the wrong shapes, breaks it)
    "swap colours": (
        PAIR,
        lambda: render(_pair(red="blue", blue="red")),
        {"colour(red circle)": 0.0, "colour(blue square)": 0.0},
    ),
    # blur: edges ~2.3 px wide at sigma 1.5 (> EDGE_BLUR): only crispness is lost
    "blur": (PAIR, lambda: render(_pair()).filter(ImageFilter.GaussianBlur(1.5)), {"crisp_edges": 0.0}),
    "blob": (PAIR, _blob_instead_of_square, {"shape(blue square)": 0.0}),
    "size": ("a large red circle", lambda: render(Scene((P("circle", "red", MID, MID, 0.2),))), {"size(red circle)": 0.0}),
    "size ok": ("a small red circle", lambda: render(Scene((P("circle", "red", MID, MID, 0.2),))), {}),
    "position": (
        "a red circle in the top left corner",
        lambda: render(Scene((P("circle", "red", RIGHT, RIGHT, 0.2),))),
        {"position(red circle)": 0.0},
    ),
    "position, one axis wrong": (
        "a red circle in the top left corner",
        lambda: render(Scene((P("circle", "red", RIGHT, LEFT, 0.2),))),
        {"position(red circle)": 0.5},
    ),
    "position, free axis": ("a red circle at the top", lambda: render(Scene((P("circle", "red", RIGHT, LEFT, 0.2),))), {}),
    # two of three: the third member is missing, count = 1 - 1/3, image-level checks get 2/3
    "count short": (
        "three green triangles",
        lambda: render(Scene(tuple(P("triangle", "green", x, LEFT, 0.2) for x in (LEFT, RIGHT)))),
        {
            "present(green triangle #3)": 0.0,
            "colour(green triangle #3)": 0.0,
            "shape(green triangle #3)": 0.0,
            "count(3 green triangles)": 0.667,
            "no_extra": 0.667,
            "clean_colour": 0.667,
            "crisp_edges": 0.667,
        },
    ),
    # four of three: count = 1 - 1/3, and the fourth is one extra object
    "count over": (
        "three green triangles",
        lambda: render(Scene(tuple(P("triangle", "green", x, y, 0.2) for x in (LEFT, RIGHT) for y in (LEFT, RIGHT)))),
        {"count(3 green triangles)": 0.667, "no_extra": 0.5},
    ),
    # two squares drawn overlapping merge into one 2:1 blob: one asked square is found (its colour
    # is right), neither shape is, the count finds no red square; the other square is missing
    "merged": (
        "two red squares",
        lambda: render(Scene(tuple(P("square", "red", x, MID, 0.3) for x in (MID - 0.15, MID + 0.15)))),
        {
            "shape(red square #1)": 0.0,
            "present(red square #2)": 0.0,
            "colour(red square #2)": 0.0,
            "shape(red square #2)": 0.0,
            "count(2 red squares)": 0.0,
            "no_extra": 0.5,
            "clean_colour": 0.5,
            "crisp_edges": 0.5,
        },
    ),
    "background": (
        "a red circle on a white background",
        lambda: render(Scene((P("circle", "red", MID, MID, 0.2),), "gray")),
        {"background(white)": 0.0},
    ),
    "background ok": (
        "a red circle on a white background",
        lambda: render(Scene((P("circle", "red", MID, MID, 0.2),), "white")),
        {},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_defect_costs_exactly_its_checks(case: str) -> None:
    prompt, make, failed = CASES[case]
    v = verify(prompt, make())
    assert _failed(v) == failed
    assert v.score == pytest.approx(_expected_score(v, failed), abs=2e-3)


def test_blur_lowers_crispness_step_by_step() -> None:
    """More blur, less crisp; what a prompt asks for (objects, colours, shapes, relation) stays."""
    crisp = []
    for sigma in (0.0, 0.6, 0.9, 1.2):
        image = render(_pair())
        v = verify(PAIR, image.filter(ImageFilter.GaussianBlur(sigma)) if sigma else image)
        assert all(c.value == 1.0 for c in v.checks if not c.name.startswith("crisp")), _failed(v)
        crisp.append(v.value("crisp_edges"))
    assert crisp[0] == 1.0 and all(a > b for a, b in itertools.pairwise(crisp)) and crisp[-1] < 0.3


def test_checks_list_names_weights_and_the_matching() -> None:
    v = verify(PAIR, render(_pair()))
    names = [c.name for c in v.checks]
    assert names == [
        "present(red circle)", "colour(red circle)", "shape(red circle)",
        "present(blue square)", "colour(blue square)", "shape(blue square)",
        "relation(red circle left of blue square)", "no_extra", "clean_colour", "crisp_edges",
    ]  # fmt: skip
    assert [c.weight for c in v.checks] == [WEIGHTS[n.split("(")[0]] for n in names]
    dets = v.reading.detections
    assert [(dets[j].colour, dets[j].shape) for j in v.matching] == [("red", "circle"), ("blue", "square")]
    assert v.reading.background == "black"


# ------------------------------------------------------------------------------------------ scorer


def test_scorer_matches_verify_and_ignores_batching() -> None:
    pairs = _scenes(7, 10)
    prompts = [describe(spec) for spec, _ in pairs]
    images = [render(scene) for _, scene in pairs]
    images[3] = images[3].convert("L").convert("RGB")  # a grey picture: colours lost
    expected = [verify(p, im).score for p, im in zip(prompts, images)]
    one = make_scorer("scene_score", batch_size=1).score(prompts, images)
    many = make_scorer(MetricSpec(name="scene_score", batch_size=4)).score(prompts, images)
    np.testing.assert_array_equal(one, expected)
    np.testing.assert_array_equal(many, expected)
    assert make_scorer("scene_score").name == "scene_score"


def test_scorer_rejects_prompts_outside_the_world() -> None:
    scorer = make_scorer("scene_score")
    with pytest.raises(MetricError, match="scene-world prompts only.*clip_score"):
        scorer.score(["a red circle", "a photo of a cat"], [render(_pair())] * 2)
    with pytest.raises(MetricError, match="bad params"):
        make_scorer("scene_score", model="big")
