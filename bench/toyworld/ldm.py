"""Single-file LDM/CompVis export of the toy base model.

The LDM <-> diffusers key mapping is *derived*, not hand-typed: we build the CompVis modules with the matching
config (``ldm.modules.diffusionmodules.openaimodel.UNetModel`` and ``...model.Encoder/Decoder`` from the
``stable-diffusion-sdkit`` package), give every tensor of their state dict a unique constant marker value, run
diffusers' own converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``) and read the bijection
off the markers.  The text encoder keys are the transformers keys under ``cond_stage_model.transformer.``, as in
SD1.x checkpoints.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


def ldm_unet_params(unet_config: dict) -> dict:
    """CompVis ``UNetModel`` kwargs equivalent to our diffusers UNet config (SD1-style, cross-attention everywhere)."""
    boc = list(unet_config["block_out_channels"])
    base = boc[0]
    mult = [c // base for c in boc]
    attn_res, ds = [], 1
    for t in unet_config["down_block_types"]:
        if t.startswith("CrossAttn"):
            attn_res.append(ds)
        ds *= 2
    heads = unet_config["attention_head_dim"]
    return dict(
        image_size=unet_config["sample_size"], in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"], model_channels=base, attention_resolutions=attn_res,
        num_res_blocks=unet_config["layers_per_block"], channel_mult=mult,
        num_heads=heads if isinstance(heads, int) else heads[0], use_spatial_transformer=True, transformer_depth=1,
        context_dim=unet_config["cross_attention_dim"], use_checkpoint=False, legacy=False,
        use_linear_in_transformer=bool(unet_config.get("use_linear_projection", False)),
    )


def ldm_vae_ddconfig(vae_config: dict) -> dict:
    boc = list(vae_config["block_out_channels"])
    return dict(
        double_z=True, z_channels=vae_config["latent_channels"], resolution=vae_config["sample_size"],
        in_channels=vae_config["in_channels"], out_ch=vae_config["out_channels"], ch=boc[0],
        ch_mult=[c // boc[0] for c in boc], num_res_blocks=vae_config["layers_per_block"], attn_resolutions=[],
        dropout=0.0,
    )


def _ldm_unet_state(unet_config: dict) -> dict[str, torch.Tensor]:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**ldm_unet_params(unet_config)).state_dict()


def _ldm_vae_state(vae_config: dict) -> dict[str, torch.Tensor]:
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    dd = ldm_vae_ddconfig(vae_config)
    z = dd["z_channels"]
    sd = {f"encoder.{k}": v for k, v in Encoder(**dd).state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in Decoder(**dd).state_dict().items()})
    q = torch.nn.Conv2d(2 * z, 2 * z, 1).state_dict()
    pq = torch.nn.Conv2d(z, z, 1).state_dict()
    sd.update({f"quant_conv.{k}": v for k, v in q.items()})
    sd.update({f"post_quant_conv.{k}": v for k, v in pq.items()})
    return sd


def _marker_map(ldm_state: dict[str, torch.Tensor], prefix: str, convert) -> dict[str, tuple[str, tuple]]:
    """Return {diffusers_key: (ldm_key, ldm_shape)} by pushing marker tensors through ``convert``."""
    keys = sorted(ldm_state)
    marked = {prefix + k: torch.full(tuple(ldm_state[k].shape), float(i + 1), dtype=torch.float64)
              for i, k in enumerate(keys)}
    conv = convert(marked)
    out: dict[str, tuple[str, tuple]] = {}
    used = set()
    for dk, t in conv.items():
        vals = torch.unique(t)
        if len(vals) != 1 or t.numel() != ldm_state[keys[int(vals[0]) - 1]].numel():
            raise RuntimeError(f"converter mixed tensors into {dk}")
        lk = keys[int(vals[0]) - 1]
        if lk in used:
            raise RuntimeError(f"{lk} mapped twice")
        used.add(lk)
        out[dk] = (prefix + lk, tuple(ldm_state[lk].shape))
    return out


@lru_cache(maxsize=4)
def _unet_map_cached(cfg_items: tuple) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = dict(cfg_items)
    return _marker_map(_ldm_unet_state(cfg), UNET_PREFIX, lambda sd: convert_ldm_unet_checkpoint(sd, cfg))


@lru_cache(maxsize=4)
def _vae_map_cached(cfg_items: tuple) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = dict(cfg_items)
    return _marker_map(_ldm_vae_state(cfg), VAE_PREFIX, lambda sd: convert_ldm_vae_checkpoint(sd, cfg))


def _freeze(cfg: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
                        if not isinstance(v, dict) and not k.startswith("_")))


def unet_key_map(unet_config: dict) -> dict[str, tuple[str, tuple]]:
    """{diffusers UNet key: (LDM key, LDM shape)}, derived through diffusers' converter."""
    return _unet_map_cached(_freeze(dict(unet_config)))


