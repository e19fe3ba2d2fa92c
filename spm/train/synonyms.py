"""Model synonyms: the words that the model in hand draws as the target, found by the model itself.

Why
---
Facilitated Transport opens a membrane for the rows whose text is close to its concept in the *text encoder's*
states.  Whether a word draws the target is decided by the *UNet*, and the two disagree: on toy world 2 the base
model draws a cloud for "a cumulus" exactly as for "a cloud", while the encoder places "cumulus" below the
calibrated threshold of "cloud" (its null is high), so the membrane stayed shut and none of those images was
erased.  A fine-tune teaches its UNet words that no encoder-side threshold knows about.

What the scan measures
----------------------
On the erasure signal's held-out probes (``x_t`` on the original model's own trajectories for the target, several
noise levels; :class:`~spm.train.signal.ErasureProbe`), with the membrane off, take the original prediction for
the target ``o``, the surrogate's ``s`` and a word's ``p``.  The word's **closure** is::

    closure = 1 − Σ‖p − o‖² / Σ‖s − o‖²          1: predicts exactly as the target,  0: as far as the surrogate

(sums over the probes, so probes where the concept moves the prediction more weigh more).  A word is a model
synonym when its closure clears the same kind of margin the text calibration uses (:class:`spm.transport.Calibration`):
with ``q`` the second-largest closure of a **null** sample of random whole vocabulary words, the threshold is the
midpoint between the null's upper tail and the target itself, ``q + (1 − q) / 2``.  Nothing is a constant fitted on
one model: a model that draws the target for any text (toy world 2's cloud: random words close up to 0.9 of the
gap) gets a high threshold, one that draws it only when named gets a lower one.

Which words are tried
---------------------
Scoring the whole vocabulary would cost a UNet call per word; the candidates are the :data:`CANDIDATES` whole words
closest to the target in the text encoder's states (:func:`spm.transport.similar_words`): on both toy worlds every
single-word paraphrase the model learned sat within the first 20 (most within the first 5).  The null sample is
:data:`NULL_WORDS` other whole words drawn with a seed of its own.  Each word is one UNet row per probe used
(:data:`PROBES_PER_LEVEL` seeds per noise level), counted in its own meter.  Found synonyms are stored in the
membrane's ``spm_transport["synonyms"]``; the transport then opens the membrane for them as for its concepts
(:attr:`spm.membrane.Membrane.gate_concepts`), and the trainer erases them beside the target on its ``x_t``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..backend import Backend, Conditioning
from ..progress import tally
from .objective import CostMeter, in_chunks, run_unet
from .signal import ErasureProbe

log = logging.getLogger(__name__)

CANDIDATES = 128  # whole words tried per target (closest in the encoder's states): a cost bound, not a fit
NULL_WORDS = 128  # random whole words of the null sample
NULL_RANK = 2  # the null's second-largest closure places the threshold (as the text calibration's null)
PROBES_PER_LEVEL = 4  # held-out seeds per noise level the closure is measured on (of the signal's probes)
MAX_SYNONYMS = 32  # at most this many per target, the closest first: each one is a concept the transport scores
SEED = 4099  # the null sample's draw: apart from the text calibration's null and every training draw
BATCH_ROWS = 64  # UNet rows per call
# the scan may cost at most this share of the training's planned UNet work (:func:`planned_ufe`); a shorter job tries
# fewer words (as many candidates as null words), and one too short for :data:`MIN_WORDS` of each skips the scan:
# a smoke test of a few iterations must not spend minutes finding synonyms (a cost bound, not a fit)
BUDGET_SHARE = 0.5
MIN_WORDS = 16


@dataclass
class SynonymScan:
    """The result of :func:`scan` for one target."""

    target: str
    words: list[str]
    closure: list[float]
    threshold: float
    null_q: float
    null_max: float
    candidates: int
    null: int
    rows: int
    tried: dict[str, float] = field(default_factory=dict)  # every candidate's closure (for the log and tests)

    def to_dict(self) -> dict:
        return {"words": list(self.words), "closure": [round(c, 4) for c in self.closure],
                "threshold": round(self.threshold, 4), "null_q": round(self.null_q, 4),
                "null_max": round(self.null_max, 4), "candidates": self.candidates, "null": self.null,
                "probe_rows": self.rows}


def threshold(null: torch.Tensor) -> tuple[float, float]:
    """``(threshold, q)`` from the null sample's closures (see the module docstring); ``q`` is the
    :data:`NULL_RANK`-th largest (the largest where fewer)."""
    if null.numel() == 0:
        return 1.0, 1.0
    top = null.double().sort(descending=True).values
    q = float(top[min(NULL_RANK, len(top)) - 1])
    q = min(q, 1.0)
    return q + (1.0 - q) / 2.0, q


def planned_ufe(iterations: int, anchors: int, anchor_empty: bool, contexts: bool = False) -> int:
    """The training's planned UNet work in UNet-forward-equivalents: per iteration one no-grad and one grad row
    (forward and backward) for the target and for each anchor, the pool schedule's steady cost (18 without context
    prompts; the reference schedule spends more), and with ``contexts`` the context term's two no-grad rows and one
    grad row (22 at the defaults)."""
    return int(iterations) * (3 * (1 + int(anchors) + int(bool(anchor_empty))) + (4 if contexts else 0))


def words_per_side(planned: int, rows_per_target: int, targets: int) -> int:
    """How many candidate words (and as many null words) each target's scan may try within :data:`BUDGET_SHARE` of
    ``planned`` UFE, at most :data:`CANDIDATES`; 0 when fewer than :data:`MIN_WORDS` fit (the scan is skipped)."""
    n = int(BUDGET_SHARE * planned) // max(1, 2 * rows_per_target * max(1, targets))
    n = min(CANDIDATES, n)
    return n if n >= MIN_WORDS else 0


def probe_row_count(trajectories: int, levels: int, targets: int, target_index: int = 0,
                    per_level: int = PROBES_PER_LEVEL) -> int:
    """How many rows :func:`probe_rows` selects for one target of a probe not drawn yet (the scan's cost plan):
    the probe gives trajectory ``j`` to target ``j mod targets``, and the scan takes at most ``per_level`` of a
    target's seeds at each of the ``levels`` noise levels."""
    seeds = len(range(target_index, max(0, trajectories), max(1, targets)))
    return min(per_level, seeds) * levels


def probe_rows(probe: ErasureProbe, target_index: int, per_level: int = PROBES_PER_LEVEL) -> list[int]:
    """The probe rows of one target: at most ``per_level`` seeds at each of the probe's noise levels (as many as
    :func:`probe_row_count` plans)."""
    out = []
    for lv in probe.levels:
        idx = [i for i, (v, ti) in enumerate(zip(probe.level_of, probe.target_of)) if v == lv and ti == target_index]
        out.extend(idx[:per_level])
    return out


def distances(backend: Backend, stack, probe: ErasureProbe, rows: list[int], words: Conditioning,
              meter: CostMeter | None, autocast: torch.dtype | None = None, batch_rows: int = BATCH_ROWS,
              progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ‖p − o‖², Σ‖p − s‖²)`` per row of ``words`` (membrane off; ``p`` its prediction, ``o``/``s`` the target's
    and the surrogate's) over the probe rows ``rows``, each ``[len(words)]`` float64, in calls of about
    ``batch_rows`` UNet rows, halved (down to one word's rows) whenever a call runs out of memory: on a GPU
    smaller than the batch, or at a large probe size.  ``progress(k)`` is called after each UNet call with the number
    of words it scored."""
    n, r = len(words), len(rows)
    if n == 0 or r == 0:
        return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    x, t = probe.x_t[rows], probe.t[rows]
    o, s = probe.o[rows].double(), probe.s[rows].double()

    def call(i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        cond = words.rows([j for j in range(i, i + k) for _ in range(r)])
        p = run_unet(backend, stack, x.repeat(k, 1, 1, 1), t.repeat(k), cond, [0.0] * (k * r), meter, False, autocast)
        p = p.double().reshape(k, r, *o.shape[1:])
        if progress is not None:
            progress(k)
        return ((p - o.unsqueeze(0)) ** 2).flatten(1).sum(1), ((p - s.unsqueeze(0)) ** 2).flatten(1).sum(1)

    parts = in_chunks(n, max(1, batch_rows // r), call)
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


def closures(backend: Backend, stack, probe: ErasureProbe, rows: list[int], words: Conditioning,
             meter: CostMeter | None, autocast: torch.dtype | None = None, batch_rows: int = BATCH_ROWS,
             progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The closure of each row of ``words`` (membrane off) on the probe rows ``rows``: ``[len(words)]``.
    ``progress(k)`` is called after each UNet call with the number of words it scored."""
    if len(words) == 0 or len(rows) == 0:
        return torch.zeros(len(words))
    den = ((probe.s[rows].double() - probe.o[rows].double()) ** 2).sum().clamp_min(1e-30)
    to_o, _ = distances(backend, stack, probe, rows, words, meter, autocast, batch_rows, progress)
    return (1.0 - to_o / den).float()


def scan(backend: Backend, stack, probe: ErasureProbe, targets: list[str], words: dict,
         meter: CostMeter | None = None, autocast: torch.dtype | None = None,
         progress: Callable[[int, int], None] | None = None) -> dict[str, SynonymScan]:
    """The model synonyms of each target (see the module docstring).  ``words`` is
    :func:`spm.transport.training_candidates`'s ``{"candidates": {target: [word, …]}, "null": [word, …]}``.
    ``progress(done, total)`` counts the words scored (null and candidates of every target)."""
    null_words = list(words.get("null", []))
    null_cond = backend.encode(null_words) if null_words else None
    out: dict[str, SynonymScan] = {}

    def own(target: str) -> list[str]:
        return [w for w in words.get("candidates", {}).get(target, []) if w.strip().lower() != target.strip().lower()]

    step = tally(progress, sum(len(null_words) + len(own(t)) for t in targets))

    for ti, target in enumerate(targets):
        rows = probe_rows(probe, ti)
        cands = own(target)
        nul = (closures(backend, stack, probe, rows, null_cond, meter, autocast, progress=step)
               if null_cond is not None else torch.zeros(0))
        thr, q = threshold(nul)
        cl = (closures(backend, stack, probe, rows, backend.encode(cands), meter, autocast, progress=step)
              if cands else torch.zeros(0))
        tried = {w: float(c) for w, c in zip(cands, cl)}
        keep = sorted(((w, c) for w, c in tried.items() if c >= thr and c > 0), key=lambda x: -x[1])[:MAX_SYNONYMS]
        out[target] = SynonymScan(target, [w for w, _ in keep], [c for _, c in keep], thr, q,
                                  float(nul.max()) if nul.numel() else float("nan"), len(cands), len(null_words),
                                  len(rows), tried)
        if keep:
            log.info("SPM: %s: the model draws it for %d more word%s (closure ≥ %.2f, random words reach %.2f): %s",
                     target, len(keep), "" if len(keep) == 1 else "s", thr, q,
                     ", ".join(f"{w} {c:.2f}" for w, c in keep))
    return out


def metadata(found: dict[str, SynonymScan]) -> dict:
    """The ``spm_transport`` entries: ``synonyms`` (target → words, what the transport reads) and
    ``synonym_scan`` (the measurement behind them)."""
    return {"synonyms": {t: s.words for t, s in found.items()},
            "synonym_scan": {t: s.to_dict() for t, s in found.items()}}


__all__ = ["BUDGET_SHARE", "CANDIDATES", "MAX_SYNONYMS", "MIN_WORDS", "NULL_WORDS", "PROBES_PER_LEVEL", "SEED",
           "SynonymScan", "closures", "distances", "metadata", "planned_ufe", "probe_row_count", "probe_rows", "scan",
           "threshold", "words_per_side"]
