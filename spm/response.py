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
bytes.  It is opt-in (the ``response`` metric, which also takes the membrane gate of :mod:`spm.gate`) and needs a
host that can run its UNet from inside the sampling hooks (:meth:`spm.attach.MembraneStack.bypassed`): the
diffusers host (``spm generate``, ``spm eval``, ``spm attack``, ``spm explain``) and the WebUI
(:mod:`spm.webui.response`, which builds the gates before sampling).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

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


class _NoStack:
    """``run_unet`` sets per-row membrane strengths on its stack; the gate's calls run with every membrane
    bypassed (the host's :meth:`spm.attach.MembraneStack.bypassed`), so there is nothing to set."""

    def set_strengths(self, strengths) -> None:
        return None


def null_words(n: int = NULL_WORDS, seed: int = SEED) -> list[str]:
    """``n`` random whole words of the CLIP vocabulary (prompt syntax left out), seeded."""
    from .gate import _pools

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
    seen: dict = field(default_factory=dict, repr=False)  # row digest -> closure

    @property
    def rows(self) -> int:
        return int(self.x_t.shape[0])

    def closures(self, backend, cond) -> torch.Tensor:
        """Closure of each row of ``cond`` (a :class:`spm.backend.Conditioning`), ``[len(cond)]`` float32: the
        model-synonym scan's measure on this gate's probes.  The caller runs it with every membrane off."""
        return probe_closures(backend, _NoStack(), self, list(range(self.rows)), cond, None)

    def map(self, closure: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1]; exactly 0 at or below ``lo`` (and always 0 for an unusable gate)."""
        if not self.usable:
            return torch.zeros_like(closure)
        return ((closure - self.lo) / max(self.hi - self.lo, 1e-12)).clamp(0.0, 1.0)

    def to_dict(self) -> dict:
        return {"concept": self.concept, "q": round(self.q, 4), "top": round(self.top, 4),
                "empty": round(self.empty, 4), "lo": round(self.lo, 4), "hi": round(self.hi, 4),
                "usable": self.usable, "probe_rows": self.rows}


def build_gate(backend, concept: str, *, steps: int, guidance: float, levels: int, seeds: int = SEEDS,
               null: Sequence[str] | None = None, resolution: int | None = None) -> ResponseGate:
    """Draw ``concept``'s probes and calibrate its gate on ``backend``'s model.  Run it with every membrane off
    (:meth:`spm.attach.MembraneStack.bypassed`)."""
    from .gate import CONCEPT_FORMS
    from .train.signal import ErasureProbe

    cond = backend.encode([concept, ""])
    probe = ErasureProbe(backend, _NoStack(), cond.rows([0]), cond.rows([1]), cond.rows([1]), steps=steps,
                         guidance=guidance, resolution=int(resolution or backend.latent.resolution),
                         trajectories=seeds, levels=levels,
                         seed=PROBE_SEED, surrogate_is_uncond=True)
    gate = ResponseGate(concept, probe.x_t, probe.t, probe.o.float(), probe.s.float())
    words = list(null) if null is not None else null_words()
    nul = gate.closures(backend, backend.encode(words + [""]))
    gate.empty = float(nul[-1])
    top = nul.double().sort(descending=True).values
    gate.q = float(top[min(NULL_RANK, len(top)) - 1])
    gate.top = float(gate.closures(backend, backend.encode([f.format(concept) for f in CONCEPT_FORMS])).min())
    head = gate.top - gate.q
    gate.lo = max(gate.q + head * LO_FRAC, gate.empty)
    gate.hi = max(gate.q + head * HI_FRAC, gate.lo + 1e-6)
    gate.usable = head > 0 and gate.top > gate.lo
    if not gate.usable:
        log.warning("SPM: the response gate of %r is unusable on this model: its literal prompts close %.2f of the gap, "
                    "random words up to %.2f (it scores 0; the words metric still applies)", concept, gate.top, gate.q)
    return gate


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

    def gate(self, concept: str) -> ResponseGate | None:
        """``concept``'s gate: built here when missing if ``lazy``, else None until :meth:`build`."""
        if self._unsupported():
            return None
        if concept in self.gates:
            return self.gates[concept]
        return self.build(concept) if self.lazy else None

    def build(self, concept: str) -> ResponseGate | None:
        """Build (or return) ``concept``'s gate; a failure is logged and leaves the concept without one."""
        if self._unsupported():
            return None
        if concept in self.gates:
            return self.gates[concept]
        try:
            with self.bypass(), torch.no_grad():
                g = build_gate(self.backend, concept, steps=self.steps, guidance=self.guidance, levels=self.levels,
                               resolution=self.resolution)
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
            for concept in m.info.concepts:
                g = self.gate(concept)
                if g is not None and g.usable:
                    if keys is None:
                        keys = [_digest(context[i]) for i in range(context.shape[0])]
                    best = torch.maximum(best, g.map(self.closures(g, context, keys)))
            cols.append(best)
        return torch.stack(cols, 1) if cols else torch.zeros(context.shape[0], 0)


__all__ = ["NULL_WORDS", "Responder", "ResponseGate", "SEEDS", "build_gate", "null_words"]