def vae_key_map(vae_config: dict) -> dict[str, tuple[str, tuple]]:
    """{diffusers VAE key: (LDM key, LDM shape)}, derived through diffusers' converter."""
    return _vae_map_cached(_freeze(dict(vae_config)))


def to_ldm_state_dict(text_encoder, vae, unet, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One LDM-keyed state dict for the three components."""
    out: dict[str, torch.Tensor] = {}
    for module, kmap in ((unet, unet_key_map(unet.config)), (vae, vae_key_map(vae.config))):
        sd = module.state_dict()
        missing = set(sd) - set(kmap)
        if missing:
            raise RuntimeError(f"no LDM key for {sorted(missing)[:5]}")
        for dk, (lk, shape) in kmap.items():
            out[lk] = sd[dk].reshape(shape).to(dtype).contiguous()
    for k, v in text_encoder.state_dict().items():
        out[TEXT_PREFIX + k] = v.to(dtype).contiguous()
    return out


def ldm_yaml(unet_config: dict, vae_config: dict, text_config) -> str:
    """An LDM-style inference config (v1-inference.yaml layout) describing the toy model's shapes."""
    import yaml

    up = ldm_unet_params(unet_config)
    up.pop("legacy")
    up["legacy"] = False
    cfg = {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
                "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt",
                "image_size": unet_config["sample_size"], "channels": unet_config["in_channels"],
                "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
                "scale_factor": float(vae_config["scaling_factor"]), "use_ema": False,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": up},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": vae_config["latent_channels"], "monitor": "val/rec_loss",
                               "ddconfig": ldm_vae_ddconfig(vae_config),
                               "lossconfig": {"target": "torch.nn.Identity"}},
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"toy_text_config": {k: getattr(text_config, k) for k in (
                        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "max_position_embeddings", "hidden_act")}},
                },
            },
        }
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def export_ldm(out: str | Path, which: str = "base") -> Path:
    """Write ``out`` (one LDM-keyed safetensors, fp16) and ``out`` with suffix ``.yaml``. Returns the yaml path."""
    from safetensors.torch import save_file

    from spm.toy.model import load_components

    out = Path(out)
    c = load_components(which)
    sd = to_ldm_state_dict(c["text_encoder"], c["vae"], c["unet"])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", "toyworld": which})
    y = out.with_suffix(".yaml")
    y.write_text(ldm_yaml(dict(c["unet"].config), dict(c["vae"].config), c["text_encoder"].config))
    return y


def from_ldm_state_dict(sd: dict[str, torch.Tensor], unet_config: dict, vae_config: dict) -> dict[str, dict]:
    """Inverse of :func:`to_ldm_state_dict` using diffusers' converters directly (a check independent of our map)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    return {
        "unet": convert_ldm_unet_checkpoint(dict(sd), dict(unet_config)),
        "vae": convert_ldm_vae_checkpoint(dict(sd), dict(vae_config)),
        "text_encoder": {k[len(TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)},
    }
