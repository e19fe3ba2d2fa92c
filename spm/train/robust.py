"""Robust training: erase adversarial text embeddings found against the membrane while it trains.

In the spirit of AdvUnlearn's and Receler's adversarial prompt learning, with ``TrainConfig.robust="embedding"``:

* **search** — every ``K`` steps (``K`` = the erasure signal's check interval, ``ceil(iterations / signal_checks)``:
  the budget split into as many rounds as it is checked in; the first search comes half an interval in, once the
  membrane has started to erase), an adversarial conditioning is searched against the *current* membrane: a
  perturbation ``δ`` of the target's conditioning (the text encoder's output, the rows the cross-attention
  membranes read) that makes the membrane-ON model predict what the frozen model predicts for the target,
  ``min_δ ‖ε'(x_t, c_target + δ) − ε(x_t, positive)‖²`` — the concept coming back through the membrane.
  ``SEARCH_STEPS`` steps of L2 projected gradient descent (step ``2.5 ρ / steps``), warm-started from the
  target's latest adversary (the best iterate is kept), so the attacker grows with the membrane over the run.
* **radius** — ``‖δ‖ ≤ ρ`` with ``ρ = ½ ‖c_target − c_surrogate‖`` (whole rows): measured on the model in hand,
  an adversary stays nearer the target than the surrogate, so erasing it never pulls the surrogate (what the
  target should become) or the unconditional row along. Latent Anchoring's anchors (random rows at the
  target's norm, about ``√2 ‖c_target‖`` away) are untouched and still anchored as before.
* **erase** — each target keeps a bank of its last ``BANK`` adversaries; every step one of the drawn target's
  adversaries is an extra positive of the erase loss, with the same goal as the target
  (``ε_neu − g · (ε_pos − ε_neu)``, the surrogate as before): one extra membrane-OFF row (``ε_pos``) and one
  back-propagated membrane-ON row per step.

* **stop** — "erased" includes the adversaries: each erasure check also measures every banked adversary with the
  membrane ON on its target's probe rows, as the model synonyms are measured
  (:meth:`~spm.train.signal.ErasureProbe.measure_words`), and the least of them is a part of the check
  (``signal_parts["adversaries"]``; the least part decides), so a robust run does not stop while the adversaries
  it has found still draw the target.

The bank, the search generator and the counters are resumable state (saved in the ``.trainstate``); a summary
is stored as ``spm_training.robust_stats``. Everything here talks to the model through the :class:`~spm.backend.Backend`
rows only, so it runs on every host the trainer runs on (diffusers, A1111, Forge; SDXL's pooled row is kept).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backend import Conditioning
from .config import ROBUST_MODES as MODES
from .objective import CostMeter, erase_target, run_unet
from .signal import check_interval

SEARCH_STEPS = 8  # PGD steps per search (the attack's budget, as AdvUnlearn's attack steps; capped at K)
BANK = 4  # adversaries kept per target (older ones are superseded by the warm-started search)


def search_interval(iterations: int, checks: int) -> int:
    """Steps between adversary searches: the erasure signal's check interval (the budget split into rounds)."""
    return check_interval(iterations, checks)


def is_search_step(step: int, interval: int) -> bool:
    """Searches come half an interval into each round (0-based ``step``): the first once the membrane erases."""
    return step % interval == interval // 2


class _Tee:
    """Counts UNet rows in two meters."""

    def __init__(self, *meters: CostMeter | None):
        self.meters = [m for m in meters if m is not None]

    def add(self, rows: int, grad: bool) -> None:
        for m in self.meters:
            m.add(rows, grad)


