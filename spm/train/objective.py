"""The SPM objective: erase loss + Latent Anchoring, and the per-row UNet runner that counts its cost.

Erase (one target row, membrane ON, with grad)::

    L_erase = MSE(ε'(x_t, target),  ε_neu − g · (ε_pos − ε_neu))

with ``ε_pos = ε(x_t, positive)`` and ``ε_neu = ε(x_t, surrogate)`` from the frozen model (membrane OFF,
no grad).  Anchoring (N anchor rows)::

    L_anchor = MSE(ε'(x_t, anchor), ε(x_t, anchor))

Total = L_erase + λ · L_anchor.  In v-parameterised models the same formulas hold on v (the target is an
affine combination with weights summing to 1).

Cost is counted in *UNet-forward-equivalents* (UFE): every row of every UNet call counts 1, and every row
whose output is back-propagated counts 1 more (the UNet is frozen, so its backward computes only
activation gradients, about one forward's work).  :class:`CostMeter` also keeps calls and wall time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F

from ..backend import Backend, Conditioning

log = logging.getLogger("spm")
T = TypeVar("T")


def erase_target(eps_pos: torch.Tensor, eps_neu: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``ε_neu − g · (ε_pos − ε_neu)``: where the membrane should move the target's prediction."""
    return eps_neu - guidance_scale * (eps_pos - eps_neu)


@dataclass
class CostMeter:
    """UNet usage: calls, forward rows, back-propagated rows; ``ufe = rows + grad_rows``."""

    calls: int = 0
    rows: int = 0
    grad_rows: int = 0
    seconds: float = 0.0

    @property
    def ufe(self) -> int:
        return self.rows + self.grad_rows

    def add(self, rows: int, grad: bool) -> None:
        self.calls += 1
        self.rows += rows
        if grad:
            self.grad_rows += rows

    def snapshot(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "grad_rows": self.grad_rows, "ufe": self.ufe}


def run_unet(backend: Backend, stack, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
             strengths: torch.Tensor | list[float], meter: CostMeter | None, grad: bool,
             autocast: torch.dtype | None = None) -> torch.Tensor:
    """One UNet call with per-row membrane strengths ``[B]`` (0 = membrane OFF for that row).

    ``x_t`` may be ``[1, C, h, w]`` (shared by every row) or ``[B, C, h, w]``; returns float32 output.
    """
    b = len(cond)
    s = torch.as_tensor(strengths, dtype=torch.float32).reshape(b, 1)
    if x_t.shape[0] == 1 and b > 1:
        x_t = x_t.expand(b, *x_t.shape[1:])
    if t.numel() == 1 and b > 1:
        t = t.reshape(1).expand(b)
    stack.set_strengths(s)
    if meter is not None:
        meter.add(b, grad)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    dev_type = torch.device(backend.device).type
    ac = torch.autocast(dev_type, dtype=autocast) if autocast is not None else _null()
    with ctx, ac:
        out = backend.predict(x_t, t, cond)
    return out.float()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@dataclass
