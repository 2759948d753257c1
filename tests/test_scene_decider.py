"""The scene decider: a learned stand-in for scene_score (catimage.world.decider, metric scene_decider).

Expectations come from the renderer and planted signals, never from the decider's own output: a
rendered picture of a prompt's scene is what that prompt asks for (high), a blank canvas draws
nothing asked (~0), a picture of other colours and shapes draws the wrong things (low), removing a
drawn object can only lose points; synthetic labels follow the degradation that made them; the
cascade and agreement figures are checked on hand-computed matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catimage.world import describe, is_heldout, realize, render_array, sample_specs
from catimage.world.decider import DeciderSettings, DetectorTrainer, SceneDecider, shipped_dir
from catimage.world.decider_data import AugmentConfig, SpecBank, object_label, synthesize
from catimage.world.decider_eval import agreement, cascade, cascade_curve, cost_to_match
from catimage.world.scene import BACKGROUNDS, COLOURS, SHAPES, ObjectSpec, Scene, SceneSpec

COLOURS_LIST = list(COLOURS)
NO_AUGMENT = AugmentConfig(**{k: 0.0 for k in AugmentConfig.__dataclass_fields__ if k.startswith("p_")},
                           colour_jitter=0.0, noise_max=0.0)


@pytest.fixture(scope="module")
def decider() -> SceneDecider:
    torch.set_num_threads(1)
    return SceneDecider.load(shipped_dir())


@pytest.fixture(scope="module")
def scenes() -> list[tuple[SceneSpec, np.ndarray]]:
    rng = np.random.default_rng(11)
    specs = sample_specs(rng, 40, heldout=False)
    return [(s, render_array(realize(s, rng))) for s in specs]


def _other_things(spec: SceneSpec) -> SceneSpec:
    """The same layout asking for colours the picture does not hold, each on another shape."""
    used = {o.colour for o in spec.objects}
    free = [c for c in COLOURS if c not in used]
    objects = tuple(ObjectSpec(SHAPES[(SHAPES.index(o.shape) + 1) % 3], free[i % len(free)], o.size, o.count, o.position)
                    for i, o in enumerate(spec.objects))
    return SceneSpec(objects, spec.relations, spec.background)


def test_registered_and_shipped_weights_load_offline():
    from PIL import Image

    from catimage.metrics import METRICS, MetricError, MetricSpec, make_scorer

    assert "scene_decider" in METRICS
    assert MetricSpec(name="scene_decider", batch_size=64).name == "scene_decider"
    scorer = make_scorer("scene_decider", device="cpu")
    assert scorer.name == "scene_decider"
    files = sorted(p.name for p in shipped_dir().iterdir())
    assert "decider.safetensors" in files and not any(f.endswith((".pt", ".pth", ".pkl", ".bin")) for f in files)
    assert sum(p.stat().st_size for p in shipped_dir().iterdir()) < 5e6
    from safetensors.torch import load_file

    weights = load_file(str(shipped_dir() / "decider.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    blank = Image.new("RGB", (32, 32), BACKGROUNDS["black"])
    assert scorer.score(["a red circle"], [blank]).shape == (1,)
    with pytest.raises(MetricError, match="scene-world prompts only"):
        scorer.score(["a watercolour of a lighthouse"], [blank])


def test_rendered_scene_scores_high_for_its_prompt_and_low_for_other_things(decider, scenes):
    specs, images = [s for s, _ in scenes], [im for _, im in scenes]
    right = decider.score(specs, images)
    wrong = decider.score([_other_things(s) for s in specs], images)
    assert right.mean() > 0.9 and np.median(right) > 0.95
    assert wrong.mean() < 0.3
    calibrated = decider.score(specs, images, calibrated=True)
    assert calibrated.mean() > 0.9 and decider.score([_other_things(s) for s in specs], images, calibrated=True).mean() < 0.3
    assert np.all((right >= 0) & (right <= 1)) and np.all((wrong >= 0) & (wrong <= 1))


def test_blank_canvas_scores_about_zero(decider):
    specs = [SceneSpec((ObjectSpec("circle", "red"),)), SceneSpec((ObjectSpec("square", "blue", count=2),), (), "white")]
    for name, rgb in BACKGROUNDS.items():
        blank = np.broadcast_to(np.array(rgb, np.uint8), (32, 32, 3)).copy()
        assert decider.score(specs, [blank, blank]).max() < 0.05, name
        assert decider.score(specs, [blank, blank], calibrated=True).max() < 0.05, name


def test_removing_a_drawn_object_loses_points(decider):
    rng = np.random.default_rng(5)
    specs = [s for s in sample_specs(rng, 60, heldout=False) if s.n_objects >= 2][:12]
    full, dropped = [], []
    for spec in specs:
        scene = realize(spec, rng)
        full.append(render_array(scene))
        dropped.append(render_array(Scene(scene.objects[1:], scene.background, scene.cells[1:])))
    assert np.all(decider.score(specs, dropped) < decider.score(specs, full) - 0.05)


def test_synthetic_labels_follow_the_drawing_and_its_degradation():
    rng = np.random.default_rng(3)
    spec = SceneSpec((ObjectSpec("triangle", "green", "large", 1, "top left"), ObjectSpec("circle", "purple", "small")))
    sample = synthesize(spec, rng, NO_AUGMENT)
    got = sorted(COLOURS_LIST.index(c) for c in ("green", "purple"))
    assert sorted(o.colour for o in sample.objects) == got
    tri = next(o for o in sample.objects if o.colour == COLOURS_LIST.index("green"))
    assert SHAPES[tri.shape] == "triangle" and tri.fit > 0.9 and tri.is_object and tri.purity == 1.0
    assert tri.cx < 1 / 3 and tri.box_cy < 1 / 3  # top left cell
    assert sample.background == 0 and sample.clean_share == 1.0  # black, clean paint
    # a square of known coverage: washed out below half paint it is not seen; blurred, its edge widens
    cov = np.zeros((32, 32))
    cov[10:20, 10:20] = 1.0
    paint = np.broadcast_to(np.array(COLOURS["red"], float), (32, 32, 3))
    assert object_label(cov * 0.4, paint) is None
    from scipy import ndimage

    sharp, blurred = object_label(cov, paint), object_label(ndimage.gaussian_filter(cov, 1.2), paint)
    assert SHAPES[sharp.shape] == "square" and abs(sharp.area - 100) < 1 and sharp.edge_width < 0.1
    assert blurred.edge_width > sharp.edge_width + 1.0


def test_training_runs_and_a_resumed_run_continues_exactly(tmp_path):
    settings = DeciderSettings(steps=4, batch_size=4, widths=(4, 8, 8), bank_size=20, warmup_steps=1)
    bank = SpecBank(settings.bank_size, settings.bank_seed)
    assert not any(is_heldout(s) for s in bank.specs)
    a = DetectorTrainer(settings, bank)
    losses = [a.step()["loss"] for _ in range(2)]
    assert all(np.isfinite(losses))
    a.save_checkpoint(tmp_path / "ckpt")
    a.step()
    b = DetectorTrainer(settings, bank)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.step_index == 2
    b.step()
    for (name, pa), pb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(pa, pb), name
    SceneDecider(b.net).save(tmp_path / "export")
    loaded = SceneDecider.load(tmp_path / "export")
    img = synthesize(bank.specs[0], np.random.default_rng(0), NO_AUGMENT).image
    assert loaded.score([bank.specs[0]], [img]).shape == (1,)


def test_cascade_on_a_hand_computed_matrix():
    judge = np.array([[0.5, 0.9, 1.0], [0.95, 0.2, 0.2]])
    decision = np.array([[0.6, 0.7, 0.95], [0.9, 0.1, 0.1]])
    # t = 0.8: prompt 0 draws 3 (0.6, 0.7 below), keeps draw 2 (1.0); prompt 1 stops at draw 1 (0.95)
    assert cascade(decision, judge, 0.8) == (2.0, pytest.approx(0.975))
    # t = 0.65: prompt 0 stops at draw 2 and keeps it (0.9)
    assert cascade(decision, judge, 0.65) == (1.5, pytest.approx(0.925))
    curve = cascade_curve(decision, judge, unit_cost=2.0, thresholds=np.array([0.0, 0.65, 0.8]))
    assert cost_to_match(curve, 0.725) == pytest.approx(2.0)  # the first threshold already reaches it
    assert cost_to_match(curve, 0.95) == pytest.approx(3.0 + (0.95 - 0.925) / 0.05 * 1.0)
    assert cost_to_match(curve, 0.99) is None


def test_agreement_of_a_perfect_and_a_reversed_decider():
    judge = np.array([0.1, 0.5, 0.9, 0.2, 0.8, 0.6])
    groups = np.array([0, 0, 0, 1, 1, 1])
    same = agreement(judge, judge, groups)
    assert same.rmse == 0 and same.spearman == pytest.approx(1) and same.within_spearman == pytest.approx(1)
    assert all(v == 1.0 for v in same.pass_fail.values())
    rev = agreement(1 - judge, judge, groups)
    assert rev.within_spearman == pytest.approx(-1)


def test_prompt_words_reach_the_decider_through_the_metric(decider, scenes):
    from PIL import Image

    from catimage.metrics import make_scorer

    scorer = make_scorer("scene_decider", device="cpu")
    spec, image = scenes[0]
    got = scorer.score([describe(spec)], [Image.fromarray(image)])
    assert got[0] == pytest.approx(decider.score([spec], [image])[0])
