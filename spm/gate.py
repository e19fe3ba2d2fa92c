"""The membrane gate: a Facilitated Transport score that reads the membrane itself, not only the prompt's words.

The word metrics (``tokenuni``, ``ngram``) open only for prompts that name a concept: an adversarial prompt
(gradient-guided tokens, or token embeddings no tokenizer produces) that avoids the concept's words scores 0
and the membrane switches itself off.  The gate instead asks the membrane whether a row feeds what it erases.

The cross-attention ``to_k``/``to_v`` membranes see the text states directly: their down projection
``a_k(h) = lora_down_k · h`` of a token state ``h`` is how strongly module ``k`` acts on that token (their
change of the keys and values is ``up_k · a_k(h)``).  The gate's raw score of a conditioning row is

    raw(row) = max over token positions j of  mean over the K key/value modules of  ‖a_k(h_j)‖ / σ_k

with ``σ_k`` the RMS of ``‖a_k‖`` over the token states of the null below, so that every module counts in its
own units.  One ``[T, d] × [d, K·r]`` product per row: microseconds (the README's cost table).

**Calibration** (per membrane and encoder, :func:`compute_gate`): a fixed, seeded null of prompts — random
vocabulary tokens and random whole words, 1 … 75 tokens long, plus the empty prompt — gives ``q``, the null's
top (its second-largest raw score, as the ``ngram`` calibration: one random word that happens to be a synonym
of the concept cannot move it); the concept's own literal prompts (``c``, ``a c``, ``the c``, ``a photo of a c``)
give the high end ``top`` (their lowest raw score).  ``lo = q + (top − q) · LO_FRAC``,
``hi = q + (top − q) · HI_FRAC`` and ``score = clamp((raw − lo) / (hi − lo), 0, 1)``: every row at or below
the null's top gets exactly 0 (its images stay bit-identical), nothing in it is a number chosen on one model.
A membrane whose literal prompts do not rise above the null is *unusable* (its gate always scores 0).

The calibration is stored in the membrane file (``spm_transport["gate"]``) at training time, with the
encoder's fingerprint and a checksum of the gate modules' weights; a host whose encoder (or a file whose
weights) differ recomputes it — once, while the text encoder is loaded.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch

from .progress import tally
from .transport import BOS, FINGERPRINT_RTOL, NULL_RANK, _whole_words, stored_mismatch

log = logging.getLogger("spm")

GATE_VERSION = 1
# null prompt lengths (tokens): short phrases to a full 75-token chunk, since the row score is a maximum over
# positions and so grows with the prompt's length
NULL_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 75)
NULL_PER_LENGTH = 32  # half random regular tokens, half random whole words
NULL_SEED = 3
CONCEPT_FORMS = ("{}", "a {}", "the {}", "a photo of a {}")
# the ramp, as fractions of the headroom between the null's top (0) and the concept's literal prompts (1): the
# calibrated ngram's rule — a row counts only once it is closer to the concept than to the edge of what random
# text reaches (lo, the midpoint), full strength a quarter of the headroom further on (hi).  A first run with
# 1/4 and 1/2 opened the square membrane's gate for one sibling-object prompt (bench/results/gate_lofrac025.json)
LO_FRAC = 0.5
HI_FRAC = 0.75
# characters that the WebUIs read as prompt syntax (attention, alternation, LoRA tags): kept out of the null
SYNTAX = frozenset("\\()[]{}:|<>")
FINGERPRINT_TEXT = "a red circle background"
GATE_SUFFIXES = ("attn2_to_k", "attn2_to_v")
BATCH = 8  # prompts per encoder call; Interrupt is polled between calls (64 took 14–17 s in a CPU WebUI)

ConditioningEncoder = Callable[[list[str]], torch.Tensor]
"""``encode(texts) -> [n, T, d]``: conditioning exactly as the UNet receives it."""


def gate_params() -> dict:
    """What a stored gate depends on besides the encoder and the weights (another value: recomputed)."""
    return {"version": GATE_VERSION, "lengths": list(NULL_LENGTHS), "per_length": NULL_PER_LENGTH, "seed": NULL_SEED,
            "forms": list(CONCEPT_FORMS), "lo_frac": LO_FRAC, "hi_frac": HI_FRAC}


def gate_modules(membrane) -> list[tuple[str, torch.Tensor]]:
    """``(stem, lora_down [r, d])`` of the membrane's cross-attention key/value layers (they read the text states)."""
    out = []
    for stem, layer in membrane.layers.items():
        if getattr(layer, "kind", None) == "linear" and stem.endswith(GATE_SUFFIXES):
            out.append((stem, layer.down_matrix().detach().float().cpu()))
    return out


