"""The response gate: a Facilitated Transport score from what the *UNet* does with a row, not from its words.

Why
---
The word metrics (``ngram_tokenuni``) and the membrane gate (:mod:`spm.gate`) read the text side. A prompt that
avoids the concept's words but makes the model draw the concept anyway — the free-tokens placement of the
discrete attack (``bench.attack``: "roar zl allocated francesco" draws a circle on toy world 1 in 4 of 4 images),
a multi-word paraphrase the encoder does not place near the concept — scores 0 there, and the membrane stays
shut. Whether a row draws the concept is the UNet's decision, so this gate asks the UNet.

What it measures
----------------
Per concept, held-out probes of the original model (no membrane): ``x_t`` on the model's own trajectories for
the concept at the trainer's noise levels (``signal_levels``), :data:`SEEDS` seeds each (:class:`spm.train.signal.ErasureProbe`,
the trainer's probes), with ``o`` the concept's prediction and ``s`` the empty prompt's. A row ``c`` of
conditioning gets its prediction ``p`` on the same probes (membranes off) and its **closure**::

    closure(c) = 1 − Σ‖p − o‖² / Σ‖s − o‖²       1: predicts as the concept does,  0: as the empty prompt

(the model-synonym scan's measure, :mod:`spm.train.synonyms`).

Calibration (per concept and model, nothing fitted on one model): a seeded null of random whole vocabulary
words plus the empty prompt gives ``q`` (its second-largest closure, as every other null in SPM); the concept's
literal prompts (:data:`spm.gate.CONCEPT_FORMS`) give ``top`` (their least closure).  ``lo = q`` and ``hi`` a
quarter of the headroom above it (:data:`LO_FRAC`, :data:`HI_FRAC`), ``lo`` never below the empty prompt's own
closure, and ``score = clamp((closure − lo) / (hi − lo), 0, 1)``: a row at or below ``lo`` — every random word
but the null's largest — gets exactly 0, so its image stays bit-identical.  A concept whose literal prompts do not
rise above ``lo`` is *unusable* (its gate scores 0).

Cost: building a concept's gate draws its probes (the trajectories down to the lowest level: about 25 UNet calls
of ``2 × SEEDS`` rows) and scores the null and the literal forms (``(NULL_WORDS + 5) × SEEDS × levels`` rows);
scoring a row the gate has not seen is one UNet pass of ``SEEDS × levels`` rows, then cached by the row's
bytes.  The trainer stores each target's calibration (``q``, ``top``, the empty prompt's closure) in the membrane's
``spm_transport["response"]`` with a fingerprint of the probes (:func:`training_response`); a host whose probes
match it (same probe settings, the concept's predictions within :data:`FINGERPRINT_RTOL`: the same UNet) only
draws the probes and skips the null (about a tenth of the rows); on another UNet (a fine-tune) it recomputes.  It is opt-in (the ``response`` metric, which also takes the membrane gate of :mod:`spm.gate`) and needs a
host that can run its UNet from inside the sampling hooks (:meth:`spm.attach.MembraneStack.bypassed`): the
diffusers host (``spm generate``, ``spm eval``, ``spm attack``, ``spm explain``) and the WebUI
(:mod:`spm.webui.response`, which builds the gates before sampling).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

from .backend import num_train_timesteps
from .gate import CONCEPT_FORMS, _pools
from .train.synonyms import NULL_RANK as SCAN_NULL_RANK
from .train.synonyms import NULL_WORDS as SCAN_NULL_WORDS
from .train.synonyms import PROBES_PER_LEVEL
from .train.synonyms import closures as probe_closures

log = logging.getLogger("spm")

# held-out trajectories per concept, the null's size and rank: the model-synonym scan's (the same measure, as many
# probe rows; q is the null's second-largest closure, so one random word that draws the concept cannot move it)
SEEDS = PROBES_PER_LEVEL
NULL_WORDS = SCAN_NULL_WORDS
NULL_RANK = SCAN_NULL_RANK
SEED = 4127  # the null's draw, apart from every other null and training draw
PROBE_SEED = 11  # the probes' trajectories, apart from the trainer's (its seed 0)
# the ramp, as fractions of the headroom between the null's top q (0) and the literal prompts (1): a row opens once
# the model draws the concept from it more than from every random word but one, at full strength a quarter of the
# headroom on.  The text gates start at the midpoint instead (spm.gate.LO_FRAC), because sibling concepts share
# much of their text states; here other objects' prompts close far below q (toy worlds: every other object's
# caption below 0 with q at 0.1-0.7).  Measured against the midpoint on both toy worlds (bench/results/
# attack_response_midpoint.json): the discrete and embedding attacks' success fell on both, and every non-target
# image stayed bit-identical under either rule
LO_FRAC = 0.0
HI_FRAC = 0.25
# where the ramp starts: "null" (above, lo = max(q + LO_FRAC·(top − q), the empty prompt's closure)) or "empty" (lo = the
# empty prompt's closure: every row the model draws nearer the concept than from "" opens a little; other objects'
# prompts still close far below it).  A membrane file names its rule in spm_transport["response"]["ramp"]: the
# trainer writes "empty" for robust training (TrainConfig.robust="embedding": the membrane then also erases what
# random text draws of the concept, so opening it there is what robust training is for; bench/results/attack.json);
# a file that names none (every plain membrane) takes LO_RULE, "null": random text stays bit-identical
LO_RULE = "null"
LO_RULES = ("null", "empty")
ROBUST_RAMP = "empty"  # the rule a robust-trained membrane names
# the trainer stores the calibration only where it costs at most this share of the training's planned UNet work (the
# same bound as the model-synonym scan's, spm.train.synonyms.BUDGET_SHARE, kept apart so that lifting one in a test
# leaves the other): a smoke test of a few iterations must not spend minutes on it (a cost bound, not a fit)
BUDGET_SHARE = 0.5
CALIBRATION_VERSION = 1  # of the stored calibration (spm_transport["response"]); another version is recomputed
SCORED_TEXTS = NULL_WORDS + 1 + len(CONCEPT_FORMS)  # texts a calibration scores: the null, "" and the literal forms
# a stored calibration applies when the host's probe predictions of the concept are within this relative distance of
# the ones it was made on: above fp16-versus-fp32 rounding along a sampled trajectory, far below what fine-tuning the
# UNet moves (bench: toy against its fine-tune; tests/test_response.py)
FINGERPRINT_RTOL = 5e-2
FINGERPRINT_DIMS = 4  # seeded random directions each probe row's prediction is projected on


class _NoStack:
    """``run_unet`` sets per-row membrane strengths on its stack; the gate's calls run with every membrane
    bypassed (the host's :meth:`spm.attach.MembraneStack.bypassed`), so there is nothing to set."""

    def set_strengths(self, strengths) -> None:
        return None


def null_words(n: int = NULL_WORDS, seed: int = SEED) -> list[str]:
    """``n`` random whole words of the CLIP vocabulary (prompt syntax left out), seeded."""
    _, words = _pools()
    g = torch.Generator().manual_seed(int(seed))
    return [words[i] for i in torch.randperm(len(words), generator=g)[:n].tolist()]


@dataclass
class ResponseGate:
    """One concept's probes and calibration on one model (see the module docstring)."""

    concept: str
    x_t: torch.Tensor
    t: torch.Tensor
    o: torch.Tensor
    s: torch.Tensor
    q: float = 0.0
    top: float = 1.0
    empty: float = 0.0
    lo: float = 0.0
    hi: float = 1.0
    usable: bool = True
    params: dict = field(default_factory=dict)  # what the probes and the null were drawn with (calibration_params)
    fingerprint: dict = field(default_factory=dict)  # the probes' predictions of the concept (probe_fingerprint)
    source: str = "computed"  # "file": q/top/empty from the membrane's stored calibration
    reason: str = ""  # why a stored calibration was or was not used
    rule: str = "null"  # the ramp rule lo/hi/usable were placed under (LO_RULE when the gate was built)
    seen: dict = field(default_factory=dict, repr=False)  # row digest -> closure

    @property
    def rows(self) -> int:
        return int(self.x_t.shape[0])

    def closures(self, backend, cond, stack=None, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Closure of each row of ``cond`` (a :class:`spm.backend.Conditioning`), ``[len(cond)]`` float32: the
        model-synonym scan's measure on this gate's probes.  The caller runs it with every membrane off (or passes
        its ``stack``, whose strengths are then set to 0)."""
        return probe_closures(backend, stack or _NoStack(), self, list(range(self.rows)), cond, None, progress=progress)

    def map(self, closure: torch.Tensor, rule: str | None = None) -> torch.Tensor:
        """Scores in [0, 1]; exactly 0 at or below ``lo`` (and always 0 for an unusable gate).  ``rule``: the ramp
        rule (:data:`LO_RULES`) of the membrane being scored (None: the process default, :data:`LO_RULE`)."""
        lo, hi, usable = self.ramp(rule)
        if not usable:
            return torch.zeros_like(closure)
        return ((closure - lo) / max(hi - lo, 1e-12)).clamp(0.0, 1.0)

    def ramp(self, rule: str | None = None) -> tuple[float, float, bool]:
        """``(lo, hi, usable)`` under ``rule`` from ``q``, ``top`` and ``empty`` (None: the gate's own, placed under
        :attr:`rule`)."""
        if rule is None:
            return self.lo, self.hi, self.usable
        head = self.top - self.q
        lo = self.empty if rule == "empty" else max(self.q + head * LO_FRAC, self.empty)
        hi = max(self.q + head * HI_FRAC, lo + 1e-6)
        return lo, hi, head > 0 and self.top > lo

    def to_dict(self, rule: str | None = None) -> dict:
        lo, hi, usable = self.ramp(rule)
        return {"concept": self.concept, "q": round(self.q, 4), "top": round(self.top, 4),
                "empty": round(self.empty, 4), "lo": round(lo, 4), "hi": round(hi, 4), "ramp": rule or self.rule,
                "usable": usable, "probe_rows": self.rows, "source": self.source, "reason": self.reason}

    def calibration(self) -> dict:
        """The entry a membrane file stores for this concept (``spm_transport["response"]["concepts"]``)."""
        return {"params": self.params, "fingerprint": self.fingerprint, "q": self.q, "top": self.top,
                "empty": self.empty}

    def _place(self) -> None:
        """``lo``, ``hi`` and ``usable`` under the process default :data:`LO_RULE` (:meth:`ramp`)."""
        self.rule = LO_RULE
        self.lo, self.hi, self.usable = self.ramp(LO_RULE)


def calibration_params(steps: int, guidance: float, levels: int, seeds: int, resolution: int) -> dict:
    """What a stored calibration (``q``, ``top``, the empty prompt's closure) depends on besides the UNet: the probes'
    and the null's settings (not the ramp's, which :meth:`ResponseGate._place` applies to them)."""
    return {"version": CALIBRATION_VERSION, "probe_seed": PROBE_SEED, "seeds": int(seeds), "levels": int(levels),
            "steps": int(steps), "guidance": float(guidance), "resolution": int(resolution), "null": NULL_WORDS,
            "null_seed": SEED, "rank": NULL_RANK, "forms": list(CONCEPT_FORMS)}


def probe_fingerprint(o: torch.Tensor) -> dict:
    """What identifies the UNet a calibration was made on: each probe row's prediction of the concept projected on
    :data:`FINGERPRINT_DIMS` seeded random directions (the probes are drawn anyway; this costs no UNet call)."""
    x = o.detach().double().cpu().flatten(1)
    g = torch.Generator().manual_seed(0)
    proj = x @ torch.randn(x.shape[1], FINGERPRINT_DIMS, generator=g, dtype=torch.float64) / x.shape[1] ** 0.5
    return {"dim": int(x.shape[1]), "probe": [int(x.shape[0]), PROBE_SEED],
            "proj": [float(f"{v:.6g}") for v in proj.reshape(-1).tolist()]}


def _response_entry(membrane, *keys: str):
    """``membrane.info.transport["response"][keys…]``, or None where a level is missing or not a mapping (a
    hand-edited or foreign file reads as one without the entry)."""
    entry = getattr(getattr(membrane, "info", None), "transport", None)
    for key in ("response", *keys):
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def stored_calibration(membrane, concept: str) -> dict | None:
    """``membrane``'s stored response calibration of ``concept`` (``spm_transport["response"]``), or None (also for
    a malformed entry: the host then calibrates, as for a file without one)."""
    entry = _response_entry(membrane, "concepts", concept)
    return entry if isinstance(entry, dict) else None


_UNKNOWN_RAMPS: set[tuple[str, str]] = set()  # (membrane, rule) already warned about


def membrane_ramp(membrane) -> str | None:
    """The response gate's ramp rule ``membrane``'s file names (``spm_transport["response"]["ramp"]``), or None (the
    process default :data:`LO_RULE` applies; also for an unknown name, which is logged once per membrane)."""
    rule = _response_entry(membrane, "ramp")
    if rule is None or rule in LO_RULES:
        return rule
    name = str(getattr(membrane, "name", "a membrane"))
    if (name, str(rule)) not in _UNKNOWN_RAMPS:
        _UNKNOWN_RAMPS.add((name, str(rule)))
        log.warning("SPM: %s names the response ramp %r, which this version does not know (%s); using %r", name, rule,
                    ", ".join(LO_RULES), LO_RULE)
    return None


def _apply_stored(gate: ResponseGate, stored: dict | None) -> bool:
    """Take ``q``/``top``/``empty`` from ``stored`` where it was made with these settings on this UNet; sets
    ``gate.reason`` either way."""
    from .transport import stored_mismatch

    if not stored:
        gate.reason = "no stored calibration"
        return False
    dist, why = stored_mismatch(stored, gate.params, gate.fingerprint,
                                "the stored calibration was made with other probe settings",
                                "the one the file was calibrated on", rtol=FINGERPRINT_RTOL,
                                differs="this UNet predicts the concept otherwise than", other_shape="another size")
    if why:
        gate.reason = why
        return False
    try:
        gate.q, gate.top, gate.empty = float(stored["q"]), float(stored["top"]), float(stored["empty"])
    except (KeyError, TypeError, ValueError):
        gate.reason = "the stored calibration is unreadable"
        return False
    gate.source = "file"
    gate.reason = f"the file's calibration (probe predictions within {dist:.2g} <= {FINGERPRINT_RTOL:g})"
    return True


def build_gate(backend, concept: str, *, steps: int, guidance: float, levels: int, seeds: int = SEEDS,
               null: Sequence[str] | None = None, resolution: int | None = None, stored: dict | None = None,
               stack=None, progress: Callable[[int, int], None] | None = None) -> ResponseGate:
    """Draw ``concept``'s probes and calibrate its gate on ``backend``'s model, or take the calibration from
    ``stored`` (:func:`stored_calibration`) where it applies.  Run it with every membrane off
    (:meth:`spm.attach.MembraneStack.bypassed`), or pass the ``stack`` whose strengths are then set to 0 (the
    trainer).  ``progress(done, total)`` counts the null's and the forms' rows scored (a caller may raise in it)."""
    from .progress import tally
    from .train.signal import ErasureProbe

    stack = stack or _NoStack()
    size = int(resolution or backend.latent.resolution)
    cond = backend.encode([concept, ""])
    probe = ErasureProbe(backend, stack, cond.rows([0]), cond.rows([1]), cond.rows([1]), steps=steps,
                         guidance=guidance, resolution=size, trajectories=seeds, levels=levels,
                         seed=PROBE_SEED, surrogate_is_uncond=True)
    gate = ResponseGate(concept, probe.x_t, probe.t, probe.o.float(), probe.s.float(),
                        params=calibration_params(steps, guidance, levels, seeds, size),
                        fingerprint=probe_fingerprint(probe.o))
    if not _apply_stored(gate, stored):
        words = list(null) if null is not None else null_words()
        forms = [f.format(concept) for f in CONCEPT_FORMS]
        step = tally(progress, len(words) + 1 + len(forms))
        nul = gate.closures(backend, backend.encode(words + [""]), stack, step)
        gate.empty = float(nul[-1])
        top = nul.double().sort(descending=True).values
        gate.q = float(top[min(NULL_RANK, len(top)) - 1])
        gate.top = float(gate.closures(backend, backend.encode(forms), stack, step).min())
    gate._place()
    if not gate.usable:
        log.warning("SPM: the response gate of %r is unusable on this model: its literal prompts close %.2f of the gap, "
                    "random words up to %.2f (it scores 0; the words metric still applies)", concept, gate.top, gate.q)
    return gate


def calibration_rows(steps: int, levels: int, seeds: int = SEEDS) -> int:
    """UNet rows of one concept's calibration: the probes' trajectories (a CFG pair per step down to the lowest
    level) and the null, the empty prompt and the literal forms on every probe."""
    from .train.signal import probe_levels

    lv = probe_levels(steps, levels)
    return 2 * seeds * (max(lv) + 1) + SCORED_TEXTS * seeds * len(lv)


def training_response(backend, stack, targets: Sequence[str], *, steps: int, guidance: float, levels: int,
                      progress: Callable[[int, int], None] | None = None, planned: int | None = None,
                      train_resolution: int | None = None) -> dict:
    """The ``spm_transport["response"]`` entry a trainer stores: each target's response-gate calibration on the
    original model (``stack``'s strengths set to 0), so that a host on the same UNet skips the null.  The probes are
    drawn at ``backend.response_resolution`` where the host sets one (the WebUI's Settings), else at the model's
    native size, as the host's gate will draw them.  ``{}`` on SDXL (no response gate there), when it would cost more
    than :data:`BUDGET_SHARE` of ``planned`` (the training's UNet rows at ``train_resolution``; None: no bound), or
    when it fails (best effort: the host then calibrates on first use).  ``progress(done, total)``: texts scored,
    reported after each target; an exception raised in it propagates (the trainer's Interrupt)."""
    if getattr(backend, "is_xl", False) or not targets:
        return {}
    from .progress import tally

    size = getattr(backend, "response_resolution", None) or None
    unique = list(dict.fromkeys(targets))
    if planned is not None:
        native = int(backend.latent.resolution)
        scale = ((size or native) / (train_resolution or native)) ** 2  # rows at the probe size, in training rows
        cost = calibration_rows(steps, levels) * len(unique) * scale
        if cost > BUDGET_SHARE * planned:
            log.info("SPM: the response gate's calibration is not stored: about %d UNet rows, more than %.0f%% of this "
                     "run's %d (it is computed on first use of --metric response)", cost, 100 * BUDGET_SHARE, planned)
            return {}
    step = tally(progress, SCORED_TEXTS * len(unique))
    out = {}
    for t in unique:
        try:
            with torch.no_grad():
                out[t] = build_gate(backend, t, steps=steps, guidance=guidance, levels=levels, stack=stack,
                                    resolution=size).calibration()
        except Exception as e:  # never fail a training run for it
            log.warning("SPM: response-gate calibration of %r at training time failed (%s); it will be computed on "
                        "first use", t, e)
        step(SCORED_TEXTS)
    return {"concepts": out} if out else {}


def _digest(row: torch.Tensor) -> bytes:
    return hashlib.blake2b(row.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


class Responder:
    """The response gates of a host's model: built once per concept, scoring each new row once.

    ``backend``: a :class:`spm.backend.Backend` of the host's UNet (``predict``, ``encode``, ``latent``, the
    schedule); ``bypass()``: a context manager under which the UNet computes as without membranes (the host's
    :meth:`spm.attach.MembraneStack.bypassed`), so that the gate may run inside the sampling hooks."""

    def __init__(self, backend, bypass: Callable[[], ContextManager] | None = None, *, steps: int | None = None,
                 guidance: float | None = None, lazy: bool = True, resolution: int | None = None):
        from .train.config import TrainConfig

        d = TrainConfig(targets=["x"])  # the trainer's probe settings (its defaults)
        self.backend = backend
        self.bypass = bypass or contextlib.nullcontext
        self.steps = int(steps or d.max_denoising_steps)
        self.guidance = float(guidance if guidance is not None else d.xt_guidance)
        self.levels = int(d.signal_levels)
        self.gates: dict[str, ResponseGate | None] = {}
        # lazy: a gate missing when a row is scored is built there (building encodes text); hosts whose text encoder
        # may be offloaded while the UNet samples (the WebUI) build before sampling and pass False
        self.lazy = lazy
        # the probes' image size in pixels (None: the model's native one); each new row costs SEEDS x levels UNet rows
        # at this size, so a CPU host may choose a smaller one
        self.resolution = int(resolution) if resolution else None
        self._supported = not getattr(backend, "is_xl", False)
        self._warned = False

    def _unsupported(self) -> bool:
        """True (warned once) on models whose UNet needs more than the text states per row (SDXL's pooled vector)."""
        if not self._supported and not self._warned:
            self._warned = True
            log.warning("SPM: the response gate needs a UNet conditioned on text states alone (SD1.x/SD2.x); "
                        "on this model it scores 0 and the words metric applies")
        return not self._supported

    def gate(self, concept: str, stored: dict | None = None) -> ResponseGate | None:
        """``concept``'s gate: built here when missing if ``lazy``, else None until :meth:`build`.  ``stored``: a
        membrane's stored calibration of it (:func:`stored_calibration`), used where it applies."""
        if self._unsupported():
            return None
        if concept in self.gates:
            return self.gates[concept]
        return self.build(concept, stored) if self.lazy else None

    def stored_settings(self, concept: str, stored: dict | None) -> tuple[int, float, int]:
        """The probes' ``(steps, guidance, levels)``: a stored calibration's, so that its probes are drawn as the
        trainer drew them (its run may have set other values), where they are ones a trainer can have used — steps
        within the model's noise schedule, levels within the steps, a finite guidance; otherwise (a hand-edited or
        foreign file: thousands of steps would cost thousands of UNet calls per concept) this host's own, and the
        stored calibration is then recomputed for the mismatch."""
        own = (self.steps, self.guidance, self.levels)
        p = (stored or {}).get("params") if isinstance(stored, dict) else None
        if not isinstance(p, dict):
            return own
        try:
            steps, guidance, levels = int(p.get("steps", own[0])), float(p.get("guidance", own[1])), int(p.get("levels", own[2]))
        except (TypeError, ValueError, OverflowError):
            return own
        limit = num_train_timesteps(self.backend)
        if 1 <= steps <= limit and 1 <= levels <= steps and math.isfinite(guidance):
            return steps, guidance, levels
        log.warning("SPM: the stored response calibration of %r asks for probes of %s steps, %s levels, guidance %s, "
                    "which no training run uses on this model (at most %d steps); it is recomputed with this host's "
                    "settings", concept, steps, levels, guidance, limit)
        return own

    def build(self, concept: str, stored: dict | None = None) -> ResponseGate | None:
        """Build (or return) ``concept``'s gate; a failure is logged and leaves the concept without one."""
        if self._unsupported():
            return None
        if concept in self.gates:
            return self.gates[concept]
        steps, guidance, levels = self.stored_settings(concept, stored)
        try:
            with self.bypass(), torch.no_grad():
                g = build_gate(self.backend, concept, steps=steps, guidance=guidance, levels=levels,
                               resolution=self.resolution, stored=stored)
        except Exception as e:  # never fail a generation for it: the words part still applies
            log.warning("SPM: building the response gate of %r failed (%s: %s); only the words part applies to it",
                        concept, type(e).__name__, e)
            g = None
        else:
            log.info("SPM: response gate of %r: %s", concept, g.to_dict())
        self.gates[concept] = g
        return g

    def closures(self, gate: ResponseGate, context: torch.Tensor, keys: Sequence[bytes] | None = None) -> torch.Tensor:
        """Closures ``[B]`` of the rows of ``context`` (each distinct row measured once, then remembered by its
        bytes; ``keys``: the rows' digests where the caller has them)."""
        from .backend import Conditioning

        if keys is None:
            keys = [_digest(context[i]) for i in range(context.shape[0])]
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in gate.seen and k not in todo:
                todo[k] = i
        if todo:
            rows = context.detach()[list(todo.values())]
            with self.bypass(), torch.no_grad():
                c = gate.closures(self.backend, Conditioning(rows.to(self.backend.device)))
            gate.seen.update(zip(todo, c.tolist()))
        return torch.tensor([gate.seen[k] for k in keys], dtype=torch.float32)

    def scores(self, context: torch.Tensor, membranes: Sequence) -> torch.Tensor:
        """``[B, M]``: each membrane's score is the highest of its concepts' gates."""
        cols = []
        keys: list[bytes] | None = None  # each row hashed once per call, whatever the number of concepts
        for m in membranes:
            best = torch.zeros(context.shape[0])
            rule = membrane_ramp(m)
            for concept in m.info.concepts:
                g = self.gate(concept, stored_calibration(m, concept))
                if g is not None and g.ramp(rule)[2]:
                    if keys is None:
                        keys = [_digest(context[i]) for i in range(context.shape[0])]
                    best = torch.maximum(best, g.map(self.closures(g, context, keys), rule))
            cols.append(best)
        return torch.stack(cols, 1) if cols else torch.zeros(context.shape[0], 0)


__all__ = ["FINGERPRINT_RTOL", "NULL_WORDS", "Responder", "ResponseGate", "SEEDS", "build_gate", "calibration_params",
           "calibration_rows", "membrane_ramp", "null_words", "probe_fingerprint", "stored_calibration", "training_response"]
