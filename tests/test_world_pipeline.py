"""World generators: packing, the deterministic resumable trainer, the diffusers pipeline through the
real loading path (`make_generator` on a saved folder), and FLOP counting of world candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from catimage.generators import DiffusersSpec, make_generator
from catimage.tables.cost import count_flops
from catimage.world.models import WorldModelSpec
from catimage.world.pipeline import WorldPipeline, pack, unpack, with_coords
from catimage.world.training import PromptBank, TrainSettings, WorldTrainer, build_prompt_bank, step_generators

TINY = WorldModelSpec("tiny", (16, 32, 32), (False, True, True), cross_attention_dim=32, attention_head_dim=16)


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    from catimage.features.registry import make_embedder

    torch.set_num_threads(1)
    return build_prompt_bank(24, seed=5, embedder=make_embedder("minilm"))


@pytest.fixture(scope="module")
def settings() -> TrainSettings:
    return TrainSettings(model="small", steps=10, batch_size=4, warmup_steps=2, bank_size=24, bank_seed=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bank, settings):
    trainer = WorldTrainer(settings, bank, spec=TINY)
    for _ in range(3):
        trainer.step()
    return trainer.export(tmp_path_factory.mktemp("world") / "tiny")


def test_pack_puts_each_2x2_block_into_channels():
    image = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4)
    packed = pack(image)
    assert packed.shape == (1, 12, 2, 2)
    # channel c*4 + dy*2 + dx of packed pixel (i, j) is image pixel (2i+dy, 2j+dx) of colour c
    assert packed[0, 1 * 4 + 1 * 2 + 0, 1, 0] == image[0, 1, 3, 0]
    assert torch.equal(unpack(packed), image)


def test_coordinate_planes_run_from_minus_one_to_one():
    planes = with_coords(torch.zeros(2, 12, 4, 4))[:, 12:]
    assert planes[0, 0, 0].tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])  # x along a row
    assert planes[0, 1, :, 0].tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])  # y down a column


def test_bank_holds_training_specs_only_and_their_tokens(bank):
    from catimage.world import is_heldout, parse

    assert not any(is_heldout(s) for s in bank.specs)
    assert [parse(p) for p in bank.prompts] == bank.specs  # paraphrased, but the same scenes
    mask = np.abs(bank.tokens.astype(np.float32)).sum(-1) > 0
    assert mask[:, 0].all() and bank.tokens.dtype == np.float16 and bank.empty.shape[0] == 2  # [CLS] [SEP]


def test_step_batches_are_a_function_of_seed_and_step():
    a, b = step_generators(0, 7), step_generators(0, 7)
    assert a[0].random() == b[0].random() and torch.equal(torch.randn(3, generator=a[1]), torch.randn(3, generator=b[1]))
    assert step_generators(0, 8)[0].random() != step_generators(0, 7)[0].random()


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path, bank, settings):
    straight = WorldTrainer(settings, bank, spec=TINY)
    losses = [straight.step() for _ in range(4)]
    first = WorldTrainer(settings, bank, spec=TINY)
    first.step(), first.step()
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = WorldTrainer(settings, bank, spec=TINY)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step_index == 2
    assert [resumed.step(), resumed.step()] == losses[2:]
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_refuses_other_settings(tmp_path, bank, settings):
    trainer = WorldTrainer(settings, bank, spec=TINY)
    trainer.save_checkpoint(tmp_path / "ckpt")
    other = WorldTrainer(TrainSettings(**{**settings.__dict__, "lr": 5e-4}), bank, spec=TINY)
    with pytest.raises(ValueError, match="other settings"):
        other.load_checkpoint(tmp_path / "ckpt")


def test_exported_pipeline_loads_through_make_generator_and_is_deterministic(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "WorldPipeline"
    gen = make_generator({"model": str(exported), "steps": 2, "scheduler": "ddim", "guidance_scale": 2.0}, device="cpu")
    assert isinstance(gen.pipe, WorldPipeline) and gen.pipe.unet.dtype == torch.float32
    a = gen.generate(["a red circle", "two blue squares"], [11, 12])
    b = gen.generate(["two blue squares"], [12])
    c = gen.generate(["two blue squares"], [13])
    assert a[0].size == (32, 32)
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))  # same seed, any batch: same image
    assert not np.array_equal(np.asarray(b[0]), np.asarray(c[0]))


def test_guidance_changes_the_image_and_steps_share_the_start_noise(exported):
    one = make_generator({"model": str(exported), "steps": 1, "scheduler": "ddim", "guidance_scale": 1.0}, device="cpu")
    guided = make_generator({"model": str(exported), "steps": 1, "scheduler": "ddim", "guidance_scale": 3.0}, device="cpu")
    assert torch.equal(one.initial_latents([5]), guided.initial_latents([5]))
    assert one.latent_shape() == (12, 16, 16)
    assert not np.array_equal(np.asarray(one.generate(["a red circle"], [5])[0]),
                              np.asarray(guided.generate(["a red circle"], [5])[0]))


def test_cost_of_a_world_candidate_adds_up(exported):
    spec = lambda steps, g=2.0: DiffusersSpec(model=str(exported), steps=steps, scheduler="ddim", guidance_scale=g)
    four, eight, plain = count_flops(spec(4)), count_flops(spec(8)), count_flops(spec(4, 1.0))
    assert eight.unet_evals == 8 and eight.vae_decode == 0
    assert eight.total - four.total == pytest.approx(4 * four.unet_per_step, rel=1e-9)
    assert four.unet_per_step == pytest.approx(2 * plain.unet_per_step, rel=1e-9)  # guidance: batch of 2
    # MiniLM by hand (6 layers, d=384, ff=1536): per layer 2*T*(4d^2 + 2*d*ff) + 2*2*T^2*d, plus the
    # 384x384 pooler; the 32-token prompt, and under guidance the 2-token empty prompt.
    def bert(t: int) -> int:
        return 6 * (2 * t * (4 * 384 * 384 + 2 * 384 * 1536) + 4 * t * t * 384) + 2 * 384 * 384
    assert four.text_encoder * 1e12 == bert(32) + bert(2)
    assert plain.text_encoder * 1e12 == bert(32)


def test_warm_up_loads_the_text_encoder_with_one_unet_call_and_changes_no_drawing(exported):
    """A serving replica warms up before it reports ready: the lazily loaded text encoder loads now,
    at one UNet call (one denoising step; guidance batches both halves into that call), and the
    drawings after it are the drawings of a generator that never warmed up."""
    spec = {"model": str(exported), "steps": 2, "scheduler": "ddim", "guidance_scale": 2.0}
    warmed, cold = make_generator(spec, device="cpu"), make_generator(spec, device="cpu")
    calls = []
    warmed.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    assert warmed.pipe._text_embedder is None
    assert warmed.warm_up() == 1
    assert len(calls) == 1 and warmed.pipe._text_embedder is not None
    drawn = warmed.generate(["two blue squares"], [12])
    assert len(calls) == 3  # the drawing itself: its two steps
    assert np.array_equal(np.asarray(drawn[0]), np.asarray(cold.generate(["two blue squares"], [12])[0]))


def test_given_prompt_tokens_draw_what_the_prompts_draw_without_encoding_them(exported):
    """A router that already ran MiniLM hands its tokens over: an unguided pipeline given every
    prompt's tokens never loads its own encoder, and draws the same pictures as from the prompts; a
    guided one given some of them encodes the rest (and the empty prompt) and draws the same too."""
    from catimage.features.registry import make_embedder

    prompts, seeds = ["a red circle", "two blue squares above a green triangle"], [3, 4]
    tokens = make_embedder("minilm").encode_with_tokens(prompts)[1]  # the test's own encoder, as a router's
    for guidance, given in ((1.0, list(tokens)), (2.0, [None, tokens[1]])):
        spec = {"model": str(exported), "steps": 2, "scheduler": "ddim", "guidance_scale": guidance}
        handed, plain = make_generator(spec, device="cpu"), make_generator(spec, device="cpu")
        assert handed.text_features == make_embedder("minilm").identity()
        drawn = handed.generate(prompts, seeds, prompt_tokens=given)
        assert (handed.pipe._text_embedder is None) == (guidance == 1.0)
        for a, b in zip(drawn, plain.generate(prompts, seeds)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_prompt_tokens_of_another_width_are_refused(exported):
    gen = make_generator({"model": str(exported), "steps": 1, "scheduler": "ddim", "guidance_scale": 1.0}, device="cpu")
    with pytest.raises(ValueError, match="MiniLM features"):
        gen.generate(["a red circle"], [1], prompt_tokens=[np.zeros((4, 512), np.float32)])