def _checksum(mods: Sequence[tuple[str, torch.Tensor]]) -> list[float]:
    return [float(f"{v:.7g}") for _, d in mods for v in (float(d.sum()), float(d.norm()))]


def _checksum_distance(a: Sequence[float] | None, b: Sequence[float]) -> float:
    if a is None or len(a) != len(b):
        return float("inf")
    x, y = torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64)
    return float((x - y).norm() / y.norm().clamp_min(1e-12))


@lru_cache(maxsize=1)
def _pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(random-token pool, whole-word pool) as text pieces of the CLIP vocabulary, prompt syntax left out."""
    from .tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    inv = {i: t for t, i in tok.get_vocab().items()}

    def text(t: str) -> str:
        return tok.convert_tokens_to_string([t]).strip()

    pieces = []
    for i in range(256, BOS):
        t = inv.get(i)
        if t is None or SYNTAX & set(t):
            continue
        s = text(t)
        if s:
            pieces.append((s, t.endswith("</w>")))
    words = tuple(text(inv[i]) for i in _whole_words() if i in inv)
    return tuple(s for s, _ in pieces), words


def _fit(pieces: list[str], n: int) -> str:
    """``pieces`` joined, cut to at most ``n`` tokens of the CLIP tokenizer (a piece may re-tokenize as several)."""
    from .tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    while pieces:
        text = " ".join(pieces)
        if len(tok(text, verbose=False).input_ids) - 2 <= n:  # a length check: no "longer than 77" warning
            return text
        pieces = pieces[:-1]
    return ""


def null_prompts(seed: int = NULL_SEED) -> list[str]:
    """The fixed, seeded null prompts (the same for every model and membrane), the empty prompt first; each at
    most its length in tokens (so none is truncated by a 77-token encoder)."""
    return [""] + random_prompts(NULL_LENGTHS, NULL_PER_LENGTH, seed)


def random_prompts(lengths: Sequence[int], per_length: int, seed: int) -> list[str]:
    """Seeded random text: per length ``n`` (in tokens), ``per_length`` prompts, half of random regular tokens and
    half of random whole words of the CLIP vocabulary (prompt syntax left out), each at most ``n`` tokens long."""
    toks, words = _pools()
    out = []
    for n in lengths:
        g = torch.Generator().manual_seed(seed * 1000 + n)
        half = per_length // 2 if words else 0
        for _ in range(per_length - half):
            out.append(_fit([toks[i] for i in torch.randint(len(toks), (n,), generator=g).tolist()], n))
        for _ in range(half):
            out.append(_fit([words[i] for i in torch.randint(len(words), (n,), generator=g).tolist()], n))
    return out


def concept_prompts(concepts: Sequence[str]) -> list[str]:
    return [f.format(c) for c in concepts for f in CONCEPT_FORMS]


def conditioning_fingerprint(encode: ConditioningEncoder, text: str = FINGERPRINT_TEXT, positions: int = 8,
                             dims: int = 16) -> dict:
    """Identifies the encoder behind ``encode`` (the first states of a fixed prompt on seeded random directions)."""
    with torch.no_grad():
        st = encode([text])[0, :positions].detach().float().cpu()
    g = torch.Generator().manual_seed(0)
    proj = st @ torch.randn(st.shape[-1], dims, generator=g) / st.shape[-1] ** 0.5
    return {"dim": int(st.shape[-1]), "probe": text, "proj": [float(f"{v:.6g}") for v in proj.reshape(-1).tolist()]}


def _encode_all(encode: ConditioningEncoder, texts: list[str],
                progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Every text's conditioning, in batches of :data:`BATCH`; ``progress(k)`` after each batch of ``k``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), BATCH):
            batch = texts[i:i + BATCH]
            out.extend(encode(batch).detach().float().cpu())
            if progress is not None:
                progress(len(batch))
    return out


@dataclass
class Gate:
    """One membrane's gate on one encoder (see the module docstring)."""

    stems: tuple[str, ...]
    sigma: tuple[float, ...]
    q: float
    top: float
    lo: float
    hi: float
    quantiles: dict[str, float]
    samples: int
    usable: bool
    checksum: list[float]
    fingerprint: dict | None
    source: str = "computed"  # "file" (the membrane's stored gate) or "computed" (here)
    reason: str = ""
    _weights: dict = field(default_factory=dict, repr=False, compare=False)  # (device) -> ([R, d], rank)

    # --- scoring -----------------------------------------------------------------------------
    def bind(self, mods: Sequence[tuple[str, torch.Tensor]]) -> "Gate":
        """Attach the membrane's down projections (scaled by 1/σ) for scoring."""
        by = dict(mods)
        downs = [by[s] / max(sg, 1e-12) for s, sg in zip(self.stems, self.sigma) if s in by]
        ranks = {d.shape[0] for d in downs}
        self._weights = {"cpu": (torch.cat(downs, 0).contiguous(), ranks.pop() if len(ranks) == 1 else None, downs)} \
            if downs else {}
        return self

    def _on(self, device: torch.device):
        base = self._weights.get("cpu")
        if base is None:
            return None
        key = str(device)
        hit = self._weights.get(key)
        if hit is None:
            hit = self._weights[key] = (base[0].to(device), base[1], [d.to(device) for d in base[2]])
        return hit

    def token_scores(self, ctx: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` → ``[B, T]``: the mean normalised key/value activation of each token state."""
        hit = self._on(ctx.device)
        if hit is None or ctx.shape[-1] != hit[0].shape[1]:
            return torch.zeros(ctx.shape[:2])
        w, rank, downs = hit
        x = ctx.detach().float()
        if rank is not None:
            a = x @ w.t()  # [B, T, K·r]
            z = a.abs() if rank == 1 else a.view(*a.shape[:2], -1, rank).norm(dim=-1)
        else:  # modules of different ranks
            z = torch.stack([(x @ d.t()).norm(dim=-1) for d in downs], -1)
        return z.mean(-1)

    def raw(self, ctx: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` → ``[B]`` raw scores (float32, CPU)."""
        if ctx.ndim != 3 or ctx.shape[0] == 0:
            return torch.zeros(ctx.shape[0] if ctx.ndim else 0)
        return self.token_scores(ctx).amax(1).float().cpu()

    def map(self, raw: torch.Tensor) -> torch.Tensor:
        if not self.usable:
            return torch.zeros_like(raw)
        return ((raw - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)

    def score(self, ctx: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` → ``[B]`` in [0, 1]; 0 for every row at or below the calibration's ``lo``."""
        return self.map(self.raw(ctx))

    # --- storage ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"params": gate_params(), "stems": list(self.stems), "sigma": [float(f"{s:.7g}") for s in self.sigma],
                "q": self.q, "top": self.top, "lo": self.lo, "hi": self.hi, "quantiles": self.quantiles,
                "samples": self.samples, "usable": self.usable, "checksum": list(self.checksum),
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict, reason: str = "") -> "Gate":
        return cls(tuple(str(s) for s in d["stems"]), tuple(float(s) for s in d["sigma"]), float(d["q"]), float(d["top"]),
                   float(d["lo"]), float(d["hi"]), {str(k): float(v) for k, v in d["quantiles"].items()},
                   int(d["samples"]), bool(d["usable"]), [float(v) for v in d["checksum"]], d.get("fingerprint"),
                   "file", reason)


