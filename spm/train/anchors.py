"""Latent Anchoring: random anchor conditionings drawn directly in the text encoder's output space.

As the paper intends (and fixing the reference's ordering bug, which left two random anchors and two
copies of the empty prompt in its batch of four), each step draws ``n`` real anchors:

1. draw ``z ~ N(0, I)`` of the target embedding's shape and normalise it (over the whole ``[T, d]`` row);
2. accept it with probability ``1 − cos(target, z)`` (so samples close to the target are rarer);
3. rescale it to ``U(0.8, 1.2) · ‖target‖``.

For SDXL the pooled vector is drawn the same way against the target's pooled embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import Conditioning


def _draw(target: torch.Tensor, n: int, generator: torch.Generator, max_tries: int) -> tuple[torch.Tensor, int]:
    """``n`` accepted samples shaped like ``target`` (float32, target's device) and the number drawn."""
    flat_t = target.detach().float().reshape(1, -1).cpu()
    norm = flat_t.norm()
    out: list[torch.Tensor] = []
    drawn = 0
    while len(out) < n:
        if drawn >= max_tries:
            raise RuntimeError(f"anchor sampling accepted only {len(out)} of {n} samples in {max_tries} draws")
        z = torch.randn(flat_t.shape, generator=generator)
        drawn += 1
        z = z / z.norm()
        cos = F.cosine_similarity(z, flat_t, dim=1)[0]
        accept_p = float((1 - cos).clamp(0, 1))
        if float(torch.rand((), generator=generator)) >= accept_p:
            continue
        scale = float(torch.empty(()).uniform_(0.8, 1.2, generator=generator)) * norm
        out.append(z[0] * scale)
    return torch.stack(out).reshape(n, *target.shape).to(target.device), drawn


def sample_anchors(target: Conditioning, n: int, generator: torch.Generator, max_tries: int = 10000) -> Conditioning:
    """``n`` anchor conditionings for the one-row ``target`` (context ``[1, T, d]``, optional pooled ``[1, p]``).

    ``generator`` must be a CPU generator (anchors are drawn on CPU for reproducibility across devices).
    """
    if len(target) != 1:
        raise ValueError(f"sample_anchors expects one target row, got {len(target)}")
    if n == 0:
        return target.rows([])
    ctx, _ = _draw(target.context[0], n, generator, max_tries)
    pooled = None
    if target.pooled is not None:
        pooled, _ = _draw(target.pooled[0], n, generator, max_tries)
        pooled = pooled.to(target.pooled.dtype)
    return Conditioning(ctx.to(target.context.dtype), pooled, [None] * n)


__all__ = ["sample_anchors"]
