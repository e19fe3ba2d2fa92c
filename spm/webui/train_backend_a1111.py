"""The trainer's :class:`spm.backend.Backend` on AUTOMATIC1111 1.10's loaded model (``shared.sd_model``).

A1111 model handles (``ldm.models.diffusion.ddpm.LatentDiffusion`` for SD1/SD2, sgm's ``DiffusionEngine``
extended by ``sd_models_xl.extend_sdxl`` for SDXL):

* conditioning: ``sd_model.get_learned_conditioning(texts)`` → ``[n, 77·k, d]``; SDXL → a dict with
  ``crossattn`` ``[n, 77·k, 2048]`` and ``vector`` ``[n, 2816]`` (pooled text + size embeddings);
* noise prediction: ``sd_model.apply_model(x_t, t, cond)`` with ``cond = {"c_crossattn": [ctx]}`` (SD1/SD2)
  or ``{"crossattn": ctx, "vector": vec}`` (SDXL); A1111's hijack casts ``x``/``t``/``cond`` to the UNet
  dtype and runs it under its autocast;
* schedule: ``sd_model.alphas_cumprod`` (ᾱ over the 1000 training steps), ``sd_model.parameterization``
  (``"eps"`` or ``"v"``);
* decoding: ``sd_model.decode_first_stage(z)`` → images in [-1, 1].

The UNet (``sd_model.model.diffusion_model``) is frozen by the trainer and never modified (membranes are
forward hooks).  Generation in A1111 runs under ``no_grad``, not inference mode, so nothing needs rebuilding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..backend import Conditioning, LatentSpec
from ..naming import context_dim, describe_architecture, param_device_dtype
from ..train.jobs import NoModelError


def unrecorded_conditioning(sd_model: Any):
    """``sd_model.get_learned_conditioning`` without SPM's conditioning recorder (:mod:`spm.webui.runtime`).

    A training job encodes thousands of texts (anchors, held-out probes, the synonym scan's words): recorded,
    they would fill the generation-time row registry, evict the rows of the user's prompts and make the next
    generation with a membrane encode the phrase windows of all of them."""
    glc = sd_model.get_learned_conditioning
    return getattr(glc, "_spm_original", glc)


PARAMETERIZATIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}


def split_conditioning(c: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A WebUI conditioning (a tensor, or SDXL's ``{"crossattn", "vector"}`` dict) → (context, pooled)."""
    if isinstance(c, dict):
        ctx = c.get("crossattn")
        if not isinstance(ctx, torch.Tensor):
            raise NoModelError(f"the model's conditioning has no 'crossattn' tensor (keys: {sorted(c)})")
        vec = c.get("vector")
        return ctx, vec if isinstance(vec, torch.Tensor) else None
    if isinstance(c, torch.Tensor):
        return c, None
    raise NoModelError(f"the model's conditioning is a {type(c).__name__}; expected a tensor or SDXL's dict")


def vae_downscale(first_stage: Any, default: int = 8) -> int:
    """``2 ** (levels − 1)`` of an LDM/sgm VAE encoder (``encoder.num_resolutions``); 8 when unknown."""
    n = getattr(getattr(first_stage, "encoder", None), "num_resolutions", None)
    return int(2 ** (int(n) - 1)) if isinstance(n, int) and n > 0 else default


def default_resolution(is_xl: bool, parameterization: str, ctx: int | None) -> int:
    """The native image size: SDXL 1024, SD2 768-v 768, otherwise 512."""
    if is_xl:
        return 1024
    if parameterization == "v" and ctx == 1024:
        return 768
    return 512


def _autocast():
    try:
        from modules import devices

        return devices.autocast()
    except (ImportError, AttributeError):
        import contextlib

        return contextlib.nullcontext()


class WebUITransport:
    """The trainer's transport hooks, answered by the WebUI's loaded text encoder (``self.sd_model``): shared by the
    A1111 and Forge backends."""

    sd_model: Any

    def transport_calibration(self, concepts: Sequence[str]) -> dict:
        """The ``spm_transport`` metadata the trainer stores (see :func:`spm.webui.state.training_transport_calibration`)."""
        from .state import training_transport_calibration

        return training_transport_calibration(self.sd_model, concepts)

    def transport_neighbours(self, concepts: Sequence[str]) -> dict[str, list[str]]:
        """The words the trainer erases beside each concept (see :func:`spm.webui.state.training_transport_neighbours`)."""
        from .state import training_transport_neighbours

        return training_transport_neighbours(self.sd_model, concepts)

    def transport_candidates(self, concepts: Sequence[str], k: int, null: int, seed: int) -> dict:
        """The model-synonym scan's words (see :func:`spm.webui.state.training_transport_candidates`)."""
        from .state import training_transport_candidates

        return training_transport_candidates(self.sd_model, concepts, k, null, seed)


class A1111Backend(WebUITransport):
    """:class:`spm.backend.Backend` over A1111's ``shared.sd_model`` (see the module docstring).

    Raises :class:`~spm.train.jobs.NoModelError` with the reason when the model cannot be trained against
    (no UNet, an unknown parameterization, no noise schedule, an inpainting / instruct model).
    """

    host = "a1111"

    def __init__(self, sd_model: Any):
        if sd_model is None:
            raise NoModelError("no Stable Diffusion model is loaded; choose a checkpoint first")
        unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        if not isinstance(unet, nn.Module):
            raise NoModelError(f"cannot find the UNet of the loaded model ({type(sd_model).__name__} has no "
                               "model.diffusion_model); this model type is not supported for training")
        self.sd_model = sd_model
        self.unet = unet
        param = PARAMETERIZATIONS.get(str(getattr(sd_model, "parameterization", "eps")))
        if param is None:
            raise NoModelError(f"the loaded model's parameterization {sd_model.parameterization!r} is not "
                               "supported (eps or v)")
        self.parameterization = param
        ac = getattr(sd_model, "alphas_cumprod", None)
        if ac is None:
            raise NoModelError("the loaded model has no alphas_cumprod (noise schedule); it cannot be trained against")
        self.alphas_cumprod = torch.as_tensor(ac).detach().float().cpu().clone()
        in_ch = getattr(unet, "in_channels", 4)
        if in_ch != 4:
            raise NoModelError(f"the loaded model's UNet takes {in_ch} input channels (an inpainting or instruct "
                               "model); train on the base model of the same architecture instead")
        self.device, self.dtype = param_device_dtype(unet)
        self.is_xl = bool(getattr(sd_model, "is_sdxl", False)) or hasattr(sd_model, "conditioner")
        ctx = context_dim(unet)
        self.architecture = "SDXL" if self.is_xl else describe_architecture(ctx)
        ds = vae_downscale(getattr(sd_model, "first_stage_model", None))
        self.latent = LatentSpec(4, ds, default_resolution(self.is_xl, param, ctx))

    # Backend protocol ------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> Conditioning:
        texts = list(texts)
        with torch.no_grad(), _autocast():
            c = unrecorded_conditioning(self.sd_model)(texts)
        ctx, pooled = split_conditioning(c)
        ctx = ctx.detach().clone().to(self.device)
        if pooled is not None:
            pooled = pooled.detach().clone().to(self.device)
        if self.is_xl and pooled is None:
            raise NoModelError("the SDXL model's conditioning has no 'vector'; cannot train against it")
        return Conditioning(ctx, pooled if self.is_xl else None, [])

    def cond_dict(self, cond: Conditioning) -> dict:
        ctx = cond.context.to(self.device)
        if self.is_xl:
            if cond.pooled is None:
                raise ValueError("SDXL needs the 'vector' conditioning")
            return {"crossattn": ctx, "vector": cond.pooled.to(self.device)}
        return {"c_crossattn": [ctx]}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = x_t.to(device=self.device, dtype=self.dtype)
        return self.sd_model.apply_model(x, t.to(self.device), self.cond_dict(cond))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            img = self.sd_model.decode_first_stage(latents.to(device=self.device, dtype=self.dtype))
        return ((img.float() + 1.0) / 2.0).clamp(0, 1).cpu()


__all__ = ["A1111Backend", "default_resolution", "split_conditioning", "vae_downscale"]
