"""Where x_t comes from, and a small DDIM sampler on the backend protocol.

* :func:`ddim_timesteps` — SD's "leading" spacing with ``steps_offset = 1`` (as the reference's DDIM).
* :class:`ReferenceSchedule` — the reference: every iteration, pick ``k`` in ``1 … S−1``, denoise fresh noise
  for ``k`` DDIM steps with CFG (membrane ON on every row) → x_t at ``t = timesteps[k]``.  ``2k`` UNet rows.
* :class:`LatentPool` — ours: ``pool_size`` trajectories, each at its own DDIM step.  An iteration trains on
  one of them and then advances it by one step, reusing the outputs the objective computed anyway
  (``ε'(x_t, target)`` with the membrane ON, and ``ε(x_t, "")`` with it OFF — exactly what a transported
  membrane does at generation time, where the empty negative prompt gets strength ≈ 0).  A finished
  trajectory restarts from fresh noise (one extra CFG call).  The pool is filled once at start, batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backend import Backend, Conditioning, to_eps_x0
from .objective import CostMeter, run_unet


def ddim_timesteps(num_train: int, steps: int, offset: int = 1) -> torch.Tensor:
    """``[steps]`` descending training timesteps (leading spacing)."""
    ratio = num_train // steps
    ts = torch.arange(steps, dtype=torch.long) * ratio + offset
    return ts.clamp(max=num_train - 1).flip(0)


def ddim_step(backend: Backend, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) from ``t`` to ``t_prev`` (−1: to ᾱ_0). Float32."""
    ac = backend.alphas_cumprod.float()
    eps, x0 = to_eps_x0(backend.parameterization, out, x, t, ac)
    a_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0).cpu()], ac[0]).to(x.device)
    a_prev = a_prev.reshape(-1, *([1] * (x.ndim - 1)))
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def cfg_out(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def _shape_for(backend: Backend, resolution: int, dynamic: bool, g: torch.Generator) -> tuple[int, int, int, int]:
    if not dynamic:
        return backend.latent.shape(1, resolution, resolution)
    unit = backend.latent.downscale * 8 if resolution >= backend.latent.downscale * 32 else backend.latent.downscale
    choices = sorted({max(unit, int(round(resolution * f / unit)) * unit) for f in (0.75, 1.0, 1.25)})
    h = choices[int(torch.randint(len(choices), (1,), generator=g))]
    w = choices[int(torch.randint(len(choices), (1,), generator=g))]
    return backend.latent.shape(1, h, w)


def _noise(shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(device)


@dataclass
class XtSample:
    x_t: torch.Tensor  # [1, C, h, w] float32
    t: torch.Tensor  # [1] long
    k: int  # DDIM steps already taken from noise
    target_index: int
    slot: int = -1  # pool slot, -1 for the reference schedule


class ReferenceSchedule:
    """The reference's x_t: re-denoise fresh noise for ``k ∈ [1, S−1]`` CFG steps, membrane ON."""

    def __init__(self, backend: Backend, stack, steps: int, guidance: float, resolution: int, dynamic: bool,
                 g: torch.Generator, meter: CostMeter, autocast: torch.dtype | None = None):
        self.backend, self.stack, self.steps, self.guidance = backend, stack, steps, guidance
        self.resolution, self.dynamic, self.g, self.meter, self.autocast = resolution, dynamic, g, meter, autocast
        self.ts = ddim_timesteps(backend.alphas_cumprod.shape[0], steps)

    def draw(self, targets: Conditioning, uncond: Conditioning) -> XtSample:
        k = int(torch.randint(1, self.steps, (1,), generator=self.g))
        ti = int(torch.randint(len(targets), (1,), generator=self.g))
        x = _noise(_shape_for(self.backend, self.resolution, self.dynamic, self.g), self.g, self.backend.device)
        cond = Conditioning.cat([uncond, targets.rows([ti])])
        for i in range(k):
            t = self.ts[i:i + 1].to(x.device)
            out = run_unet(self.backend, self.stack, x, t, cond, [1.0, 1.0], self.meter, False, self.autocast)
            guided = cfg_out(out[:1], out[1:], self.guidance)
            t_prev = self.ts[i + 1:i + 2].to(x.device)
            x = ddim_step(self.backend, guided, x.float(), t, t_prev)
        return XtSample(x, self.ts[k:k + 1].to(x.device), k, ti)

    def advance(self, sample: XtSample, eps_target_on: torch.Tensor, eps_uncond_off: torch.Tensor) -> None:
        """Nothing to keep between iterations."""


class LatentPool:
    """Partially denoised latents that advance one DDIM step per use (see the module docstring)."""

    def __init__(self, backend: Backend, stack, steps: int, guidance: float, resolution: int, dynamic: bool,
                 g: torch.Generator, meter: CostMeter, size: int, autocast: torch.dtype | None = None):
        self.backend, self.stack, self.steps, self.guidance = backend, stack, steps, guidance
        self.resolution, self.dynamic, self.g, self.meter, self.autocast = resolution, dynamic, g, meter, autocast
        self.size = size
        self.ts = ddim_timesteps(backend.alphas_cumprod.shape[0], steps)
        self.x: list[torch.Tensor] = []
        self.k: list[int] = []
        self.ti: list[int] = []
        self.restarts = 0

    def _cfg_step(self, xs: torch.Tensor, ks: list[int], tis: list[int], targets: Conditioning,
                  uncond: Conditioning) -> torch.Tensor:
        """Advance a batch of same-shape latents one CFG step (membrane ON for the target rows only)."""
        b = xs.shape[0]
        t = self.ts[ks].to(xs.device)
        cond = Conditioning.cat([uncond.repeat(b), targets.rows(tis)])
        out = run_unet(self.backend, self.stack, torch.cat([xs, xs]), torch.cat([t, t]), cond, [0.0] * b + [1.0] * b,
                       self.meter, False, self.autocast)
        guided = cfg_out(out[:b], out[b:], self.guidance)
        t_prev = self.ts[[k + 1 for k in ks]].to(xs.device)
        return ddim_step(self.backend, guided, xs.float(), t, t_prev)

    def fill_goals(self) -> list[int]:
        """The DDIM step each trajectory is filled to: ``size`` of them staggered over ``k = 1 … S−1``."""
        n = self.size
        return [1 + (i * (self.steps - 1)) // n for i in range(n)]

    def fill_work(self) -> int:
        """Denoising steps (one trajectory, one step: two UNet rows) the fill takes: the unit of its progress."""
        return sum(self.fill_goals())

    def fill(self, targets: Conditioning, uncond: Conditioning,
             progress: Callable[[int, int], None] | None = None) -> None:
        """Start ``size`` trajectories staggered over ``k = 1 … S−1`` (batched per step).

        ``progress(done, total)`` is called after each batched step, counted in trajectory steps
        (:meth:`fill_work`), so its fraction follows the UNet work done."""
        n = self.size
        goal = self.fill_goals()
        total, done = sum(goal), 0
        self.ti = [int(torch.randint(len(targets), (1,), generator=self.g)) for _ in range(n)]
        self.x = [_noise(_shape_for(self.backend, self.resolution, self.dynamic, self.g), self.g, self.backend.device)
                  for _ in range(n)]
        self.k = [0] * n
        for step in range(max(goal)):
            todo = [i for i in range(n) if goal[i] > step]
            by_shape: dict[tuple, list[int]] = {}
            for i in todo:
                by_shape.setdefault(tuple(self.x[i].shape), []).append(i)
            for idx in by_shape.values():
                xs = torch.cat([self.x[i] for i in idx])
                new = self._cfg_step(xs, [step] * len(idx), [self.ti[i] for i in idx], targets, uncond)
                for j, i in enumerate(idx):
                    self.x[i] = new[j:j + 1]
                    self.k[i] = step + 1
                done += len(idx)
                if progress is not None:
                    progress(done, total)

    def draw(self, targets: Conditioning, uncond: Conditioning) -> XtSample:
        if not self.x:
            self.fill(targets, uncond)
        slot = int(torch.randint(self.size, (1,), generator=self.g))
        k = self.k[slot]
        return XtSample(self.x[slot], self.ts[k:k + 1].to(self.backend.device), k, self.ti[slot], slot)

    def advance(self, sample: XtSample, eps_target_on: torch.Tensor, eps_uncond_off: torch.Tensor,
                targets: Conditioning | None = None, uncond: Conditioning | None = None) -> None:
        """Move ``sample.slot`` one step on with the outputs the objective already computed."""
        i = sample.slot
        k = self.k[i]
        if k + 1 < self.steps:
            guided = cfg_out(eps_uncond_off, eps_target_on, self.guidance)
            t_prev = self.ts[k + 1:k + 2].to(sample.x_t.device)
            self.x[i] = ddim_step(self.backend, guided, sample.x_t.float(), sample.t, t_prev).detach()
            self.k[i] = k + 1
            return
        # finished: restart from noise and take the first step (k = 0 is never trained on, as in the reference)
        self.restarts += 1
        self.ti[i] = int(torch.randint(len(targets), (1,), generator=self.g)) if targets is not None else self.ti[i]
        x = _noise(_shape_for(self.backend, self.resolution, self.dynamic, self.g), self.g, self.backend.device)
        if targets is None or uncond is None:
            raise ValueError("restarting a trajectory needs the target and unconditional conditionings")
        self.x[i] = self._cfg_step(x, [0], [self.ti[i]], targets, uncond).detach()
        self.k[i] = 1


@torch.no_grad()
def sample_images(backend: Backend, stack, cond: Conditioning, uncond: Conditioning, strengths: list[float],
                  seeds: list[int], steps: int = 20, guidance: float = 7.5, resolution: int | None = None,
                  autocast: torch.dtype | None = None,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """DDIM-sample one image per row of ``cond`` (with its membrane strength; the negative rows get 0).

    ``seeds`` gives each row's noise seed.  Returns images ``[B, 3, H, W]`` in [0, 1] (via ``backend.decode``).
    ``progress(step, steps)`` is called after each sampling step.
    """
    b = len(cond)
    res = resolution or backend.latent.resolution
    xs = torch.cat([torch.randn(backend.latent.shape(1, res, res), generator=torch.Generator().manual_seed(int(s)))
                    for s in seeds]).to(backend.device)
    ts = ddim_timesteps(backend.alphas_cumprod.shape[0], steps)
    rows = Conditioning.cat([uncond.repeat(b), cond])
    st = [0.0] * b + list(strengths)
    for i in range(steps):
        t = ts[i].reshape(1).expand(2 * b).to(backend.device)
        out = run_unet(backend, stack, torch.cat([xs, xs]), t, rows, st, None, False, autocast)
        guided = cfg_out(out[:b], out[b:], guidance)
        t_prev = (ts[i + 1] if i + 1 < steps else torch.tensor(-1)).reshape(1).expand(b).to(backend.device)
        xs = ddim_step(backend, guided, xs.float(), t[:b], t_prev)
        if progress is not None:
            progress(i + 1, steps)
    return backend.decode(xs)


def image_grid(images: torch.Tensor, rows: int) -> "object":
    """``[N, 3, H, W]`` in [0, 1] → a PIL image with ``rows`` rows."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = (n + rows - 1) // rows
    canvas = torch.ones(3, rows * h, cols * w)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    arr = (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    return Image.fromarray(arr)


__all__ = ["LatentPool", "ReferenceSchedule", "XtSample", "cfg_out", "ddim_step", "ddim_timesteps", "image_grid",
           "sample_images"]
