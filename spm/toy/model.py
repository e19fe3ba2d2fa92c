"""The toy world's SD1.x-shaped model: configs, builders and the pipeline loader.

Components (all diffusers / transformers classes, as in SD1.x):

* ``CLIPTextModel``: width 64, 2 layers, 4 heads, vocab 49408 (real CLIP token ids), 77 positions.
* ``AutoencoderKL``: 32x32x3 images <-> 8x8x4 latents (3 encoder levels), scaling factor measured at build time.
* ``UNet2DConditionModel``: blocks (64, 128) at 8x8 latents, ``CrossAttnDownBlock2D`` x2, ``UNetMidBlock2DCrossAttn``,
  ``CrossAttnUpBlock2D`` x2; every ``Transformer2DModel`` has attn1, attn2, ff and 1x1-conv ``proj_in``/``proj_out``
  (``use_linear_projection=False``), exactly the SD1.x module layout that SPM targets (7 blocks x 12 modules).
* ``DDIMScheduler`` with SD's scaled-linear schedule (0.00085 -> 0.012, 1000 steps), epsilon prediction.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# TOYWORLD_ASSETS may point at another asset tree (e.g. one made by `python -m bench.toyworld build --quick`)
ASSETS = Path(os.environ.get("TOYWORLD_ASSETS") or Path(__file__).resolve().parent / "assets" / "shapes")
TEXT_WIDTH = 64
IMAGE_SIZE = 32  # pixels; the VAE makes 8x8x4 latents of it

SCHEDULER_KW = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def asset_dir(which: str = "base") -> Path:
    """Directory of the shipped assets: ``base``, ``finetune`` or ``scorer``."""
    if which not in ("base", "finetune", "scorer"):
        raise ValueError(which)
    return ASSETS / which


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def build_text_encoder():
    from transformers import CLIPTextModel

    return CLIPTextModel(text_config())


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=32, scaling_factor=1.0,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32,
        use_linear_projection=False,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_KW)


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SCHEDULER_KW.items() if k != "set_alpha_to_one"})


def load_components(which: str = "base", dtype: torch.dtype = torch.float32) -> dict:
    """Load text encoder, VAE and UNet. The fine-tune stores only its UNet and reuses the base's others."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = asset_dir("base")
    d = asset_dir(which)
    if not (base / "unet").is_dir():
        raise FileNotFoundError(f"toy-world assets missing under {ASSETS}; run `python -m bench.toyworld build`")

    def pick(sub: str) -> Path:
        return d / sub if (d / sub).is_dir() else base / sub

    te = CLIPTextModel.from_pretrained(str(pick("text_encoder")), torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(str(pick("vae")), torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(str(pick("unet")), torch_dtype=dtype)
    for m in (te, vae, unet):
        m.eval().requires_grad_(False)
    return {"text_encoder": te, "vae": vae, "unet": unet}


def make_pipeline(text_encoder, vae, unet, scheduler=None):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    from spm.tokenizer import clip_tokenizer

    verb = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
            scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    finally:
        dlog.set_verbosity(verb)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_toy_pipeline(which: str = "base", dtype: torch.dtype = torch.float32):
    """A diffusers ``StableDiffusionPipeline`` for the shipped toy model (``base`` or ``finetune``), DDIM scheduler."""
    c = load_components(which, dtype)
    return make_pipeline(c["text_encoder"], c["vae"], c["unet"])