def _unusable(mods, fingerprint, reason: str) -> Gate:
    return Gate(tuple(s for s, _ in mods), tuple(1.0 for _ in mods), 0.0, 0.0, 0.0, 1.0, {}, 0, False, _checksum(mods),
                fingerprint, "computed", reason)


def compute_gate(membrane, encode: ConditioningEncoder, reason: str = "", fingerprint: dict | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Gate:
    """Calibrate ``membrane``'s gate on the encoder behind ``encode`` (see the module docstring).
    ``progress(done, total)`` counts the prompts encoded (the null's and the concepts'), from ``(0, total)``."""
    mods = gate_modules(membrane)
    fp = fingerprint if fingerprint is not None else conditioning_fingerprint(encode)
    if not mods:
        return _unusable(mods, fp, "the membrane has no cross-attention key/value layers")
    concepts = [c for c in membrane.concepts if str(c).strip()]
    if not concepts:
        return _unusable(mods, fp, "the membrane names no concept")
    null_texts, lit_texts = null_prompts(), concept_prompts(concepts)
    step = tally(progress, len(null_texts) + len(lit_texts))
    null = _encode_all(encode, null_texts, step)
    width = null[0].shape[-1]
    mods = [(s, d) for s, d in mods if d.shape[1] == width]
    if not mods:
        return _unusable(gate_modules(membrane), fp, f"no key/value layer reads {width}-wide text states")
    # σ_k: RMS of each module's activation norm over every token state of the null
    states = torch.cat([n.reshape(-1, width) for n in null], 0)
    sigma = tuple(float(((states @ d.t()).norm(dim=-1).pow(2).mean()).sqrt()) for _, d in mods)
    gate = Gate(tuple(s for s, _ in mods), sigma, 0.0, 0.0, 0.0, 1.0, {}, len(null), True, _checksum(mods), fp,
                "computed", reason).bind(mods)
    null_raw = torch.cat([gate.raw(n[None]) for n in null]).double()
    lit = _encode_all(encode, lit_texts, step)
    lit_raw = torch.cat([gate.raw(x[None]) for x in lit]).double()
    ranked = null_raw.sort(descending=True).values
    q, top = float(ranked[min(NULL_RANK, len(ranked)) - 1]), float(lit_raw.min())
    head = top - q
    gate.q, gate.top = q, top
    gate.quantiles = {**{str(p): float(torch.quantile(null_raw, p)) for p in (0.5, 0.9, 0.99)},
                      "second": q, "max": float(ranked[0]), "concept_min": top, "concept_max": float(lit_raw.max())}
    gate.usable = bool(head > 1e-6 * max(1.0, abs(top)))
    if gate.usable:
        gate.lo, gate.hi = q + LO_FRAC * head, q + HI_FRAC * head
    else:
        gate.lo, gate.hi = q, q + 1.0
        gate.reason = (reason + "; " if reason else "") + \
            "the concept's literal prompts do not drive the membrane beyond random text: the gate stays shut"
    return gate


def stored_gate(stored: dict | None, membrane, fingerprint: dict) -> tuple[Gate | None, str]:
    """The membrane file's gate if it applies to this encoder and these weights, else why not."""
    entry = (stored or {}).get("gate")
    if not isinstance(entry, dict):
        return None, "the membrane file has no gate calibration"
    dist, why = stored_mismatch(entry, gate_params(), fingerprint, "the file's gate was calibrated with other settings",
                                "the one the file's gate was calibrated on")
    if why:
        return None, why
    try:
        gate = Gate.from_dict(entry, f"this encoder matches the one it was made on (fingerprint distance {dist:.2g})")
    except (KeyError, TypeError, ValueError):
        return None, "the file's gate calibration is unreadable"
    have = dict(gate_modules(membrane))
    mods = [(s, have[s]) for s in gate.stems if s in have]
    if len(mods) != len(gate.stems) or _checksum_distance(gate.checksum, _checksum(mods)) > FINGERPRINT_RTOL:
        return None, "the file's gate was calibrated for other weights"
    return gate.bind(mods), gate.reason


class GateCache:
    """The gates of the membranes one :class:`~spm.attach.Transport` scores (one encoder), computed once each."""

    def __init__(self) -> None:
        self._gates: dict[int, tuple[weakref.ref, Gate]] = {}
        self.fingerprint: dict | None = None

    def peek(self, membrane) -> Gate | None:
        hit = self._gates.get(id(membrane))
        return hit[1] if hit is not None and hit[0]() is membrane else None

    def get(self, membrane, encode: ConditioningEncoder) -> Gate:
        gate = self.peek(membrane)
        if gate is not None:
            return gate
        if self.fingerprint is None:
            self.fingerprint = conditioning_fingerprint(encode)
        gate, why = stored_gate(getattr(membrane.info, "transport", None), membrane, self.fingerprint)
        if gate is None:
            gate = compute_gate(membrane, encode, reason=why, fingerprint=self.fingerprint)
            log.info("SPM: gate of %s calibrated here (%s)", getattr(membrane, "name", "membrane"), why)
        for k in [k for k, (r, _) in self._gates.items() if r() is None]:
            del self._gates[k]
        self._gates[id(membrane)] = (weakref.ref(membrane), gate)
        return gate

    def clear(self) -> None:
        self._gates.clear()
        self.fingerprint = None

    def __len__(self) -> int:
        return len(self._gates)


def training_gate(backend, membrane, progress: Callable[[int, int], None] | None = None) -> dict:
    """The ``spm_transport["gate"]`` entry a trainer stores for the trained ``membrane`` (best effort: ``{}`` when
    it fails, and the gate is then calibrated on first use).  ``progress``: :func:`compute_gate`'s count."""
    try:
        with torch.no_grad():
            return compute_gate(membrane, lambda texts: backend.encode(list(texts)).context,
                                progress=progress).to_dict()
    except Exception as e:  # never fail a training run for it
        log.warning("SPM: gate calibration at training time failed (%s); it will be computed on first use", e)
        return {}


__all__ = ["CONCEPT_FORMS", "Gate", "GateCache", "compute_gate", "concept_prompts", "conditioning_fingerprint",
           "gate_modules", "gate_params", "null_prompts", "random_prompts", "stored_gate", "training_gate"]
