"""A random-weight SD1.5 checkpoint in the WebUI's single-file (LDM/CompVis) layout, and an offline HF cache
with the ``openai/clip-vit-large-patch14`` tokenizer and config that A1111 asks the hub for.

Usage (system python; needs the WebUI's ``repositories/stable-diffusion-stability-ai`` for the CompVis modules):
    python3 tools/realwebui/make_checkpoint.py --ldm-repo /work/webuis/a1111/repositories/stable-diffusion-stability-ai \
        --out /work/webuis/models/sd15-random.safetensors --hf-home /work/webuis/hf_home

The modules are the CompVis ones (``UNetModel``, ``Encoder``/``Decoder``) with the parameters of
``configs/v1-inference.yaml`` and transformers' ``CLIPTextModel`` with ViT-L/14's text config, so the key names
and shapes are exactly those of an SD1.5 checkpoint. Every weight matrix is re-drawn from N(0, 1/fan_in) (the
CompVis zero-initialised output layers would otherwise make the UNet output 0 and give the membranes no
gradient); biases from N(0, 0.01), norm scales from N(1, 0.01), in the text encoder's layer norms too (see redraw_norms). Saved in fp16 like the usual pruned checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION_CONFIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)
UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
# --small: the same layout and the dimensions both WebUIs detect SD1.5 by (320 model channels, context 768, 4 latent
# channels, conv proj_in, 8 heads; full CLIP-L text encoder and full VAE, whose configs Forge takes from its own
# folder), but two UNet levels of one res block each instead of four of two: about 1/10 of the UNet's work, so that a
# 64 px job fits a 2-core machine shared with other processes. A1111 reads the UNet shape from the .yaml written beside.
UNET_SMALL = dict(UNET, attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2])
VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
           num_res_blocks=2, attn_resolutions=[], dropout=0.0)
SNAPSHOT = "8d052a0f05efbaefbc9e8786ba291cfdf93e5bff"  # any 40-hex name; refs/main points at it


def redraw(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def redraw_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Trained norms have non-zero biases; with bias 0 the text encoder's output has mean ~0, and the WebUIs'
    emphasis step (z * mean_before / mean_after) turns that into NaN in Forge's fp16 text encoder."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))


def build(ldm_repo: Path, seed: int, unet_params: dict = UNET) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(ldm_repo))
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    unet = UNetModel(**unet_params)
    redraw(unet, gen)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    del unet
    vae = torch.nn.Module()
    vae.encoder = Encoder(**VAE)
    vae.decoder = Decoder(**VAE)
    vae.quant_conv = torch.nn.Conv2d(2 * VAE["z_channels"], 2 * 4, 1)
    vae.post_quant_conv = torch.nn.Conv2d(4, VAE["z_channels"], 1)
    redraw(vae, gen)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    del vae
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))  # transformers' own init (std 0.02)
    redraw_norms(text, gen)
    tsd = text.state_dict()
    tsd.setdefault("text_model.embeddings.position_ids", torch.arange(77, dtype=torch.int64)[None])
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in tsd.items()})
    # the DDPM schedule buffers an SD1.5 checkpoint carries (linear in sqrt, 0.00085 .. 0.012, 1000 steps)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    sd.update({"betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
               "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
               "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
               "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
               "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt()})
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def write_hf_cache(hf_home: Path) -> Path:
    """``openai/clip-vit-large-patch14`` in the hub cache layout: the real CLIP BPE vocabulary (spm.tokenizer) and
    the model config. No weights: A1111 builds the text encoder from the config and fills it from the checkpoint."""
    sys.path.insert(0, str(REPO_ROOT))
    from spm.tokenizer import write_tokenizer_files

    repo = hf_home / "hub" / "models--openai--clip-vit-large-patch14"
    snap = repo / "snapshots" / SNAPSHOT
    write_tokenizer_files(snap)
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
           "text_config": dict(TEXT_CONFIG, model_type="clip_text_model"),
           "vision_config": dict(VISION_CONFIG, model_type="clip_vision_model"), "torch_dtype": "float32"}
    (snap / "config.json").write_text(json.dumps(cfg, indent=1))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snap


def write_yaml(base: Path, out: Path, unet_params: dict) -> None:
    """A1111's v1-inference.yaml with the UNet parameters replaced (A1111 loads NAME.yaml beside NAME.safetensors)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(base)
    for k in ("attention_resolutions", "num_res_blocks", "channel_mult"):
        cfg.model.params.unet_config.params[k] = unet_params[k]
    OmegaConf.save(cfg, out)
    print("wrote", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ldm-repo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hf-home", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="the reduced UNet (see UNET_SMALL) and its A1111 .yaml beside")
    ap.add_argument("--no-yaml", action="store_true",
                    help="with --small, write no A1111 .yaml (Forge reads the UNet shape from the keys); then --ldm-repo "
                         "may be any checkout of Stability-AI/stablediffusion, not A1111's repositories/ folder")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("tokenizer cache:", write_hf_cache(a.hf_home))
    unet_params = UNET_SMALL if a.small else UNET
    a.out.parent.mkdir(parents=True, exist_ok=True)  # the .yaml below is written first
    # also when the checkpoint exists: one made for Forge with --no-yaml serves A1111 once its .yaml is beside it
    if a.small and not a.no_yaml and not a.out.with_suffix(".yaml").exists():
        write_yaml(a.ldm_repo.parent.parent / "configs" / "v1-inference.yaml", a.out.with_suffix(".yaml"), unet_params)
    if a.out.exists():
        print("checkpoint exists:", a.out)
        return
    from safetensors.torch import save_file

    sd = build(a.ldm_repo, a.seed, unet_params)
    tmp = a.out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "note": "random weights, SD1.5 layout, for WebUI smoke runs"})
    os.replace(tmp, a.out)
    os.chmod(a.out, 0o644)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {a.out}: {len(sd)} tensors, {n / 1e6:.0f} M values")


if __name__ == "__main__":
    main()