@dataclass
class RobustTraining:
    """The adversarial side of one training run (see the module docstring)."""

    targets: Conditioning  # the targets' rows (one per target)
    neutral: Conditioning  # the surrogate's row
    iterations: int
    checks: int
    guidance_scale: float
    seed: int = 0
    autocast: torch.dtype | None = None
    parent: CostMeter | None = None  # the trainer's meter: the extra rows count in the run's cost too
    meter: CostMeter = field(default_factory=CostMeter)  # the extra rows alone
    bank: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # target index -> deltas [1, T, d] (CPU)
    searches: int = 0
    rows: int = 0  # extra erase rows trained on
    seconds: float = 0.0
    last_attack_loss: float | None = None
    last_gain: float | None = None  # how much the latest search lowered the attack loss (relative)

    def __post_init__(self) -> None:
        self.interval = search_interval(self.iterations, self.checks)
        self.steps = max(1, min(SEARCH_STEPS, self.interval))
        diff = (self.targets.context.float() - self.neutral.context.float()).flatten(1).norm(dim=1)
        self.radius = [0.5 * float(d) for d in diff]
        self.generator = torch.Generator().manual_seed(int(self.seed) + 7919)  # its own: the anchors' draws stay as they were
        self.tee = _Tee(self.meter, self.parent)

    # --- the search -------------------------------------------------------------------------------------------
    def _row(self, ti: int, delta: torch.Tensor) -> Conditioning:
        base = self.targets.rows([ti])
        return Conditioning(base.context + delta.to(base.context.device, base.context.dtype), base.pooled, [None])

    def _project(self, delta: torch.Tensor, ti: int) -> torch.Tensor:
        n = float(delta.norm())
        r = self.radius[ti]
        return delta * (r / n) if n > r else delta

    def search(self, backend, stack, x_t: torch.Tensor, t: torch.Tensor, ti: int, eps_pos: torch.Tensor) -> torch.Tensor:
        """One PGD search for target ``ti`` on this ``x_t``; returns the new delta (also banked)."""
        t0 = time.perf_counter()
        shape = self.targets.context.shape[1:]
        prev = self.bank.get(ti)
        if prev:
            delta = prev[-1].clone()
        else:  # a random start inside the ball
            d = torch.randn((1, *shape), generator=self.generator)
            delta = d * (self.radius[ti] * float(torch.rand((), generator=self.generator)) / float(d.norm()))
        dev = self.targets.context.device
        delta = delta.to(dev, torch.float32)
        alpha = 2.5 * self.radius[ti] / self.steps
        first, best, best_loss = None, delta, float("inf")
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                out = run_unet(backend, stack, x_t, t, self._row(ti, delta), [1.0], self.tee, True, self.autocast)
                loss = F.mse_loss(out, eps_pos)
                (g,) = torch.autograd.grad(loss, [delta])
            lo = float(loss.detach())
            first = lo if first is None else first
            with torch.no_grad():
                if lo < best_loss:  # the best iterate is kept (a step may overshoot)
                    best, best_loss = delta.detach().clone(), lo
                gn = float(g.norm())
                delta = delta.detach() - (alpha / gn) * g if gn > 0 else delta.detach()
                delta = self._project(delta, ti)
        with torch.no_grad():
            out = run_unet(backend, stack, x_t, t, self._row(ti, delta), [1.0], self.tee, False, self.autocast)
            lo = float(F.mse_loss(out, eps_pos))
        if lo < best_loss:
            best, best_loss = delta, lo
        delta = best
        self.last_attack_loss = best_loss
        self.last_gain = (first - best_loss) / first if first else 0.0
        bank = self.bank.setdefault(ti, [])
        bank.append(delta.detach().cpu())
        del bank[:-BANK]
        self.searches += 1
        self.seconds += time.perf_counter() - t0
        return delta

    # --- the extra erase rows ---------------------------------------------------------------------------------
    def loss(self, backend, stack, step: int, x_t: torch.Tensor, t: torch.Tensor, ti: int, positive: Conditioning,
             eps_neutral_off: torch.Tensor, erase: bool = True) -> torch.Tensor | None:
        """This step's adversarial erase loss (searching first when due), or None while the bank is empty or
        ``erase`` is False (the adversaries pass the latest check: the search still runs when due, no erase row).
        Call after the objective's forward and before its backward; add the result to its loss."""
        t0 = time.perf_counter()
        due = is_search_step(step, self.interval)
        if not due and (not erase or not self.bank.get(ti)):
            return None
        eps_pos = run_unet(backend, stack, x_t, t, positive, [0.0], self.tee, False, self.autocast)
        if due:
            self.seconds += time.perf_counter() - t0
            self.search(backend, stack, x_t, t, ti, eps_pos)  # counts its own time
            if not erase:
                return None
            t0 = time.perf_counter()
        bank = self.bank[ti]
        k = int(torch.randint(len(bank), (1,), generator=self.generator)) if len(bank) > 1 else 0
        out = run_unet(backend, stack, x_t, t, self._row(ti, bank[k]), [1.0], self.tee, True, self.autocast)
        goal = erase_target(eps_pos, eps_neutral_off, self.guidance_scale)
        self.rows += 1
        self.seconds += time.perf_counter() - t0
        return F.mse_loss(out, goal)

    # --- state and metadata -----------------------------------------------------------------------------------
    def closure(self, probe) -> float | None:
        """The least share of its target's gap that a banked adversary closes with the membrane ON, on the target's
        probe rows (:meth:`~spm.train.signal.ErasureProbe.measure_words`, as the model synonyms are measured); None
        before the first search."""
        from .synonyms import probe_rows

        closed = [c for ti, deltas in sorted(self.bank.items()) if deltas
                  for c in probe.measure_words(probe_rows(probe, ti), Conditioning.cat([self._row(ti, d) for d in deltas]))]
        return min(closed) if closed else None

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON part, tensors) for the ``.trainstate``."""
        tensors = {"robust.rng": self.generator.get_state()}
        for ti, deltas in self.bank.items():
            for j, d in enumerate(deltas):
                tensors[f"robust.bank.{ti}.{j}"] = d.contiguous()
        meta = {"searches": self.searches, "rows": self.rows, "seconds": self.seconds,
                "last_attack_loss": self.last_attack_loss, "last_gain": self.last_gain, "calls": self.meter.calls,
                "unet_rows": self.meter.rows, "grad_rows": self.meter.grad_rows}
        return meta, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.searches = int(meta.get("searches", 0))
        self.rows = int(meta.get("rows", 0))
        self.seconds = float(meta.get("seconds", 0.0))
        self.last_attack_loss, self.last_gain = meta.get("last_attack_loss"), meta.get("last_gain")
        self.meter.calls, self.meter.grad_rows = int(meta.get("calls", 0)), int(meta.get("grad_rows", 0))
        self.meter.rows = int(meta.get("unet_rows", 0))
        bank: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for key, v in tensors.items():
            if key == "robust.rng":
                self.generator.set_state(v)
            elif key.startswith("robust.bank."):
                _, _, ti, j = key.split(".")
                bank.setdefault(int(ti), []).append((int(j), v))
        self.bank = {ti: [v for _, v in sorted(items, key=lambda x: x[0])] for ti, items in bank.items()}

    def summary(self) -> dict:
        """What ``spm_training.robust_stats`` records."""
        return {"mode": "embedding", "search_interval": self.interval, "search_steps": self.steps, "bank": BANK,
                "radius": [round(r, 6) for r in self.radius], "searches": self.searches, "adversarial_rows": self.rows,
                "ufe": self.meter.ufe, "seconds": round(self.seconds, 3),
                "last_attack_loss": self.last_attack_loss, "last_search_gain": self.last_gain}


def make_robust(cfg, cond: dict[str, Conditioning], autocast: torch.dtype | None, meter: CostMeter) -> RobustTraining | None:
    """The robust side for ``cfg`` (None when ``cfg.robust`` is "off")."""
    if cfg.robust == "off":
        return None
    neutral = cond["neutral"].rows([0] * len(cond["targets"]))
    return RobustTraining(cond["targets"], neutral, cfg.iterations, cfg.signal_checks, cfg.guidance_scale, cfg.seed,
                          autocast, parent=meter)


__all__ = ["BANK", "MODES", "RobustTraining", "SEARCH_STEPS", "is_search_step", "make_robust", "search_interval"]
