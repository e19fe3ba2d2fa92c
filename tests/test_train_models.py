"""Tiny random diffusers pipelines (SD1 ε, SD2 v-prediction, SDXL) for trainer/backend tests, and their checks."""

from __future__ import annotations

import functools

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")



def _text_encoder(seed: int, with_projection: bool = False, width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, projection_dim=width)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16).eval()


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _quiet(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from diffusers.utils import logging as dlog

        v = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            return fn(*a, **kw)
        finally:
            dlog.set_verbosity(v)

    return wrapper


@_quiet
def tiny_sd_pipe(seed: int = 0, v_prediction: bool = False):
    """SD1-shaped (or, with ``v_prediction``, SD2-shaped: linear proj, v) pipeline, 16 px images, 8×8 latents."""
    from diffusers import StableDiffusionPipeline

    from spm.tokenizer import clip_tokenizer
    from tests.archs import tiny_diffusers_unet

    unet = tiny_diffusers_unet(seed, ctx=32, linear_proj=v_prediction)
    pipe = StableDiffusionPipeline(vae=_vae(seed), text_encoder=_text_encoder(seed), tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=_scheduler("v_prediction" if v_prediction else "epsilon"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_quiet
def tiny_sdxl_pipe(seed: int = 0):
    """SDXL-shaped pipeline: two text encoders (32 + 32 → context 64), pooled 32, text_time embedding."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from spm.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
    ).eval()
    pipe = StableDiffusionXLPipeline(vae=_vae(seed), text_encoder=_text_encoder(seed), text_encoder_2=_text_encoder(seed + 1, True),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=_scheduler(), force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_tiny_pipelines_generate(kind):
    pipe = {"sd1": tiny_sd_pipe, "sd2v": lambda: tiny_sd_pipe(v_prediction=True), "sdxl": tiny_sdxl_pipe}[kind]()
    img = pipe("a red circle", num_inference_steps=2, output_type="pt", height=16, width=16).images
    assert img.shape == (1, 3, 16, 16)
