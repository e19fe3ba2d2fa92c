"""Full-size SD UNet architectures for structural tests (meta device: names and shapes, no memory).

* diffusers ``UNet2DConditionModel`` with the published SD1.5, SD2.1 and SDXL-base UNet configs;
* CompVis LDM ``UNetModel`` (package ``stable-diffusion-sdkit``, the ``ldm`` code that A1111 loads for
  SD1.x/SD2.x) with the ``v1-inference.yaml`` / ``v2-inference-v.yaml`` parameters;
* SDXL's sgm tree, which no installable package provides: :func:`sgm_sdxl_transformers` builds a faithful
  module tree of its transformer parts, mirroring Stability-AI/generative-models
  ``sgm/modules/diffusionmodules/openaimodel.py`` + ``sgm/modules/attention.py`` (``SpatialTransformer``
  with ``use_linear=True``, ``BasicTransformerBlock`` with attn1/attn2/ff) under the LDM block names
  (``input_blocks.{4,5,7,8}.1``, ``middle_block.1``, ``output_blocks.{0..5}.1``) that A1111 and Forge load.
"""

from __future__ import annotations

import torch
from torch import nn

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD21 = dict(SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
DIFFUSERS_CONFIGS = {"sd1": SD15, "sd2": SD21, "sdxl": SDXL}

LDM_SD1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
LDM_SD2 = dict(LDM_SD1, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)


def diffusers_unet(arch: str, device: str = "meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**DIFFUSERS_CONFIGS[arch])


def ldm_unet(arch: str, device: str = "meta"):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device(device):
        return UNetModel(**{"sd1": LDM_SD1, "sd2": LDM_SD2}[arch])


class _Attn(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)


class _FF(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(_GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.attn1 = _Attn(dim, dim)
        self.ff = _FF(dim)
        self.attn2 = _Attn(dim, ctx)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)


class _SpatialTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, ctx: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(_Block(dim, ctx) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)


def sgm_sdxl_transformers(device: str = "meta") -> nn.Module:
    """SDXL-base in sgm/LDM naming, transformer parts only (plus ``num_res_blocks`` as sgm sets it)."""
    with torch.device(device):
        root = nn.Module()
        root.num_res_blocks = [2, 2, 2]
        inp = nn.ModuleList(nn.Sequential(nn.Identity()) for _ in range(9))
        for n, (dim, depth) in {4: (640, 2), 5: (640, 2), 7: (1280, 10), 8: (1280, 10)}.items():
            inp[n] = nn.Sequential(nn.Identity(), _SpatialTransformer(dim, depth, 2048))
        root.input_blocks = inp
        root.middle_block = nn.Sequential(nn.Identity(), _SpatialTransformer(1280, 10, 2048), nn.Identity())
        out = nn.ModuleList(nn.Sequential(nn.Identity()) for _ in range(9))
        for n in range(6):
            dim, depth = (1280, 10) if n < 3 else (640, 2)
            out[n] = nn.Sequential(nn.Identity(), _SpatialTransformer(dim, depth, 2048))
        root.output_blocks = out
    return root


def tiny_diffusers_unet(seed: int = 0, ctx: int = 32, linear_proj: bool = False):
    """A small random SD1-shaped UNet on CPU for behavioural tests (proj_in/out 1×1 conv like SD1)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=ctx, attention_head_dim=8, norm_num_groups=8, use_linear_projection=linear_proj,
    ).eval()
