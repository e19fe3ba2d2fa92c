"""The toy worlds' SD-shaped models: configs, builders and the pipeline loader.

Every function takes the world (``"shapes"``, world 1, by default; ``"icons"``, world 2; see
:mod:`spm.toy.worlds`).  World 1's components (all diffusers / transformers classes, as in SD1.x):

* ``CLIPTextModel``: width 64, 2 layers, 4 heads, vocab 49408 (real CLIP token ids), 77 positions.
* ``AutoencoderKL``: 32x32x3 images <-> 8x8x4 latents (3 encoder levels), scaling factor measured at build time.
* ``UNet2DConditionModel``: blocks (64, 128) at 8x8 latents, ``CrossAttnDownBlock2D`` x2, ``UNetMidBlock2DCrossAttn``,
  ``CrossAttnUpBlock2D`` x2; every ``Transformer2DModel`` has attn1, attn2, ff and 1x1-conv ``proj_in``/``proj_out``
  (``use_linear_projection=False``), exactly the SD1.x module layout that SPM targets (7 blocks x 12 modules).
* ``DDIMScheduler`` with SD's scaled-linear schedule (0.00085 -> 0.012, 1000 steps), epsilon prediction.

World 2 (``icons``) has a 48-wide, 3-layer CLIP text encoder, a (40, 80) UNet with Linear ``proj_in``/``proj_out``
(SD2.x/SDXL style) and v-prediction.  Loaded models take their architecture from the saved ``config.json`` files;
the scheduler from the world's config (checked against the saved ``scheduler_config.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .worlds import World, get_world

# TOYWORLD_ASSETS may point at another asset tree of world 1 (e.g. one made by `python -m bench.toyworld build --quick`);
# TOYWORLD_ASSETS_ICONS the same for world 2
ASSETS = Path(os.environ.get("TOYWORLD_ASSETS") or Path(__file__).resolve().parent / "assets" / "shapes")
TEXT_WIDTH = 64  # world 1's
IMAGE_SIZE = 32  # pixels, both worlds; the VAE makes 8x8x4 latents of it

SCHEDULER_KW = dict(get_world("shapes").scheduler)


def asset_root(world: str | World | None = None) -> Path:
    """A world's asset tree (world 1: :data:`ASSETS`)."""
    w = get_world(world)
    return ASSETS if w.name == "shapes" else w.assets()


def asset_dir(which: str = "base", world: str | World | None = None) -> Path:
    """Directory of the shipped assets: ``base``, ``finetune`` or ``scorer``."""
    if which not in ("base", "finetune", "scorer"):
        raise ValueError(which)
    return asset_root(world) / which


def text_config(world: str | World | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**get_world(world).text)


def build_text_encoder(world: str | World | None = None):
    from transformers import CLIPTextModel

    return CLIPTextModel(text_config(world))


def build_vae(world: str | World | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**get_world(world).vae)


def build_unet(world: str | World | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**get_world(world).unet)


def build_scheduler(world: str | World | None = None):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**get_world(world).scheduler)


def train_scheduler(world: str | World | None = None):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in get_world(world).scheduler.items() if k != "set_alpha_to_one"})


def load_components(which: str = "base", dtype: torch.dtype = torch.float32, world: str | World | None = None) -> dict:
    """Load text encoder, VAE and UNet. The fine-tune stores only its UNet and reuses the base's others."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = asset_dir("base", world)
    d = asset_dir(which, world)
    if not (base / "unet").is_dir():
        w = get_world(world)
        flag = "" if w.name == "shapes" else f" --world {w.name}"
        raise FileNotFoundError(f"toy-world assets missing under {base.parent}; run `python -m bench.toyworld build{flag}`")

    def pick(sub: str) -> Path:
        return d / sub if (d / sub).is_dir() else base / sub

    te = CLIPTextModel.from_pretrained(str(pick("text_encoder")), torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(str(pick("vae")), torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(str(pick("unet")), torch_dtype=dtype)
    for m in (te, vae, unet):
        m.eval().requires_grad_(False)
    return {"text_encoder": te, "vae": vae, "unet": unet}


def load_scheduler(world: str | World | None = None):
    """The world's DDIM scheduler; where the assets hold ``base/scheduler``, its prediction type must agree."""
    import json

    sched = build_scheduler(world)
    f = asset_dir("base", world) / "scheduler" / "scheduler_config.json"
    if f.is_file():
        saved = json.loads(f.read_text()).get("prediction_type", "epsilon")
        if saved != sched.config.prediction_type:
            raise ValueError(f"{f} says prediction_type {saved!r}, the world {get_world(world).name!r} "
                             f"{sched.config.prediction_type!r}; rebuild the assets")
    return sched


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


def load_toy_pipeline(which: str = "base", dtype: torch.dtype = torch.float32, world: str | World | None = None):
    """A diffusers ``StableDiffusionPipeline`` for a shipped toy model (``base`` or ``finetune``), DDIM scheduler."""
    c = load_components(which, dtype, world)
    return make_pipeline(c["text_encoder"], c["vae"], c["unet"], load_scheduler(world))
