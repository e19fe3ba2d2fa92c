"""Helpers shared by the toy world's builders (``train.py``, ``scorer.py``): logging, schedules, image tensors."""

from __future__ import annotations

import math
import time

import numpy as np
import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
    return f


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def roundtrip(vae, imgs: torch.Tensor, g: torch.Generator | None = None, bs: int = 256) -> torch.Tensor:
    out = []
    dev = next(vae.parameters()).device
    for i in range(0, imgs.shape[0], bs):
        post = vae.encode(imgs[i:i + bs].to(dev)).latent_dist
        z = post.mean if g is None else post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        out.append(vae.decode(z).sample.clamp(-1, 1).cpu())
    return torch.cat(out)
