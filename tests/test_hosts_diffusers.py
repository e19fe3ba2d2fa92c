"""The diffusers host end to end on a tiny SD1-shaped pipeline: per-prompt strengths inside a real
``StableDiffusionPipeline`` call (CFG doubles the batch: negative rows first, then prompts)."""

import pytest
import torch

from spm.hosts.diffusers import PipelineMembranes
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane


@pytest.fixture(scope="module")
def pipe(tokenizer, text_encoder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    p = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_diffusers_unet(),
                                scheduler=sched, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, prompts, negative=None):
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with torch.no_grad():
        return pipe(prompts, negative_prompt=negative, num_inference_steps=3, guidance_scale=5.0, height=8, width=8,
                    generator=gens, output_type="latent").images


def test_per_prompt_strengths_in_a_real_pipeline(pipe):
    prompts = ["a photo of a cat", "a red car on a road"]
    base = generate(pipe, prompts)
    m = random_membrane(pipe.unet, "cat", concepts=("cat",), std=0.5)
    with PipelineMembranes(pipe, [(m, 1.0)], metric="tokenuni") as pm:
        out = generate(pipe, prompts)
        s = pm.stack.current_strengths[:, 0].tolist()
    assert s == [0.0, 0.0, 1.0, 0.0]  # rows: uncond, uncond, "cat" prompt, "car" prompt
    assert torch.equal(out[1], base[1])
    assert not torch.equal(out[0], base[0])
    assert torch.equal(generate(pipe, prompts), base)  # closed: bit-identical again
    assert "encode_prompt" not in pipe.__dict__


def test_negative_prompt_rows_get_their_own_strength(pipe):
    m = random_membrane(pipe.unet, "cat", concepts=("cat",), std=0.5)
    with PipelineMembranes(pipe, [(m, 0.5)], metric="tokenuni") as pm:
        generate(pipe, ["a red car"], negative=["cat"])
        assert pm.stack.current_strengths[:, 0].tolist() == [0.5, 0.0]


def test_off_metric_applies_everywhere(pipe):
    m = random_membrane(pipe.unet, "cat", concepts=("cat",))
    with PipelineMembranes(pipe, [(m, 0.7)], metric="off") as pm:
        generate(pipe, ["a red car"])
        assert pm.stack.current_strengths[:, 0].tolist() == pytest.approx([0.7, 0.7])


def test_phrase_windows_are_not_recorded_as_rows(pipe):
    """``ngram`` encodes phrase windows and its centring bank outside the row registry, so they can never push
    a real prompt's row out of it (a registry miss would switch the membrane off for that row)."""
    m = random_membrane(pipe.unet, "m", concepts=("cat",))
    with PipelineMembranes(pipe, [(m, 1.0)], metric="ngram_tokenuni") as pm:
        generate(pipe, ["a cat on a sofa", "a dog"])
        assert len(pm.transport.phrases) > 0 and pm.transport.phrases.center is not None
        assert len(pm.transport.registry._tokens) == 4  # 2 prompts + their 2 negative rows, nothing else