class AnchorWeight:
    """λ, the weight of the anchor loss.

    * ``fixed``: λ = ``la_strength`` (the reference).
    * ``off``: λ = 0.
    * ``adaptive``: dual ascent on a drift budget.  The drift is ``r = L_anchor / S``, where ``S`` is an EMA of
      ``MSE(ε_pos, ε_neu)`` — the size of the concept's own effect on the prediction, measured on the same
      x_t.  Each step ``log λ += rate · clamp(log(r_ema / budget), −1, 1)``: λ grows while anchors drift
      more than ``budget`` of that signal and shrinks while they drift less, so erasure proceeds as fast as
      the budget allows on any model, without a hand-tuned constant.  λ stays in ``[lo, hi]``.
    """

    mode: str = "adaptive"
    value: float = 1.0
    budget: float = 0.02
    rate: float = 0.05
    lo: float = 1e-2
    hi: float = 1e5
    beta: float = 0.9
    signal_ema: float | None = None
    drift_ema: float | None = None
    history: list[float] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg) -> "AnchorWeight":
        if cfg.la_mode == "fixed":
            return cls("fixed", float(cfg.la_strength))
        if cfg.la_mode == "off" or cfg.anchors == 0:
            return cls("off", 0.0)
        return cls("adaptive", 1.0, float(cfg.la_budget), float(cfg.la_rate), hi=max(float(cfg.la_strength), 1.0))

    def update(self, anchor_loss: float, signal: float) -> float:
        """Feed this step's anchor MSE and concept signal MSE; returns λ for the next step."""
        if self.mode != "adaptive":
            return self.value
        b = self.beta
        self.signal_ema = signal if self.signal_ema is None else b * self.signal_ema + (1 - b) * signal
        self.drift_ema = anchor_loss if self.drift_ema is None else b * self.drift_ema + (1 - b) * anchor_loss
        r = self.drift_ema / max(self.signal_ema, 1e-12)
        step = max(-1.0, min(1.0, math.log(max(r, 1e-12) / self.budget)))
        self.value = float(min(self.hi, max(self.lo, self.value * math.exp(self.rate * step))))
        return self.value

    @property
    def relative_drift(self) -> float | None:
        if self.drift_ema is None or not self.signal_ema:
            return None
        return self.drift_ema / self.signal_ema

    def state_dict(self) -> dict:
        return {"mode": self.mode, "value": self.value, "signal_ema": self.signal_ema, "drift_ema": self.drift_ema}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d.get("value", self.value))
        self.signal_ema = d.get("signal_ema")
        self.drift_ema = d.get("drift_ema")


@dataclass
class StepOutputs:
    loss: torch.Tensor
    erase: float
    anchor: float
    signal: float
    eps_target_on: torch.Tensor  # detached ε'(x_t, target), for advancing the latent pool
    eps_uncond_off: torch.Tensor | None  # ε(x_t, "") with the membrane off, when computed
    eps_neutral_off: torch.Tensor  # ε(x_t, surrogate) with the membrane off
    seconds: float = 0.0


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the device (or the CPU allocator) ran out of memory."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text


