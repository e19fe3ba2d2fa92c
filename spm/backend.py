"""The backend protocol: what the trainer and the generation helpers need from a host.

A *host* (a diffusers pipeline, A1111's ``shared.sd_model``, Forge's UNet patcher) implements
:class:`Backend`.  Everything in :mod:`spm.train` talks to the model only through it, so the same
training code runs standalone and inside the WebUI.  Nothing here imports diffusers or the WebUI.

Conventions
-----------
* Latents are ``[B, C, h, w]`` in the UNet's (scaled) latent space; ``h = H // downscale``.
* ``t`` is a ``[B]`` long tensor of *training* timesteps in ``0 .. num_train_timesteps - 1``.
* ``predict`` returns the raw model output: ε for ``parameterization == "eps"``, v for ``"v"``.
  (The erase target is an affine combination with weights summing to 1, so it is the same formula in
  both spaces; only samplers need :func:`to_eps_x0`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@dataclass
class Conditioning:
    """Text conditioning for a batch of prompts, exactly as the UNet receives it.

    ``context``: ``[B, T, d]`` cross-attention states.  ``pooled``: ``[B, p]`` extra vector (SDXL's pooled
    text embedding; ``None`` elsewhere).  ``tokens``: each row's token ids (for Facilitated Transport).
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    tokens: list[list[int] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def rows(self, idx: Sequence[int]) -> "Conditioning":
        """The rows ``idx`` (repeats allowed)."""
        ix = torch.as_tensor(list(idx), dtype=torch.long, device=self.context.device)
        toks = [self.tokens[i] if i < len(self.tokens) else None for i in idx]
        return Conditioning(self.context[ix], None if self.pooled is None else self.pooled[ix.to(self.pooled.device)], toks)

    def repeat(self, n: int) -> "Conditioning":
        return self.rows([i for i in range(len(self)) for _ in range(n)])

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (all items must agree on having ``pooled``)."""
        items = list(items)
        if not items:
            raise ValueError("nothing to concatenate")
        has_pooled = {c.pooled is not None for c in items}
        if len(has_pooled) != 1:
            raise ValueError("cannot mix conditionings with and without pooled embeddings")
        ctx = torch.cat([c.context for c in items], 0)
        pooled = torch.cat([c.pooled for c in items], 0) if items[0].pooled is not None else None  # type: ignore[misc]
        toks: list[list[int] | None] = []
        for c in items:
            toks.extend(list(c.tokens) + [None] * (len(c) - len(c.tokens)))
        return Conditioning(ctx, pooled, toks)

    def detach(self) -> "Conditioning":
        return Conditioning(self.context.detach(), None if self.pooled is None else self.pooled.detach(), list(self.tokens))


@dataclass(frozen=True)
class LatentSpec:
    """Latent geometry: ``channels``, the VAE ``downscale`` factor, the default image ``resolution`` (px)."""

    channels: int
    downscale: int
    resolution: int

    def shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        h = (height or self.resolution) // self.downscale
        w = (width or self.resolution) // self.downscale
        return (batch, self.channels, h, w)


@runtime_checkable
class Backend(Protocol):
    """What a host provides to the trainer and to generation.

    Attributes
    ----------
    unet: the UNet module the membranes attach to (diffusers or LDM naming).
    device, dtype: where and in which dtype the UNet runs.
    parameterization: ``"eps"`` or ``"v"``.
    alphas_cumprod: ``[num_train_timesteps]`` float tensor (ᾱ_t) of the training noise schedule.
    latent: the latent geometry.
    architecture: a label such as ``"SD1.x"`` (for metadata; free text).
    """

    unet: nn.Module
    device: torch.device
    dtype: torch.dtype
    parameterization: str
    alphas_cumprod: torch.Tensor
    latent: LatentSpec
    architecture: str

    def encode(self, texts: Sequence[str]) -> Conditioning:
        """Prompts → conditioning rows (no CFG duplication), on ``device``."""
        ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call: ``x_t [B, C, h, w]``, ``t [B]`` → raw model output ``[B, C, h, w]`` (ε or v)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``[B, 3, H, W]`` in ``[0, 1]`` (used for preview grids)."""
        ...


PARAMETERIZATIONS = ("eps", "v")


def num_train_timesteps(backend: Backend) -> int:
    return int(backend.alphas_cumprod.shape[0])


def _ab(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.to(like.device).long()]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def to_eps_x0(parameterization: str, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output → (ε, x̂0), in float32. ``v = √ᾱ ε − √(1−ᾱ) x0``."""
    a = _ab(alphas_cumprod, t, x_t)
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    out, x = out.float(), x_t.float()
    if parameterization == "eps":
        eps = out
        x0 = (x - s1 * eps) / sa
    elif parameterization == "v":
        x0 = sa * x - s1 * out
        eps = sa * out + s1 * x
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
    return eps, x0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: ``√ᾱ_t x0 + √(1−ᾱ_t) ε``."""
    a = _ab(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def check_backend(backend: object) -> None:
    """Raise ``TypeError`` naming what a host object lacks to be a :class:`Backend`."""
    missing = [n for n in ("unet", "device", "dtype", "parameterization", "alphas_cumprod", "latent",
                           "encode", "predict") if not hasattr(backend, n)]
    if missing:
        raise TypeError(f"{type(backend).__name__} is not an SPM backend: missing {', '.join(missing)}")
    if backend.parameterization not in PARAMETERIZATIONS:  # type: ignore[attr-defined]
        raise TypeError(f"{type(backend).__name__}.parameterization is {backend.parameterization!r}; "  # type: ignore[attr-defined]
                        f"expected one of {PARAMETERIZATIONS}")


__all__ = ["Backend", "Conditioning", "LatentSpec", "PARAMETERIZATIONS", "add_noise", "check_backend",
           "num_train_timesteps", "to_eps_x0"]
