"""The toy worlds: what makes one world differ from another, as data (importable without torch).

A world is a captions module (label space and captions, under :mod:`spm.toy`), a renderer (under
``bench.toyworld``; only the builder needs it), the model configs below and an asset folder
``spm/toy/assets/<name>/`` (``base/``, ``finetune/``, ``scorer/``).  The shipped assets carry their own
``config.json`` files; these configs are what ``python -m bench.toyworld build --world NAME`` builds from.

* ``shapes`` (world 1): geometric shapes, 6 colours, 3 backgrounds, 3 textures; CLIP text encoder 64 wide x 2
  layers; UNet (64, 128) with 1x1-conv ``proj_in``/``proj_out`` (SD1.x); epsilon prediction.
* ``icons`` (world 2): pictograms (sun, moon, tree ...), 4 colours, 2 backgrounds, no textures, another caption
  grammar ("a sun, red, on a white background"); CLIP text encoder 48 wide x 3 layers; UNet (40, 80) with
  Linear ``proj_in``/``proj_out`` (SD2.x/SDXL style); v-prediction.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class World:
    name: str
    captions: str                  # module under spm.toy: the label space and captions
    renderer: str                  # module under bench.toyworld: the renders (builder side only)
    summary: str
    image_size: int
    text: dict                     # CLIPTextConfig keyword arguments
    vae: dict                      # AutoencoderKL keyword arguments
    unet: dict                     # UNet2DConditionModel keyword arguments
    scheduler: dict                # DDIMScheduler keyword arguments (the training DDPM drops set_alpha_to_one)
    env: str = ""                  # environment variable that may point the world at another asset tree
    extra: dict = field(default_factory=dict)

    @property
    def text_width(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler["prediction_type"])

    def assets(self) -> Path:
        """The world's asset tree (``base/``, ``finetune/``, ``scorer/``); ``$<env>`` overrides it."""
        override = os.environ.get(self.env) if self.env else None
        return Path(override) if override else _HERE / "assets" / self.name

    def captions_module(self):
        return importlib.import_module(f"spm.toy.{self.captions}")


def _clip_text(width: int, layers: int, heads: int) -> dict:
    return dict(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=width,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)

WORLDS: dict[str, World] = {
    "shapes": World(
        name="shapes", captions="captions", renderer="data", env="TOYWORLD_ASSETS",
        summary="geometric shapes (circle, square ...), CLIP text encoder 64x2, SD1-style UNet, epsilon prediction",
        image_size=32,
        text=_clip_text(64, 2, 4),
        vae=dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                 latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=1.0),
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  mid_block_type="UNetMidBlock2DCrossAttn",
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32, use_linear_projection=False),
        scheduler=dict(_SD_SCHEDULE, prediction_type="epsilon"),
    ),
    "icons": World(
        name="icons", captions="captions_icons", renderer="render_icons", env="TOYWORLD_ASSETS_ICONS",
        summary="pictograms (sun, moon, tree ...), CLIP text encoder 48x3, SD2-style UNet (linear projections), "
                "v-prediction",
        image_size=32,
        text=_clip_text(48, 3, 4),
        vae=dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                 latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=1.0),
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(40, 80),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  mid_block_type="UNetMidBlock2DCrossAttn",
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=48, attention_head_dim=(2, 4), norm_num_groups=8,
                  use_linear_projection=True),
        scheduler=dict(_SD_SCHEDULE, prediction_type="v_prediction"),
    ),
}


def get_world(world: "str | World | None" = None) -> World:
    """The world called ``world`` (default: ``shapes``); a :class:`World` passes through."""
    if isinstance(world, World):
        return world
    name = world or "shapes"
    w = WORLDS.get(name)
    if w is None:
        raise ValueError(f"unknown toy world {name!r}; the toy worlds: {', '.join(WORLDS)}")
    return w
