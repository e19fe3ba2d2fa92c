"""The trainer's :class:`spm.backend.Backend` on Forge (the ``backend/`` era, Gradio 4.40).

Forge handles: ``sd_model`` is a ``ForgeDiffusionEngine`` (not an ``nn.Module``);
``sd_model.forge_objects.unet`` is an ``UnetPatcher`` whose ``.model`` (a ``KModel``) holds
``diffusion_model`` (LDM module paths), ``predictor`` (``prediction_type`` "epsilon"/"v_prediction",
``alphas_cumprod``) and ``computation_dtype``.  ``get_learned_conditioning`` / ``decode_first_stage`` run under
``@torch.inference_mode()``.  We call ``diffusion_model(x, t, context=…, y=…, transformer_options={})``
directly with training timesteps (``KModel.apply_model`` takes sigmas and returns x̂0).

Training needs two fixes, observed at runtime (see ``WEBUI_NOTES.md``, "Training inside the WebUI"), both
applied only inside :meth:`ForgeBackend.session` and undone at its end:

1. Forge's weights are *inference tensors*, and autograd refuses to save them for backward.  Under
   ``torch.inference_mode(False)`` every inference parameter/buffer of the UNet is replaced by a normal copy
   (``requires_grad=False``); the original tensors are put back afterwards, so the model is bit-identical
   (the very same tensor objects).  Conditionings and decoded images are cloned out of inference mode.
2. Forge's transformer block adds in place (``x += …``) after ``norm1``/``norm2``, which breaks autograd
   ("modified by an inplace operation").  Forward pre-hooks on ``norm1``/``norm2``/``norm3`` hand the norm a
   clone of its input, so the tensor autograd saved is never the one modified.

``backend.memory_management.load_model_gpu(unet_patcher)`` is called before training (and again after
encoding, which may have loaded the text encoder in its place).  Quantised UNets (GGUF, bitsandbytes
NF4/FP4: parameter subclasses) are refused with a message.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..backend import Conditioning, LatentSpec
from ..naming import context_dim, describe_architecture, param_device_dtype
from ..train.jobs import NoModelError
from .train_backend_a1111 import (
    PARAMETERIZATIONS,
    WebUITransport,
    default_resolution,
    split_conditioning,
    unrecorded_conditioning,
)

NORMS = ("norm1", "norm2", "norm3")
NOT_LOADED = ("no Stable Diffusion model is loaded yet; Forge loads it on the first generation — generate one image, "
              "then train")


def is_placeholder(sd_model: Any) -> bool:
    """True for Forge's ``modules.sd_models.FakeInitialModel``: what ``shared.sd_model`` holds until the first
    generation loads the real model (it has ``cond_stage_model = None``, ``chunk_length`` and
    ``get_prompt_lengths_on_ui`` for other extensions, and no ``forge_objects``)."""
    if sd_model is None:
        return False
    import sys

    cls = getattr(sys.modules.get("modules.sd_models"), "FakeInitialModel", None)
    if isinstance(cls, type) and isinstance(sd_model, cls):
        return True
    return type(sd_model).__name__ == "FakeInitialModel" and getattr(sd_model, "forge_objects", None) is None


def _clone_input(module: nn.Module, args: tuple):
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(),) + tuple(args[1:])
    return None


def add_norm_clone_hooks(unet: nn.Module) -> list:
    """Pre-hooks on ``norm1..3`` of every block that has all three (Forge's ``BasicTransformerBlock``)."""
    handles = []
    for mod in unet.modules():
        norms = [getattr(mod, n, None) for n in NORMS]
        if all(isinstance(n, nn.Module) for n in norms):
            handles.extend(n.register_forward_pre_hook(_clone_input) for n in norms)
    return handles


def _quantised(p: torch.Tensor) -> bool:
    return type(p) not in (nn.Parameter, torch.Tensor) or not p.is_floating_point()


@contextlib.contextmanager
def normal_tensors(module: nn.Module) -> Iterator[int]:
    """Replace inference-tensor parameters/buffers of ``module`` by normal copies; restore the originals.

    Yields how many tensors were replaced.  Must run outside inference mode (it enters
    ``inference_mode(False)`` itself).
    """
    saved: list[tuple[dict, str, torch.Tensor]] = []
    try:
        with torch.inference_mode(False):
            for mod in module.modules():
                for store in (mod._parameters, mod._buffers):
                    for name, t in list(store.items()):
                        if t is None or not t.is_inference():
                            continue
                        copy = t.detach().clone()
                        store[name] = nn.Parameter(copy, requires_grad=False) if store is mod._parameters else copy
                        saved.append((store, name, t))
        yield len(saved)
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


class ForgeBackend(WebUITransport):
    """:class:`spm.backend.Backend` over Forge's loaded model (see the module docstring)."""

    host = "forge"

    def __init__(self, sd_model: Any):
        if sd_model is None or is_placeholder(sd_model):
            raise NoModelError(NOT_LOADED)
        patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        kmodel = getattr(patcher, "model", None)
        unet = getattr(kmodel, "diffusion_model", None)
        if not isinstance(unet, nn.Module):
            raise NoModelError(f"cannot find the UNet of the loaded model ({type(sd_model).__name__}: "
                               "forge_objects.unet.model.diffusion_model); this model type is not supported")
        predictor = getattr(kmodel, "predictor", None)
        ptype = str(getattr(predictor, "prediction_type", "epsilon"))
        param = PARAMETERIZATIONS.get(ptype)
        if param is None:
            raise NoModelError(f"the loaded model predicts {ptype!r} (a flow/EDM model such as Flux or SD3); "
                               "SPM training supports SD1.x, SD2.x and SDXL (eps or v prediction)")
        ac = getattr(predictor, "alphas_cumprod", None)
        if ac is None:
            raise NoModelError("the loaded model has no alphas_cumprod (noise schedule); it cannot be trained against")
        bad = [n for n, p in unet.named_parameters() if _quantised(p)]
        if bad:
            raise NoModelError(f"the loaded UNet is quantised ({bad[0]}: {type(dict(unet.named_parameters())[bad[0]]).__name__}, "
                               "e.g. GGUF or NF4); load an fp16/bf16/fp32 checkpoint to train")
        in_ch = getattr(unet, "in_channels", 4)
        if in_ch != 4:
            raise NoModelError(f"the loaded model's UNet takes {in_ch} input channels (an inpainting model); "
                               "train on the base model instead")
        self.sd_model, self.patcher, self.kmodel, self.unet = sd_model, patcher, kmodel, unet
        self.parameterization = param
        with torch.inference_mode(False):
            self.alphas_cumprod = torch.as_tensor(ac).detach().float().cpu().clone()
        dev, _ = param_device_dtype(unet)
        load = getattr(patcher, "load_device", None)
        self.device = torch.device(load) if load is not None else dev
        self.dtype = getattr(kmodel, "computation_dtype", None) or param_device_dtype(unet)[1]
        self.is_xl = bool(getattr(sd_model, "is_sdxl", False))
        ctx = context_dim(unet)
        self.architecture = "SDXL" if self.is_xl else describe_architecture(ctx)
        vae = getattr(sd_model.forge_objects, "vae", None)
        ds = int(getattr(vae, "downscale_ratio", 8) or 8)
        self.latent = LatentSpec(4, ds, default_resolution(self.is_xl, param, ctx))
        self._active = False

    def _load(self) -> None:
        try:
            from backend import memory_management
        except ImportError:
            return
        memory_management.load_model_gpu(self.patcher)

    @contextlib.contextmanager
    def session(self) -> Iterator["ForgeBackend"]:
        """Make the UNet trainable for the duration (the two fixes of the module docstring), then restore it."""
        self._load()
        handles = add_norm_clone_hooks(self.unet)
        try:
            with torch.inference_mode(False), normal_tensors(self.unet):
                self._active = True
                yield self
        finally:
            self._active = False
            for h in handles:
                h.remove()

    # Backend protocol ------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> Conditioning:
        c = unrecorded_conditioning(self.sd_model)(list(texts))
        with torch.inference_mode(False):
            ctx, pooled = split_conditioning(c)
            ctx = ctx.detach().clone().to(self.device)
            pooled = pooled.detach().clone().to(self.device) if (pooled is not None and self.is_xl) else None
        if self.is_xl and pooled is None:
            raise NoModelError("the SDXL model's conditioning has no 'vector'; cannot train against it")
        if self._active:
            self._load()  # encoding may have moved the UNet out to make room for the text encoder
        return Conditioning(ctx, pooled, [])

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = x_t.to(device=self.device, dtype=self.dtype)
        kw: dict[str, Any] = {}
        if self.is_xl:
            kw["y"] = cond.pooled.to(device=self.device, dtype=self.dtype)
        return self.unet(x, t.to(self.device).float(), context=cond.context.to(self.device, self.dtype),
                         transformer_options={}, **kw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            img = self.sd_model.decode_first_stage(latents.to(self.device))
        with torch.inference_mode(False):
            return ((img.float() + 1.0) / 2.0).clamp(0, 1).cpu().clone()


__all__ = ["NOT_LOADED", "ForgeBackend", "add_norm_clone_hooks", "is_placeholder", "normal_tensors"]
