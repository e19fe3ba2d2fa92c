"""An erasure signal measured while training: no classifier, any model.

What "erased" means here
------------------------
Take a fixed, held-out set of probes ``(x_t, t)``: points on the *original* model's own CFG trajectories for the
target (membrane OFF), at several noise levels, from noise seeds that the training never draws.  On each probe
the frozen model gives two predictions, computed once:

* ``o = ε(x_t, target)``: what the model does with the target (the original);
* ``s = ε(x_t, surrogate)``: what the target should become (``""``: the unconditional prediction).

and the membrane gives ``m = ε'(x_t, target)`` (membrane ON), measured every few steps.  Stack the probes into one
vector each and let ``u = o − s`` be the concept's own effect.  The signal is the **share of the gap closed**::

    closed = ⟨o − m, u⟩ / ‖u‖²          0: the original model,  1: exactly the surrogate,  1 + g: the erase goal

(the erase goal ``s − g·(ε_pos − s)`` lies at ``1 + g`` when the positive prompt is the target).  Components of
``m`` orthogonal to ``u`` do not count: they move the prediction somewhere else, not towards the surrogate.

The decision rule follows from what generation does with the prediction, not from a fitted constant.  Write
``m = s + a·u + w`` with ``w ⊥ u`` (``closed = 1 − a``).  Classifier-free guidance at scale ``w_cfg`` turns the
prediction into ``ε_unc + w_cfg·(m − ε_unc)``; with the surrogate ``""`` (``s = ε_unc``) its component towards the
target is ``w_cfg·a·u``.  While ``a > 0`` a large enough guidance scale brings the target back (users generate at
5–12); at ``a ≤ 0`` no scale does.  So::

    erased   ⇔   closed ≥ 1   (the target's own direction is cancelled: no guidance scale pushes towards it)

Equivalently, since ``‖m − (2s − o)‖² − ‖m − o‖² = 4a·‖u‖²`` whatever ``w`` is: ``closed ≥ 1`` ⇔ ``m`` is at least
as close to the mirror image of the original through the surrogate, ``2s − o`` (the reference's erase goal at
``g = 1``), as to the original itself: the perpendicular bisector of that pair.  The weaker
bisector between original and surrogate (``closed ≥ ½``: closer to the surrogate than to the original) was the
first choice; on the toy world it said erased long before the scorer saw any erasure (``bench/signal_vs_scorer.py``).

The probes sit at several noise levels of each held-out trajectory.  Each trajectory's ``closed`` is pooled over
its levels (a ratio of sums, so the levels where the concept changes the prediction most weigh most), and **the
signal is the lower confidence bound of that ratio over the trajectories** (below): "erased" means the images of
those seeds, each taken as a whole trajectory, have the target's direction cancelled.

Until 2026-12-07 the signal was the *minimum over the levels* of a per-level bound, on the argument that a level
where the target's direction survives is a step at which guidance still draws it.  But the probes lie on the
*original* model's trajectories (membrane OFF), and with the membrane on, generation does not pass through them:
once the levels that carry most of the concept's effect are cancelled, a level where the membrane leaves part of
the direction on the original's path is a state the erased sampler never reaches.  Measured against the scorer
(``bench/signal_vs_scorer.py``, 80 points per world, the recorded per-level values): the minimum agreed at 64 of
80 points on world 1 and 33 of 80 on world 2 (cloud: levels at 1.48, 0.94, −0.06, 0.88 with no cloud left in any
image; sun: 0.35 at the noisiest level with none left either), the pooled plain ratio at 76 and 80 of 80 but with
3 false "erased" on world 1 (the plain ratio has no confidence bound; heart at 180 steps: 1.03, the scorer still
finding the target in 31 % of the images).  The per-level values stay in the check (``per_level``,
``level_ratio``) and the README's table compares both rules.

Held-out seeds, not their average
---------------------------------
Erasure is judged per image, and a seed whose target survives is a failed image however well the others are
erased.  The pooled ratio is an estimate from ``trajectories`` held-out seeds, so the decision uses its one-sided
lower confidence bound (:data:`CONFIDENCE`; the ratio estimator's standard error over the seeds, Student's t with
``trajectories − 1`` degrees of freedom): "erased" means erased with that confidence over seeds, not just on
average (``per_level`` reports the same bound for each level alone).  Under the per-level rule, on toy world 2 the
plain ratio said "erased" at step 180 for "car" (1.09 at its worst level from 8 seeds, two of them below 1) while
the scorer still found a car in half the images; the bound there was 0.99, and 1.13 on the same probes after 600
steps, when the scorer found none.
With one trajectory there is no spread to measure and the bound is the ratio itself.

Cost: building the probes runs ``trajectories`` CFG trajectories of the original model up to the lowest noise
level (``2 · trajectories · (k_max + 1)`` UNet rows, once; plus one surrogate row per probe when the surrogate is
not ``""``); every check is one no-grad UNet call on the ``trajectories × levels`` probe rows.  All of it is
counted in its own :class:`~spm.train.objective.CostMeter`, reported beside the training cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backend import Backend, Conditioning
from .objective import CostMeter, in_chunks, run_unet
from .sampling import _noise, cfg_out, ddim_step, ddim_timesteps

PART_NAMES = {"alone": "the target alone", "in_context": "inside other words",
              "adversaries": "the adversaries robust training found"}
THRESHOLD = 1.0  # the target's direction cancelled: no guidance scale brings it back (see the module docstring)
CONFIDENCE = 0.95  # one-sided confidence of the per-level lower bound over held-out seeds (a convention, not a fit)


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile ``t_p`` with ``dof`` degrees of freedom (exact for 1 and 2; otherwise the
    Cornish-Fisher expansion around the normal quantile, within 0.3 % of the exact value from 3 on)."""
    from statistics import NormalDist

    if dof <= 0:
        return 0.0
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z, v = NormalDist().inv_cdf(p), float(dof)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def ratio_lower_bound(num: torch.Tensor, den: torch.Tensor, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """``(R, lower bound)`` of the ratio estimator ``R = Σ num / Σ den`` over ``n`` samples: ``R − t·se`` with
    ``se² = Σ (num_i − R·den_i)² / ((n − 1) · n · mean(den)²)`` (the delta method) and ``t`` Student's quantile at
    ``confidence`` with ``n − 1`` degrees of freedom.  One sample: the bound is ``R``."""
    num, den = num.double(), den.double()
    n = num.numel()
    r = float(num.sum() / den.sum().clamp_min(1e-30))
    if n < 2:
        return r, r
    se = math.sqrt(float(((num - r * den) ** 2).sum()) / ((n - 1) * n)) / max(float(den.mean()), 1e-30)
    return r, r - t_quantile(confidence, n - 1) * se
SEED_OFFSET = 0x5EED5  # probe noise comes from its own generator, never from the training draws


def probe_levels(steps: int, levels: int) -> list[int]:
    """DDIM step indices ``k`` of the probe noise levels: the centres of ``levels`` equal bins of ``1 … steps − 1``
    (the range the trainer samples), without duplicates."""
    span = steps - 2
    ks = [1 + int(math.floor((2 * j + 1) * span / (2 * levels) + 0.5)) for j in range(levels)]
    return sorted(set(min(steps - 1, max(1, k)) for k in ks))


def check_interval(iterations: int, checks: int) -> int:
    """Steps between checks: the budget split into ``checks`` parts.  A budget shorter than ``checks`` steps has
    no whole-step interval: it is checked once, at its end (returns ``iterations``), and never stops early —
    checking every step would cost a probe call per iteration (about half an iteration's UNet rows)."""
    if iterations < checks:
        return iterations
    return max(1, math.ceil(iterations / max(1, checks)))


def min_steps(iterations: int, warmup: int, interval: int, patience: int) -> int:
    """The earliest step at which training may stop: after the learning-rate warm-up (the schedule's own ramp,
    capped at a sixth of the run as :func:`spm.train.loop.lr_factor` does) and after ``patience`` checks."""
    return max(min(warmup, iterations // 6), interval * patience)


@dataclass
class Check:
    step: int
    signal: float
    per_level: list[float]
    remaining: float  # ‖m − s‖ / ‖o − s‖ (1 for the original model, 0 at the surrogate)
    aggregate: float | None = None  # closed over all probes together: the plain ratio whose lower bound is the signal
    level_ratio: list[float] | None = None  # closed per level, the plain ratio (per_level: its lower bound)
    per_seed: list[list[float]] | None = None  # closed per level and held-out seed (each probe alone)
    # the model synonyms' closure with the membrane ON (word -> pooled ratio): set at the end of a run that
    # passed (the summary reports it; the stop rule's history does not keep it)
    synonyms: dict[str, float] | None = None
    # with context probes (TrainConfig.contexts): the signal of the target alone and inside other words; with robust
    # training, the least closure of its banked adversaries (the check is the least of them)
    parts: dict[str, float] | None = None
    # with context probes: the context prompt whose held-out trajectory is least erased, and its ratio (pooled over its
    # noise levels): what the verdict names when only the target inside other words is short
    weakest_context: tuple[str, float] | None = None

    @property
    def passed(self) -> bool:
        return self.signal >= THRESHOLD

    @property
    def synonyms_passed(self) -> bool:
        """Every model synonym measured in this check is erased too (True when there are none to measure)."""
        return self.synonyms is None or all(v >= THRESHOLD for v in self.synonyms.values())

    def to_dict(self) -> dict:
        return {"step": self.step, "signal": self.signal, "per_level": self.per_level, "remaining": self.remaining,
                "aggregate": self.aggregate, "level_ratio": self.level_ratio,
                "per_seed": [[round(v, 4) for v in lv] for lv in self.per_seed] if self.per_seed is not None else None,
                **({"parts": self.parts} if self.parts is not None else {}),
                **({"weakest_context": [self.weakest_context[0], round(self.weakest_context[1], 4)]}
                   if self.weakest_context is not None else {})}


def pause_parts(parts: dict[str, float] | None) -> dict[str, float]:
    """Until the next check: the weight of each part's erase term (``Check.parts``: the target alone, inside other
    words, robust training's adversaries).  While some part is short of :data:`THRESHOLD`, every part that already
    passes is paused (0): pushing it further over-erases it (the target alone overshooting its surrogate draws
    blotches that are no longer the surrogate) and takes the step from the part that lags.  With no part short, or
    one part only, nothing is paused (the stop rule's second check confirms on the run as it is)."""
    parts = parts or {}
    if len(parts) < 2 or all(v >= THRESHOLD for v in parts.values()):
        return {}
    return {k: 0.0 for k, v in parts.items() if v >= THRESHOLD}


class ErasureProbe:
    """Held-out probes of the original model for ``targets`` and the share-of-gap-closed signal on them."""

    def __init__(self, backend: Backend, stack, targets: Conditioning, surrogate: Conditioning, uncond: Conditioning,
                 *, steps: int, guidance: float, resolution: int, trajectories: int = 8, levels: int = 4, seed: int = 0,
                 meter: CostMeter | None = None, autocast: torch.dtype | None = None, surrogate_is_uncond: bool = False,
                 surrogate_per_row: bool = False, progress: Callable[[int, int], None] | None = None):
        """``surrogate``: one row for every target, or with ``surrogate_per_row`` one row per target row (the
        context probes: the same words around the surrogate); ``surrogate_is_uncond``: the surrogate is ``""``, whose
        predictions the trajectories already give.  ``progress(done, total)`` counts UNet calls (:meth:`calls`)."""
        if surrogate_per_row and len(surrogate) != len(targets):
            raise ValueError(f"surrogate_per_row needs one surrogate row per target row ({len(surrogate)} for {len(targets)})")
        self.backend, self.stack, self.autocast = backend, stack, autocast
        self.meter = meter if meter is not None else CostMeter()
        self.levels = probe_levels(steps, levels)
        ts = ddim_timesteps(backend.alphas_cumprod.shape[0], steps)
        g = torch.Generator().manual_seed(int(seed) + SEED_OFFSET)
        n = self.trajectories = int(trajectories)
        tis = [j % len(targets) for j in range(n)]
        x = torch.cat([_noise(backend.latent.shape(1, resolution, resolution), g, backend.device) for _ in range(n)])
        rows = Conditioning.cat([uncond.repeat(n), targets.rows(tis)])
        xs, tt, os_, us, conds = [], [], [], [], []
        work = self.calls(steps, levels, surrogate_is_uncond)
        if progress is not None:
            progress(0, work)
        for i in range(max(self.levels) + 1):
            t = ts[i:i + 1].to(x.device).expand(n)
            out = run_unet(backend, stack, torch.cat([x, x]), torch.cat([t, t]), rows, [0.0] * (2 * n), self.meter, False,
                           autocast)
            if progress is not None:
                progress(i + 1, work)
            if i in self.levels:
                xs.append(x.clone())
                tt.append(t.clone())
                os_.append(out[n:])
                us.append(out[:n])
                conds.extend(tis)
            if i == max(self.levels):
                break
            guided = cfg_out(out[:n], out[n:], guidance)
            x = ddim_step(backend, guided, x.float(), t, ts[i + 1:i + 2].to(x.device).expand(n))
        self.x_t, self.t = torch.cat(xs), torch.cat(tt)
        self.cond = targets.rows(conds)
        self.target_of = list(conds)  # each probe row's target index
        self.o = torch.cat(os_)
        if surrogate_is_uncond:
            self.s = torch.cat(us)
        else:
            sur = surrogate.rows(conds) if surrogate_per_row else surrogate.repeat(len(self.cond))
            self.s = run_unet(backend, stack, self.x_t, self.t, sur, [0.0] * len(self.cond), self.meter, False, autocast)
            if progress is not None:
                progress(work, work)
        self.level_of = [lv for lv in self.levels for _ in range(n)]
        self.level_t = [int(ts[k]) for k in self.levels]

    @staticmethod
    def calls(steps: int, levels: int, surrogate_is_uncond: bool) -> int:
        """UNet calls that drawing a probe makes: the trajectories down to the lowest level, then the surrogate's."""
        return max(probe_levels(steps, levels)) + 1 + (0 if surrogate_is_uncond else 1)

    @property
    def rows(self) -> int:
        return len(self.cond)

    def statistic(self, m: torch.Tensor) -> tuple[float, list[float], float, list[float]]:
        """``(closed, lower bound of closed per level, remaining gap ratio, closed per level)`` for membrane-ON
        predictions ``m`` of the probes (the bound: :func:`ratio_lower_bound` over the level's held-out seeds).
        Each probe's own ratio is left in :attr:`last_per_seed` (per level, in seed order), each trajectory's ratio
        pooled over its levels in :attr:`last_per_trajectory`, and the signal, ``(ratio, lower bound)`` over those
        trajectories, in :attr:`last_pooled`."""
        o, s, m = self.o.double(), self.s.double(), m.double()
        u = (o - s).flatten(1)
        d = (o - m).flatten(1)
        num, den = (d * u).sum(1), (u * u).sum(1)
        ratio, bound, seeds = [], [], []
        for lv in self.levels:
            idx = [i for i, v in enumerate(self.level_of) if v == lv]
            r, lb = ratio_lower_bound(num[idx], den[idx])
            ratio.append(r)
            bound.append(lb)
            seeds.append([float(v) for v in num[idx] / den[idx].clamp_min(1e-30)])
        self.last_per_seed = seeds
        # each held-out trajectory pooled over its noise levels (a ratio of sums: the levels where the concept moves
        # the prediction most weigh most), then the lower bound over the trajectories: the signal
        # (rows are level by level, the same trajectories in the same order at each: [levels, trajectories])
        per_num, per_den = num.view(-1, self.trajectories).sum(0), den.view(-1, self.trajectories).sum(0)
        self.last_pooled = ratio_lower_bound(per_num, per_den)
        # each trajectory's own pooled ratio, in trajectory order (trajectory j is of the target row j % len(targets))
        self.last_per_trajectory = [float(v) for v in per_num / per_den.clamp_min(1e-30)]
        closed = float(num.sum() / den.sum().clamp_min(1e-30))
        remaining = float((m - s).flatten().norm() / (o - s).flatten().norm().clamp_min(1e-30))
        return closed, bound, remaining, ratio

    def measure(self, step: int, strength: float = 1.0) -> Check:
        """One check: the probes with the membrane ON (one no-grad UNet call of :attr:`rows` rows)."""
        m = run_unet(self.backend, self.stack, self.x_t, self.t, self.cond, [float(strength)] * self.rows, self.meter,
                     False, self.autocast)
        closed, bound, remaining, ratio = self.statistic(m)
        return Check(step, self.last_pooled[1], bound, remaining, closed, ratio, self.last_per_seed)

    def measure_words(self, rows: list[int], words: Conditioning, strength: float = 1.0,
                      batch_rows: int = 64, progress: Callable[[int], None] | None = None) -> list[float]:
        """How far the membrane (ON at ``strength``) cancels the target's direction for other prompts: for each row
        of ``words``, on the probe rows ``rows`` (one target's), the same share of the gap closed as the signal's,
        ``⟨o − ε'(x_t, word), u⟩ / ‖u‖²`` with the *target's* ``u = o − s``, a ratio of sums over the rows (all their
        noise levels pooled, as the signal pools them).  ``1 − closed`` is the component of the word's
        prediction towards the target: at ``closed ≥ 1`` no guidance scale draws the target for that word either
        (the argument of the module docstring, applied to the word's prompt).  ``len(rows)`` rows per word, in UNet
        calls of about ``batch_rows`` rows (halved on out-of-memory: :func:`spm.train.objective.in_chunks`), counted in
        :attr:`meter`; ``progress(k)`` after each call (k words)."""
        n, r = len(words), len(rows)
        if n == 0 or r == 0:
            return []
        x, t = self.x_t[rows], self.t[rows]
        o, s = self.o[rows].double(), self.s[rows].double()
        u = (o - s).flatten(1)
        den = (u * u).sum(1)
        total = den.sum().clamp_min(1e-30)

        def call(i: int, k: int) -> list[float]:
            cond = words.rows([j for j in range(i, i + k) for _ in range(r)])
            m = run_unet(self.backend, self.stack, x.repeat(k, 1, 1, 1), t.repeat(k), cond, [float(strength)] * (k * r),
                         self.meter, False, self.autocast).double().reshape(k, r, -1)
            num = ((o.flatten(1).unsqueeze(0) - m) * u.unsqueeze(0)).sum(2)  # [k, r]
            if progress is not None:
                progress(k)
            return [float(row.sum() / total) for row in num]

        return [v for part in in_chunks(n, max(1, batch_rows // r), call) for v in part]


@dataclass
class StopRule:
    """Early stopping on the signal: stop once ``patience`` consecutive checks pass, not before ``earliest``."""

    interval: int
    earliest: int
    patience: int = 2
    enabled: bool = True
    streak: int = 0
    checks: list[dict] = field(default_factory=list)

    def due(self, step: int, budget: int) -> bool:
        return step % self.interval == 0 or step == budget

    def record(self, check: Check) -> bool:
        """Add a check; True when training should stop now."""
        self.streak = self.streak + 1 if check.passed else 0
        self.checks.append(check.to_dict())
        return self.enabled and self.streak >= self.patience and check.step >= self.earliest

    def state_dict(self) -> dict:
        return {"streak": self.streak, "checks": list(self.checks)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.streak = int(d.get("streak", 0))
        self.checks = list(d.get("checks", []))


def advice(cfg, steps: int) -> str:
    """What to try when a run ends not erased (settings named as the CLI flags)."""
    tips = [f"more iterations (--iterations {max(2 * steps, cfg.iterations)})",
            f"a higher learning rate (--lr {cfg.lr * 2:g})",
            f"a stronger erase guidance (--guidance-scale {cfg.guidance_scale + 1:g})"]
    if not cfg.surrogate:
        tips.append("a concrete surrogate (--surrogate \"…\", what the target should become)")
    if cfg.la_mode != "off":
        tips.append(f"looser anchoring (--la-budget {cfg.la_budget * 2:g})" if cfg.la_mode == "adaptive"
                    else f"a lower anchor weight (--la-strength {cfg.la_strength / 2:g})")
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]


def summary(check: Check | None, cfg, steps: int, stopped_early: bool, interrupted: bool, probe: ErasureProbe | None,
            rule: StopRule | None) -> dict:
    """The ``TrainResult.erasure`` / ``spm_erasure`` dict: ``erased``, ``signal``, ``threshold``, ``message`` + details."""
    if check is None:
        return {"erased": False, "signal": float("nan"), "threshold": THRESHOLD,
                "message": "not measured: training stopped before the erasure signal could be measured"}
    erased = check.passed
    pct = f"{check.signal:.0%}"
    seeds = probe.trajectories if probe is not None else getattr(cfg, "signal_trajectories", 0)
    conf = f" ({CONFIDENCE:.0%} lower bound over {seeds} held-out seeds)" if seeds and seeds > 1 else ""
    if erased:
        how = f"stopped at step {steps} of {cfg.iterations}" if stopped_early else f"after {steps} steps"
        msg = (f"erased: with the membrane the target's prediction closes {pct}{conf} of its gap to the surrogate "
               f"over the sampling trajectory (erased from {THRESHOLD:.0%}: no guidance scale pushes towards the "
               f"target any more); {how}")
    else:
        why = "interrupted" if interrupted else f"the budget of {cfg.iterations} iterations ran out"
        msg = (f"not erased: with the membrane the target's prediction closes only {pct}{conf} of its gap to the "
               f"surrogate over the sampling trajectory (erased from {THRESHOLD:.0%}) after {steps} steps ({why}); "
               f"{advice(cfg, steps)}")
    parts = check.parts or {}
    if len(parts) > 1:  # context probes and/or robust training's adversaries: say which part the verdict comes from
        msg += " (" + ", ".join(f"{PART_NAMES.get(k, k)} {v:.0%}" for k, v in parts.items()) + "; the lesser decides)"
    # where the verdict may be stricter than the images: what to look at before training longer (said once)
    hints = []
    short = [k for k, v in parts.items() if v < THRESHOLD]
    if not erased and short == ["in_context"]:
        # the stricter of the two checks: on the toy worlds most such runs gave erased images (README)
        weakest = (f"; the least erased held-out one: {check.weakest_context[0]!r} ({check.weakest_context[1]:.0%})"
                   if check.weakest_context is not None else "")
        hints.append("the target's own prompt is erased, and only inside other words is its direction not cancelled "
                     f"yet: check prompts that wrap it (spm eval, or your own){weakest}")
    if not erased and short == ["adversaries"]:
        hints.append("the target's prompts are erased, and only the adversarial embeddings robust training found "
                     "still draw it: more iterations give the adversary search more rounds")
    # the plain ratio is the probes' estimate; the adversaries' part has none, so a verdict short there is not a bound's
    plain = check.aggregate if "adversaries" not in short else None
    if not erased and plain is not None and plain >= THRESHOLD and seeds and seeds > 1:
        # the estimate itself says erased and only its confidence bound does not (README, "The erasure signal
        # against the scorer": how often that plain ratio agreed with the scorer); so the images decide, not more steps
        hints.append(f"on average over the held-out probes the target's direction is cancelled (plain ratio "
                     f"{plain:.0%}), only the {CONFIDENCE:.0%} bound is short of it (some probes still keep part of "
                     "it): look at images of the target with the membrane (the before/after grid, spm generate) to judge")
    if hints:
        msg += "; " + "; ".join(hints) + " before training longer"
    if erased and check.synonyms:
        left = sorted(((w, v) for w, v in check.synonyms.items() if v < THRESHOLD), key=lambda x: x[1])
        n = len(check.synonyms)
        if left:
            shown = ", ".join(f"{w} {v:.0%}" for w, v in left[:5]) + (", …" if len(left) > 5 else "")
            which = ("the word the model draws as the target (it opens the membrane) still draws" if n == 1 else
                     f"{len(left)} of the {n} words the model draws as the target (which open the membrane) still "
                     f"draw{'s' if len(left) == 1 else ''}")
            msg += f"; but {which} it: {shown} closed; {advice(cfg, steps)}"
        else:
            msg += "; so is the word the model draws as the target" if n == 1 else \
                f"; so are the {n} words the model draws as the target"
    out = {"erased": bool(erased), "signal": float(check.signal), "threshold": THRESHOLD, "message": msg,
           "step": check.step, "per_level": check.per_level, "level_ratio": check.level_ratio,
           "confidence": CONFIDENCE, "aggregate": check.aggregate,
           "remaining_gap": check.remaining,
           "stopped_early": bool(stopped_early)}
    if check.parts is not None:
        out["signal_parts"] = dict(check.parts)
    if check.synonyms is not None:
        out["synonyms"] = {w: round(v, 4) for w, v in check.synonyms.items()}
        out["synonyms_erased"] = check.synonyms_passed
    if probe is not None:
        out["levels_t"] = probe.level_t
        out["probe_rows"] = probe.rows
    if rule is not None:
        out["check_every"] = rule.interval
        out["patience"] = rule.patience
        out["earliest_stop"] = rule.earliest
    return out


__all__ = ["CONFIDENCE", "THRESHOLD", "Check", "ErasureProbe", "StopRule", "advice", "check_interval", "min_steps", "probe_levels",
           "ratio_lower_bound", "summary", "t_quantile"]