def in_chunks(n: int, per_call: int, call: Callable[[int, int], T]) -> list[T]:
    """``call(i, k)`` over consecutive chunks of ``range(n)`` of at most ``per_call`` items each (no-grad UNet work in
    batches); a chunk that runs out of memory (:func:`out_of_memory`: a GPU smaller than the batch, a large image) is
    retried with half as many items, down to one, and the chunks after it keep the smaller size.  Other errors raise."""
    out: list[T] = []
    per_call, i = max(1, int(per_call)), 0
    while i < n:
        k = min(per_call, n - i)
        try:
            out.append(call(i, k))
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if k == 1 or not out_of_memory(e):
                raise
            per_call = max(1, k // 2)
            log.info("SPM: out of memory with a batch of %d; retrying with %d", k, per_call)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += k
    return out


def objective_step(backend: Backend, stack, x_t: torch.Tensor, t: torch.Tensor, target: Conditioning,
                   positive: Conditioning, neutral: Conditioning, anchors: Conditioning, la_weight: float,
                   guidance_scale: float, meter: CostMeter | None, *, uncond: Conditioning | None = None,
                   reference_calls: bool = False, autocast: torch.dtype | None = None,
                   last_anchor_is_neutral: bool = False, erase_weight: float = 1.0) -> StepOutputs:
    """Losses for one x_t.  ``target/positive/neutral/uncond`` are one row each; ``anchors`` N rows.

    Fast (default): one no-grad call ``[positive, neutral, (uncond), anchors…]`` with the membrane OFF and one
    grad call ``[target, anchors…]`` with the membrane ON.
    ``last_anchor_is_neutral``: the last anchor row is the neutral prompt itself (the empty-prompt anchor when the
    surrogate is ""), so its membrane-OFF output is ε_neu and is not computed twice.
    ``reference_calls=True`` reproduces the reference's calls: positive and neutral each as a guidance-1
    CFG pair ``[uncond, prompt]``, the target likewise (with grad), then the anchors ON and OFF separately.
    ``erase_weight``: the erase term's weight in ``loss`` (0 while the trainer pauses the target alone,
    :func:`spm.train.signal.pause_parts`; the anchor term is kept).
    """
    t0 = time.perf_counter()
    n = len(anchors)
    if reference_calls:
        if uncond is None:
            raise ValueError("reference_calls needs the unconditional row")

        def cfg1(cond: Conditioning, s: float, grad: bool) -> torch.Tensor:
            out = run_unet(backend, stack, x_t, t, Conditioning.cat([uncond, cond]), [s, s], meter, grad, autocast)
            return out[:1] + 1.0 * (out[1:] - out[:1])

        eps_pos = cfg1(positive, 0.0, False)
        eps_neu = cfg1(neutral, 0.0, False)
        eps_t = cfg1(target, 1.0, True)
        if n:
            a_on = run_unet(backend, stack, x_t, t, anchors, [1.0] * n, meter, True, autocast)
            a_off = run_unet(backend, stack, x_t, t, anchors, [0.0] * n, meter, False, autocast)
        eps_unc = None
    else:
        dedupe = bool(last_anchor_is_neutral and n)
        off_anchors = anchors.rows(list(range(n - 1))) if dedupe else anchors
        rows = [positive, neutral] + ([uncond] if uncond is not None else []) + ([off_anchors] if len(off_anchors) else [])
        off = run_unet(backend, stack, x_t, t, Conditioning.cat(rows), [0.0] * sum(len(r) for r in rows), meter, False,
                       autocast)
        eps_pos, eps_neu = off[0:1], off[1:2]
        k = 2
        eps_unc = None
        if uncond is not None:
            eps_unc = off[2:3]
            k = 3
        a_off = torch.cat([off[k:], eps_neu]) if dedupe else off[k:]
        on = run_unet(backend, stack, x_t, t, Conditioning.cat([target] + ([anchors] if n else [])), [1.0] * (1 + n),
                      meter, True, autocast)
        eps_t, a_on = on[:1], on[1:]
    goal = erase_target(eps_pos, eps_neu, guidance_scale)
    erase = F.mse_loss(eps_t, goal)
    anchor = F.mse_loss(a_on, a_off) if n else torch.zeros((), device=eps_t.device)
    loss = erase_weight * erase + la_weight * anchor if la_weight > 0 else erase_weight * erase
    signal = float(F.mse_loss(eps_pos, eps_neu))
    return StepOutputs(loss, float(erase.detach()), float(anchor.detach()), signal, eps_t.detach(), eps_unc,
                       eps_neu.detach(), time.perf_counter() - t0)


def extra_erase_loss(backend: Backend, stack, x_t: torch.Tensor, t: torch.Tensor, rows: Conditioning,
                     neutral: torch.Tensor | Conditioning, guidance_scale: float, meter: CostMeter | None,
                     autocast: torch.dtype | None = None) -> torch.Tensor:
    """The erase term for other prompts on the target's ``x_t``: each row's membrane-ON prediction is pulled to its
    own erase goal ``ε_s − g · (ε(x_t, row) − ε_s)``.  ``neutral`` is ``ε_s``: the surrogate's prediction, already
    computed (``TrainConfig.neighbours``: the words its transport opens for), or one surrogate row per row, predicted
    here in the same call (``TrainConfig.contexts``: the same words around the surrogate).  One no-grad call with the
    membrane OFF (``len(rows)`` rows, twice that with surrogate rows) and one grad call with it ON."""
    n = len(rows)
    own = isinstance(neutral, Conditioning)
    off = run_unet(backend, stack, x_t, t, Conditioning.cat([rows, neutral]) if own else rows,
                   [0.0] * (2 * n if own else n), meter, False, autocast)
    on = run_unet(backend, stack, x_t, t, rows, [1.0] * n, meter, True, autocast)
    eps_s = off[n:] if own else neutral.expand_as(off)
    return F.mse_loss(on, erase_target(off[:n], eps_s, guidance_scale))


__all__ = ["AnchorWeight", "CostMeter", "StepOutputs", "erase_target", "extra_erase_loss", "objective_step", "run_unet"]
