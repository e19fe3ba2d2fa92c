"""Facilitated Transport: how strongly each membrane acts on each row of a UNet batch.

A membrane's strength for one row = user weight × facilitate factor × clamp(max over the membrane's
concepts of score(row, concept), 0, 1).  Scores compare the row's own conditioning (the text-encoder
output that the UNet receives) and, where known, its token ids with those of each erased concept.

Reference metrics (Con6924/SPM), kept formula-for-formula:

* ``clipcos``: cosine between the flattened text-encoder outputs of prompt and concept — the whole
  padded 77 × d sequence, BOS and padding included.  Longer prompts (A1111 chunks of 77) take the
  maximum over their 77-token chunks.
* ``tokenuni``: |tokens(P) ∩ tokens(E)| / |tokens(E)| over token-id sets, special tokens removed.
* ``clipcos_tokenuni`` (reference default): the maximum of the two.
* ``off``: 1 for every row.

Ours, selectable (the benchmark compares them on the toy world):

* ``tokenwin``: best window of per-token cosines between the prompt's *content* token states and the
  concept's (BOS and padding ignored); ``tokenwin_tokenuni``: its maximum with ``tokenuni``.
* ``ngram`` (calibrated): each window of 1 … m + 2 of the prompt's tokens (m = the concept's length),
  *encoded alone*, against the concept encoded alone, by its last content state and by the EOS state after it
  (CLIP's summary of the window, which the UNet reads too); states centred on the mean state of a seeded bank of
  random vocabulary tokens; the best window's similarity is mapped through the concept's
  :class:`Calibration` on this encoder — thresholds placed between the upper tail of a fixed, seeded null
  (random tokens, random words and the vocabulary's most frequent words) and the concept itself, stored in the membrane file at training time
  (``spm_transport``) and recomputed when the host's encoder differs.  ``ngram_tokenuni`` (the default): its
  maximum with ``tokenuni``, so a literal mention always gets full strength.
* ``ngram_fixed`` / ``ngram_fixed_tokenuni`` (the previous default): windows as long as the concept only, the
  cosine mapped through ``clamp((s − 0.85) / (0.92 − 0.85), 0, 1)`` — thresholds chosen on the toy encoder.
* ``membrane`` (the membrane gate, :mod:`spm.gate`): how strongly the row's token states drive the membrane's
  cross-attention key/value down projections, calibrated per membrane and encoder so that rows at or below a
  seeded null of random text get exactly 0; it opens for prompts that avoid the concept's words too.
  ``robust`` (:data:`ROBUST_METRIC`): its maximum with ``ngram_tokenuni``.  The gate is per membrane, not per
  concept: :func:`concept_scores` gives their words part only, :class:`spm.attach.Transport` adds the gate.

This module knows nothing of any host: a host supplies an ``encode(texts)`` function returning
conditioning exactly as its UNet receives it, plus token ids.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("spm")

BOS, EOS = 49406, 49407


class Encoder(Protocol):
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """``texts`` → (conditioning ``[n, T, d]`` as the UNet sees it, token ids per text)."""


def _chunks(x: torch.Tensor, length: int) -> torch.Tensor:
    """``[T, d]`` → ``[T // length, length * d]`` (T a multiple of ``length``; else one chunk)."""
    t = x.shape[0]
    if t % length or t == length:
        return x.reshape(1, -1)
    return x.reshape(t // length, -1)


def clipcos(prompt: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """Reference ``clipcos``: cosine of flattened sequences. ``prompt [B, T, d]``, ``concept [T0, d]`` → ``[B]``."""
    c = concept.float().reshape(-1)
    t0 = concept.shape[0]
    out = []
    for row in prompt.float():
        if row.shape[0] == t0:
            out.append(F.cosine_similarity(row.reshape(1, -1), c[None], dim=1)[0])
        elif row.shape[0] % t0 == 0:
            out.append(F.cosine_similarity(_chunks(row, t0), c[None], dim=1).max())
        else:  # incomparable lengths: compare the common prefix
            n = min(row.shape[0], t0)
            out.append(F.cosine_similarity(row[:n].reshape(1, -1), concept[:n].float().reshape(1, -1), dim=1)[0])
    return torch.stack(out) if out else torch.zeros(0)


def content_tokens(ids: Sequence[int] | None, special: frozenset[int] = frozenset({BOS, EOS, 0})) -> set[int]:
    """Token ids without BOS/EOS/padding (pad is EOS in SD1, ``!`` = 0 in SD2/SDXL)."""
    if ids is None:
        return set()
    return {int(i) for i in ids if int(i) not in special}


def tokenuni(prompt_tokens: Sequence[Sequence[int] | None], concept_tokens: Sequence[int]) -> torch.Tensor:
    """Reference ``tokenuni``: share of the concept's token ids present in the prompt. → ``[B]``."""
    ce = content_tokens(concept_tokens)
    if not ce:
        return torch.zeros(len(prompt_tokens))
    return torch.tensor([len(content_tokens(p) & ce) / len(ce) for p in prompt_tokens], dtype=torch.float32)


@dataclass
class ConceptEmbedding:
    text: str
    embedding: torch.Tensor  # [T, d] float32 on CPU
    tokens: list[int]


MetricFn = Callable[[torch.Tensor, Sequence[Sequence[int] | None], ConceptEmbedding], torch.Tensor]


def _m_clipcos(ctx, toks, ce):
    return clipcos(ctx, ce.embedding)


def _m_tokenuni(ctx, toks, ce):
    return tokenuni(toks, ce.tokens)


def _m_clipcos_tokenuni(ctx, toks, ce):
    return torch.maximum(clipcos(ctx, ce.embedding), tokenuni(toks, ce.tokens))


def content_positions(ids: Sequence[int] | None, length: int) -> int:
    """Number of content tokens (after BOS, before EOS) of a prompt, capped to the sequence length."""
    if ids is None:
        return 0
    return min(sum(1 for i in ids if int(i) not in (BOS, EOS)), length - 2)


def tokenwin(prompt: torch.Tensor, row_tokens: Sequence[Sequence[int] | None], concept: ConceptEmbedding) -> torch.Tensor:
    """Window match over content tokens only (ours; padding and BOS ignored).

    For each window of the prompt's content-token states as long as the concept's, the mean per-token
    cosine with the concept's content-token states; the score is the best window. Rows whose tokens are
    unknown fall back to the reference ``clipcos``. ``prompt [B, T, d]`` → ``[B]``.
    """
    m = content_positions(concept.tokens, concept.embedding.shape[0])
    if m == 0:
        return clipcos(prompt, concept.embedding)
    e = F.normalize(concept.embedding[1 : 1 + m].float(), dim=-1)
    out = []
    for row, ids in zip(prompt.float(), row_tokens):
        n = content_positions(ids, row.shape[0])
        if n == 0:
            out.append(clipcos(row[None], concept.embedding)[0] if ids is None else torch.tensor(0.0))
            continue
        p = F.normalize(row[1 : 1 + n], dim=-1)
        c = p @ e.T  # [n, m] per-token cosines
        if n < m:
            out.append(torch.stack([c[i, i] for i in range(n)]).sum() / m)
            continue
        diag = torch.stack([c[j : j + n - m + 1, j] for j in range(m)], 1)  # [windows, m]
        out.append(diag.mean(1).max())
    return torch.stack(out) if out else torch.zeros(0)


def _m_tokenwin(ctx, toks, ce):
    return tokenwin(ctx, toks, ce)


def _m_tokenwin_tokenuni(ctx, toks, ce):
    return torch.maximum(tokenwin(ctx, toks, ce), tokenuni(toks, ce.tokens))


def _m_off(ctx, toks, ce):
    return torch.ones(ctx.shape[0])


# --------------------------------------------------------------------------------------- n-gram states
PhraseEncoder = Callable[[list[tuple[int, ...]]], list[torch.Tensor]]
"""``encode_ids(seqs)``: each token-id tuple encoded alone (``[BOS, *ids, EOS]``) → its content states followed by
the state of the EOS after them, ``[m + 1, d]`` (an encoder that returns the content states only, ``[m, d]``, still
works: its windows are compared by their content states alone)."""


def causal_phrase_encoder(run: Callable[[torch.Tensor], torch.Tensor], bos: int = BOS, eos: int = EOS,
                          max_length: int = 77) -> PhraseEncoder:
    """A fast :data:`PhraseEncoder` for causal text encoders (CLIP): ``run(ids [n, L]) -> states [n, L, d]``.

    Each window is encoded as ``[BOS, *ids, EOS]``, the batch padded at the end to its longest window
    instead of to ``max_length`` tokens.  A causal encoder's state at a position depends only on the
    tokens before it, so the content states equal those of the full padded encoding (to float rounding)
    at a fraction of the cost.  Hosts should check that equality once (see :func:`checked_phrase_encoder`).
    """

    def encode_ids(seqs: list[tuple[int, ...]]) -> list[torch.Tensor]:
        seqs = [tuple(int(i) for i in q)[: max_length - 2] for q in seqs]
        if not seqs:
            return []
        ids = torch.full((len(seqs), max(len(q) for q in seqs) + 2), eos, dtype=torch.long)
        ids[:, 0] = bos
        for i, q in enumerate(seqs):
            if q:
                ids[i, 1:1 + len(q)] = torch.tensor(q, dtype=torch.long)
        with torch.no_grad():
            states = run(ids)
        return [states[i, 1:2 + max(1, len(q))] for i, q in enumerate(seqs)]  # content states, then the EOS

    return encode_ids


PROBE = (320, 736, 7117, 5994)  # "a red circle background": ids that survive decoding and re-encoding


def checked_phrase_encoder(fast: PhraseEncoder, reference: PhraseEncoder, rtol: float = 1e-3,
                           probe: tuple[int, ...] = PROBE) -> PhraseEncoder:
    """``fast`` once its states have matched ``reference``'s on the first call; ``reference`` otherwise.

    The first call encodes ``probe`` both ways and compares (max difference ≤ ``rtol`` × the largest state
    magnitude).  The probe is a fixed phrase: an arbitrary token need not survive the reference path's
    decode-and-re-encode (``ing</w>`` decodes to ``ing``), and would fail the check for that reason.  A host
    whose encoding differs from the fast path (clip skip, a custom text encoder) thus keeps the exact,
    slower path (logged at INFO).
    """
    chosen: list[PhraseEncoder] = []

    def encode_ids(seqs: list[tuple[int, ...]]) -> list[torch.Tensor]:
        if not seqs:
            return []
        if not chosen:
            try:
                a = fast([probe])[0].detach().float().cpu()
            except Exception as e:  # a host whose encoder cannot take raw ids keeps the reference path
                log.info("SPM: fast phrase encoding unavailable (%s); using the full encoder", e)
                chosen.append(reference)
                return reference(seqs)
            b = reference([probe])[0].detach().float().cpu()
            ok = a.shape == b.shape and bool((a - b).abs().max() <= rtol * max(1.0, float(b.abs().max())))
            if not ok:
                log.info("SPM: fast phrase encoding differs from the full encoder here; using the full encoder")
            chosen.append(fast if ok else reference)
        return chosen[0](seqs)

    return encode_ids


# ``ngram`` maps its cosine through clamp((s - lo) / (hi - lo), 0, 1): windows below ``lo`` leave the row alone.
NGRAM_LO = 0.85
NGRAM_HI = 0.92
# the states are centred on the mean state of this many random vocabulary tokens (each encoded alone)
NGRAM_BANK = 64


def content_ids(ids: Sequence[int] | None, special: frozenset[int] = frozenset({BOS, EOS, 0})) -> list[int]:
    """The content token ids of a row in order (BOS, EOS and padding removed)."""
    if ids is None:
        return []
    return [int(i) for i in ids if int(i) not in special]


def windows(ids: Sequence[int] | None, m: int) -> list[tuple[int, ...]]:
    """Distinct windows of ``m`` consecutive content tokens (the whole content if shorter)."""
    c = content_ids(ids)
    if not c or m <= 0:
        return []
    if len(c) <= m:
        return [tuple(c)]
    return list(dict.fromkeys(tuple(c[j:j + m]) for j in range(len(c) - m + 1)))


class PhraseCache:
    """Context-free encoder states of short token sequences (each encoded alone), centred and unit-normalised.

    Text-encoder states share a large common direction (any two words' states have a high cosine), so the
    states are centred on the mean state of ``bank`` random vocabulary tokens — computed once per encoder,
    with a fixed seed — before they are compared.  Hosts :meth:`prepare` the windows of their prompts while
    the text encoder is loaded (the WebUI may offload it during sampling); :meth:`get` never encodes.
    """

    def __init__(self, capacity: int = 50000, batch: int = 64, bank: int = NGRAM_BANK, seed: int = 0):
        self.capacity, self.batch, self.bank, self.seed = capacity, batch, bank, seed
        self._states: dict[tuple[int, ...], torch.Tensor] = {}
        self._eos: dict[tuple[int, ...], torch.Tensor] = {}  # the EOS state after each sequence (see summary_unit)
        self.center: torch.Tensor | None = None  # [d] mean state of the random-token bank
        self.eos_center: torch.Tensor | None = None  # [d] mean EOS state of the bank (None: the encoder gives none)
        self.best: dict[tuple, float] = {}  # (row ids, concept text, m) -> best window cosine, once all were known
        self.prepared: set[tuple] = set()  # (row ids, m) whose windows are all encoded
        self.calibrations: dict[tuple, "Calibration"] = {}  # (concept text, concept ids) -> its calibration
        self.fingerprint: dict | None = None  # this encoder's fingerprint (see encoder_fingerprint)
        # (concept text, concept ids, word ids or None for the default vocabulary) -> each word's similarity to the
        # concept (vocabulary_similarity): a training job's neighbour scan and synonym scan read the vocabulary once
        self.vocabulary_sims: dict[tuple, torch.Tensor] = {}

    def _encode(self, seqs: list[tuple[int, ...]], encode_ids: PhraseEncoder) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in range(0, len(seqs), self.batch):
            with torch.no_grad():
                out.extend(st.detach().float().cpu() for st in encode_ids(seqs[i:i + self.batch]))
        return out

    def unit(self, states: torch.Tensor) -> torch.Tensor:
        """Centred, unit-normalised ``[m, d]`` states (call after :meth:`prepare` has set the centre)."""
        x = states.detach().float().cpu()
        if self.center is not None:
            x = x - self.center
        return F.normalize(x, dim=-1)

    def summary_unit(self, state: torch.Tensor) -> torch.Tensor | None:
        """Centred, unit-normalised EOS states ``[d]`` or ``[n, d]`` (None where the encoder gave no EOS states)."""
        if self.eos_center is None:
            return None
        return F.normalize(state.detach().float().cpu() - self.eos_center, dim=-1)

    def _split(self, seq: tuple[int, ...], st: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(content states, EOS state or None) of one encoded sequence."""
        n = max(1, len(seq))
        if st.shape[0] == n + 1:
            return st[:n], st[n]
        return st, None

    def ensure_center(self, encode_ids: PhraseEncoder) -> None:
        """Compute the centring bank's mean states once per encoder (see the class docstring)."""
        if self.center is not None or self.bank <= 0:
            return
        g = torch.Generator().manual_seed(self.seed)
        ids = [(i,) for i in torch.randint(256, BOS, (self.bank,), generator=g).tolist()]  # regular tokens only
        split = [self._split(q, st) for q, st in zip(ids, self._encode(ids, encode_ids))]
        self.center = torch.stack([c[0] for c, _ in split]).mean(0)
        if all(e is not None for _, e in split):
            self.eos_center = torch.stack([e for _, e in split]).mean(0)

    def prepare(self, seqs: Sequence[tuple[int, ...]], encode_ids: PhraseEncoder) -> int:
        """Encode the sequences not cached yet (and, the first time, the centring bank); returns how many
        sequences were encoded."""
        todo = [t for t in dict.fromkeys(tuple(int(i) for i in q) for q in seqs) if t and t not in self._states]
        if todo:
            self.ensure_center(encode_ids)
        for seq, st in zip(todo, self._encode(todo, encode_ids)):
            content, eos = self._split(seq, st)
            self._states[seq] = self.unit(content)
            e = self.summary_unit(eos) if eos is not None else None
            if e is not None:
                self._eos[seq] = e
        if len(self._states) > self.capacity:  # drop the oldest half
            for k in list(self._states)[: len(self._states) // 2]:
                del self._states[k]
                self._eos.pop(k, None)
            self.best.clear()
            self.prepared.clear()
        return len(todo)

    def get(self, seq: tuple[int, ...]) -> torch.Tensor | None:
        return self._states.get(seq)

    def get_summary(self, seq: tuple[int, ...]) -> torch.Tensor | None:
        """The sequence's centred unit EOS state (None if not encoded, or the encoder gave none)."""
        return self._eos.get(seq)

    def concept_states(self, concept: "ConceptEmbedding", m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(centred unit content states ``[m, d]``, centred unit EOS state or None) of a concept's full encoding."""
        c = self.unit(concept.embedding[1:1 + m])
        e = None
        if self.eos_center is not None and concept.embedding.shape[0] > 1 + m:
            e = self.summary_unit(concept.embedding[1 + m])
        return c, e

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        self._states.clear()
        self._eos.clear()
        self.best.clear()
        self.prepared.clear()
        self.calibrations.clear()
        self.vocabulary_sims.clear()
        self.fingerprint = None
        self.center = None
        self.eos_center = None


def ngram(row_tokens: Sequence[Sequence[int] | None], concept: ConceptEmbedding, phrases: PhraseCache,
          lo: float = NGRAM_LO, hi: float = NGRAM_HI) -> torch.Tensor:
    """Context-free phrase match (ours): the best window of the prompt's tokens, encoded alone, against the
    concept encoded alone, mapped through ``clamp((s - lo) / (hi - lo), 0, 1)``. → ``[B]``.

    ``s`` is the mean per-token cosine between the centred states (see :class:`PhraseCache`) of a window of
    ``m`` content tokens of the row (``m`` = the concept's content length) and the concept's content states.
    Unlike ``clipcos`` it ignores BOS and padding and the words around the window, which on our
    measurements made every prompt look alike.
    Rows with unknown tokens, or windows not prepared in ``phrases``, score 0.
    """
    m = content_positions(concept.tokens, concept.embedding.shape[0])
    if m == 0 or not len(phrases):
        return torch.zeros(len(row_tokens))
    c = phrases.unit(concept.embedding[1:1 + m])
    out = []
    for ids in row_tokens:
        key = (tuple(ids), concept.text, m) if ids is not None else None
        best = phrases.best.get(key) if key is not None else None
        if best is None:
            best, complete = 0.0, True
            for w in windows(ids, m):
                st = phrases.get(w)
                if st is None:
                    complete = False
                    continue
                k = min(st.shape[0], m)
                best = max(best, float((st[:k] * c[:k]).sum() / m))
            if key is not None and complete:
                phrases.best[key] = best
        out.append(best)
    s = torch.tensor(out, dtype=torch.float32)
    return ((s - lo) / (hi - lo)).clamp(0.0, 1.0)


# ------------------------------------------------------------------------ the calibrated ngram (default)
# Window lengths 1 … concept length + NGRAM_EXTRA: a paraphrase shorter than the concept, or longer by a
# modifier or two, is compared whole; a longer one through its best sub-window.  A cost bound, not a fit:
# the windows per prompt grow linearly with it (see the README's first-sight cost).
NGRAM_EXTRA = 2
# null windows per length: half random regular vocabulary tokens, half random whole words of the vocabulary,
# plus NULL_FREQUENT_PER_LENGTH windows of the vocabulary's most frequent words (below)
NULL_PER_LENGTH = 128
# The words real prompts are made of ("a", "and", "on", "with", "background") are trained in every model, while most
# random vocabulary entries are rare: on an encoder trained on a small corpus (toy world 2) rare tokens keep
# their near-random states and every trained word looks alike next to them ("and" scored 0.978 against "fish",
# above fish's best paraphrase).  So the null also draws windows from the NULL_FREQUENT most frequent whole
# words.  CLIP's BPE vocabulary lists its single characters first and then its merges in the order they were
# learned, i.e. by corpus frequency, so the lowest ids are the most frequent: no word list is fitted to a model.
NULL_FREQUENT = 512
NULL_FREQUENT_PER_LENGTH = 64
# the null's upper tail q is its second-largest score: the most extreme value the sample estimates (a prompt
# offers dozens of windows, so the threshold must sit beyond the per-window tail), which one outlier — an
# inflection or synonym of the concept among the random words — cannot move, as it would move the maximum
NULL_RANK = 2
NULL_SEED = 1
# the concept inside neutral context (CLIP ids of "a", "the", "a photo of a"): its own band
NEUTRAL_PREFIXES: tuple[tuple[int, ...], ...] = ((320,), (518,), (320, 1125, 539, 320))
# a stored calibration is reused when the host's probe states are within this relative distance of the
# ones it was computed on: 10× the rounding of fp16 states, far below what retraining a text encoder moves
FINGERPRINT_RTOL = 1e-2
CALIBRATION_VERSION = 3  # 2: the null includes frequent words; 3: windows are also compared by their EOS states


def calibration_params() -> dict:
    """What a stored calibration depends on besides the encoder (a file with other values is recomputed)."""
    return {"version": CALIBRATION_VERSION, "extra": NGRAM_EXTRA, "per_length": NULL_PER_LENGTH,
            "frequent": {"words": NULL_FREQUENT, "per_length": NULL_FREQUENT_PER_LENGTH, "length_1": "all"},
            "rank": NULL_RANK, "seed": NULL_SEED, "bank": NGRAM_BANK}


def window_lengths(m: int) -> range:
    """Window lengths the calibrated ``ngram`` compares with a concept of ``m`` content tokens."""
    return range(1, max(1, m) + NGRAM_EXTRA + 1)


def all_windows(ids: Sequence[int] | None, max_length: int) -> list[tuple[int, ...]]:
    """Distinct windows of 1 … ``max_length`` consecutive content tokens."""
    return list(dict.fromkeys(w for n in range(1, max_length + 1) for w in windows(ids, n)))


def phrase_similarity(window: torch.Tensor, concept: torch.Tensor, window_eos: torch.Tensor | None = None,
                      concept_eos: torch.Tensor | None = None) -> float:
    """Similarity of centred unit states ``[l, d]`` and ``[m, d]``: the mean aligned per-token cosine when
    ``l == m`` (the fixed ``ngram``'s score), else the cosine of the last states.  CLIP's encoder is causal,
    so a window's last state is the only one that has read the whole window.

    With both EOS states (each sequence encoded alone, ``[BOS, *ids, EOS]``) the score is the mean of that and
    the cosine of the EOS states: the EOS is the state CLIP is trained to summarise a text in, and the UNet
    reads it (and the padding after it) in every prompt."""
    if window.shape[0] == concept.shape[0]:
        s = float((window * concept).sum() / concept.shape[0])
    else:
        s = float(window[-1] @ concept[-1])
    if window_eos is not None and concept_eos is not None:
        s = 0.5 * (s + float(window_eos @ concept_eos))
    return s


@lru_cache(maxsize=1)
def _whole_words() -> tuple[int, ...]:
    """Ids of the CLIP vocabulary's whole-word tokens of three or more ASCII letters (``dog</w>``)."""
    try:
        from .tokenizer import clip_tokenizer

        vocab = clip_tokenizer().get_vocab()
    except Exception as e:  # no vocabulary file: the null keeps its random-token half only
        log.info("SPM: no CLIP vocabulary for the transport null (%s); using random tokens only", e)
        return ()
    return tuple(sorted(i for t, i in vocab.items()
                        if t.endswith("</w>") and len(t) >= 7 and t[:-4].isascii() and t[:-4].isalpha()))


@lru_cache(maxsize=1)
def frequent_words(n: int = NULL_FREQUENT) -> tuple[int, ...]:
    """Ids of the ``n`` most frequent whole-word tokens of the CLIP vocabulary (letters only, ``and</w>``):
    the lowest ids, as BPE lists its merges in the order it learned them (see :data:`NULL_FREQUENT`)."""
    try:
        from .tokenizer import clip_tokenizer

        vocab = clip_tokenizer().get_vocab()
    except Exception as e:
        log.info("SPM: no CLIP vocabulary for the transport null (%s); no frequent words", e)
        return ()
    return tuple(sorted(i for t, i in vocab.items()
                        if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha())[:n])


def null_windows(length: int, n: int = NULL_PER_LENGTH, seed: int = NULL_SEED,
                 n_frequent: int = NULL_FREQUENT_PER_LENGTH) -> list[tuple[int, ...]]:
    """The fixed, seeded null sample of one window length (the same for every model and concept): ``n``
    windows of random tokens and random words, then windows of frequent words: every one of them alone for
    length 1, ``n_frequent`` random sequences of them for longer windows."""
    g = torch.Generator().manual_seed(seed * 1000 + length)
    words = _whole_words()
    n_words = n // 2 if words else 0
    rand = torch.randint(256, BOS, (n - n_words, length), generator=g).tolist()
    picks = torch.randint(0, max(1, len(words)), (n_words, length), generator=g).tolist()
    out = [tuple(r) for r in rand] + [tuple(words[i] for i in r) for r in picks]
    freq = frequent_words()
    if freq and n_frequent > 0:
        if length == 1:  # every frequent word alone: the words that prompts share with any concept's
            return out + [(i,) for i in freq]
        gf = torch.Generator().manual_seed(seed * 7000 + length)
        out += [tuple(freq[i] for i in r) for r in torch.randint(0, len(freq), (n_frequent, length), generator=gf).tolist()]
    return out


def encoder_fingerprint(encode_ids: PhraseEncoder, probe: tuple[int, ...] = PROBE, dims: int = 16) -> dict:
    """What identifies an encoder for a stored calibration: its states of ``probe`` (each window encoded as
    the phrase cache encodes it) on ``dims`` seeded random directions, plus its width."""
    with torch.no_grad():
        st = encode_ids([probe])[0].detach().float().cpu()
    g = torch.Generator().manual_seed(0)
    proj = st @ torch.randn(st.shape[-1], dims, generator=g) / st.shape[-1] ** 0.5
    return {"dim": int(st.shape[-1]), "probe": list(probe), "proj": [float(f"{v:.6g}") for v in proj.reshape(-1).tolist()]}


def fingerprint_distance(a: dict | None, b: dict | None) -> float:
    """Relative distance of two fingerprints (``inf`` when they are not comparable)."""
    try:
        if a is None or b is None or a["dim"] != b["dim"] or list(a["probe"]) != list(b["probe"]):
            return float("inf")
        x, y = torch.tensor(a["proj"], dtype=torch.float64), torch.tensor(b["proj"], dtype=torch.float64)
        if x.shape != y.shape:
            return float("inf")
        return float((x - y).norm() / y.norm().clamp_min(1e-12))
    except (KeyError, TypeError, ValueError):
        return float("inf")


@dataclass
class Calibration:
    """How the calibrated ``ngram`` maps one concept's best window similarity ``s`` to a score.

    ``q`` is the null's second-largest score (:data:`NULL_RANK`; windows of random tokens, random words and frequent words,
    lengths 1 … L, none sharing a token with the concept).  ``lo = q + (1 − q) / 2`` — the midpoint between the null's upper tail
    and the concept itself (``s = 1``): a window counts only when it is closer to the concept than to the
    edge of what random text reaches.  ``hi = min(q + 3(1 − q) / 4, band)``: full strength a quarter of the
    headroom further on, or sooner where the concept inside neutral context (``band``, its lowest score) sits
    lower, so that "a {concept}" always gets full strength.  ``score = clamp((s − lo) / (hi − lo), 0, 1)``;
    every quantity is in the encoder's own units, nothing is a cosine chosen on one model.
    """

    concept: str
    ids: tuple[int, ...]
    lo: float
    hi: float
    q: float
    quantiles: dict[str, float]
    band: float
    max_length: int
    samples: int
    usable: bool = True
    source: str = "computed"  # "file" (the membrane's stored calibration) or "computed" (here, from this encoder)
    reason: str = ""

    @classmethod
    def from_scores(cls, concept: str, ids: Sequence[int], null: torch.Tensor, band: float, max_length: int,
                    reason: str = "") -> "Calibration":
        null = null.double()
        qs = {str(p): float(torch.quantile(null, p)) for p in (0.5, 0.9, 0.99)} if len(null) else {}
        top = null.sort(descending=True).values
        qs["second"] = float(top[min(NULL_RANK, len(top)) - 1]) if len(top) else 1.0
        qs["max"] = float(top[0]) if len(top) else float("nan")
        q = qs["second"]
        head = 1.0 - q
        # an encoder whose random windows already look like the concept cannot separate anything by states
        usable = bool(len(null)) and head > 1e-3
        lo = q + head / 2
        hi = min(q + 3 * head / 4, band)
        hi = max(hi, lo + head / 64)  # band below lo: the concept's own context moves it past the null margin
        return cls(concept, tuple(int(i) for i in ids), lo, hi, q, qs, float(band), int(max_length), int(len(null)),
                   usable, "computed", reason)

    def map(self, s: torch.Tensor) -> torch.Tensor:
        if not self.usable:
            return torch.zeros_like(s)
        return ((s - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)

    @property
    def weak(self) -> bool:
        """The concept inside neutral context scores below ``lo``: the states barely separate it from noise."""
        return self.band < self.lo

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "lo": self.lo, "hi": self.hi, "q": self.q, "quantiles": self.quantiles,
                "band": self.band, "max_length": self.max_length, "samples": self.samples, "usable": self.usable}

    @classmethod
    def from_dict(cls, concept: str, d: dict, reason: str = "") -> "Calibration":
        return cls(concept, tuple(int(i) for i in d["ids"]), float(d["lo"]), float(d["hi"]), float(d["q"]),
                   {str(k): float(v) for k, v in d["quantiles"].items()}, float(d["band"]), int(d["max_length"]),
                   int(d["samples"]), bool(d.get("usable", True)), "file", reason)


def stored_mismatch(entry: dict, params: dict, fingerprint: dict, other_settings: str, made_on: str, *,
                    rtol: float = FINGERPRINT_RTOL, differs: str = "this text encoder differs from",
                    other_shape: str = "another width") -> tuple[float, str | None]:
    """Whether a calibration stored in a membrane file applies here: ``(fingerprint distance, None)``, or the
    reason it does not (made with other ``params``, or on a model whose fingerprint is farther than ``rtol``; the
    reason reads "``differs`` ``made_on`` (``other_shape`` | relative distance …)").  The text calibration and the
    membrane gate fingerprint the text encoder, the response gate (:mod:`spm.response`) the UNet."""
    if entry.get("params") != params:
        return float("inf"), other_settings
    dist = fingerprint_distance(entry.get("fingerprint"), fingerprint)
    if dist > rtol:
        what = other_shape if dist == float("inf") else f"relative distance {dist:.3g} > {rtol:g}"
        return dist, f"{differs} {made_on} ({what})"
    return dist, None


def _stored_calibration(stored: dict | None, concept: ConceptEmbedding, ids: tuple[int, ...],
                        fingerprint: dict) -> tuple[Calibration | None, str]:
    """The membrane file's calibration of ``concept`` if it applies to this encoder, else why not."""
    if not stored:
        return None, "the membrane file has no transport calibration"
    dist, why = stored_mismatch(stored, calibration_params(), fingerprint,
                                "the file's calibration was made with other calibration settings",
                                "the one the file was calibrated on")
    if why:
        return None, why
    entry = (stored.get("concepts") or {}).get(concept.text)
    if not isinstance(entry, dict):
        return None, f"the file's calibration has no entry for {concept.text!r}"
    try:
        cal = Calibration.from_dict(concept.text, entry, f"this encoder matches the one it was made on (fingerprint distance {dist:.2g} <= {FINGERPRINT_RTOL:g})")
    except (KeyError, TypeError, ValueError):
        return None, "the file's calibration is unreadable"
    if cal.ids != ids:
        return None, "the file's calibration was made for other token ids of the concept"
    return cal, cal.reason


def calibrate(concept: ConceptEmbedding, phrases: "PhraseCache", encode_ids: PhraseEncoder,
              stored: dict | None = None) -> Calibration:
    """The calibration of ``concept`` on the encoder behind ``encode_ids`` (cached in ``phrases``).

    ``stored`` is a membrane's ``spm_transport`` metadata: used when its encoder fingerprint matches this
    encoder's, else the calibration is computed here (once per encoder and concept) and says why.
    """
    ids = tuple(content_ids(concept.tokens))
    key = (concept.text, ids)
    cal = phrases.calibrations.get(key)
    if cal is not None:
        return cal
    if phrases.fingerprint is None:
        phrases.fingerprint = encoder_fingerprint(encode_ids)
    cal, why = _stored_calibration(stored, concept, ids, phrases.fingerprint)
    if cal is None:
        cal = compute_calibration(concept, phrases, encode_ids, reason=why)
    phrases.calibrations[key] = cal
    return cal


def compute_calibration(concept: ConceptEmbedding, phrases: "PhraseCache", encode_ids: PhraseEncoder,
                        reason: str = "") -> Calibration:
    """Encode the null and the neutral-context windows and place ``lo``/``hi`` (see :class:`Calibration`)."""
    ids = tuple(content_ids(concept.tokens))
    m = content_positions(concept.tokens, concept.embedding.shape[0])
    top = max(window_lengths(m))
    null = [w for n in window_lengths(m) for w in null_windows(n)]
    null = [w for w in null if not set(w) & set(ids)]
    contexts = [p + ids for p in NEUTRAL_PREFIXES] if ids else []
    phrases.prepare(null + contexts, encode_ids)
    if m == 0:
        return Calibration.from_scores(concept.text, ids, torch.zeros(0), 1.0, top, reason)
    c, ce = phrases.concept_states(concept, m)
    scores = [phrase_similarity(st, c, phrases.get_summary(w), ce) for w, st in ((w, phrases.get(w)) for w in null)
              if st is not None]
    band = min((phrase_similarity(st, c, phrases.get_summary(w), ce) for w, st in ((w, phrases.get(w)) for w in contexts)
                if st is not None), default=1.0)
    return Calibration.from_scores(concept.text, ids, torch.tensor(scores), band, top, reason)


def calibration_metadata(concepts: Sequence[ConceptEmbedding], phrases: "PhraseCache",
                         encode_ids: PhraseEncoder) -> dict:
    """The ``spm_transport`` metadata of a membrane: its concepts' calibrations on this encoder, with the
    encoder's fingerprint (computed at training time, so that generation on the same encoder reuses it)."""
    cals = {ce.text: calibrate(ce, phrases, encode_ids) for ce in concepts}
    return {"params": calibration_params(), "fingerprint": phrases.fingerprint,
            "concepts": {t: c.to_dict() for t, c in cals.items()}}


def training_calibration(backend: object, concepts: Sequence[str]) -> dict:
    """The ``spm_transport`` metadata a trainer stores: ``backend.transport_calibration(concepts)`` where the
    backend has one (best effort: without it the calibration is computed on first use)."""
    fn = getattr(backend, "transport_calibration", None)
    if fn is None or not concepts:
        return {}
    try:
        return fn(list(concepts))
    except Exception as e:  # never fail a training run for it
        log.warning("SPM: transport calibration at training time failed (%s); it will be computed on first use", e)
        return {}


def training_neighbours(backend: object, concepts: Sequence[str]) -> dict[str, list[str]]:
    """The words to erase beside each concept (``TrainConfig.neighbours``): ``backend.transport_neighbours(concepts)``
    where the backend has one (best effort: without it, or if it fails, none)."""
    fn = getattr(backend, "transport_neighbours", None)
    if fn is None or not concepts:
        return {}
    try:
        return {str(k): [str(w) for w in v] for k, v in (fn(list(concepts)) or {}).items()}
    except Exception as e:  # never fail a training run for it
        log.warning("SPM: finding the words the membrane's transport opens for failed (%s); training without them", e)
        return {}


def training_candidates(backend: object, concepts: Sequence[str], k: int, null: int, seed: int) -> dict | None:
    """The model-synonym scan's words (:mod:`spm.train.synonyms`): ``backend.transport_candidates(concepts, k, null,
    seed)`` where the backend has one, ``{"candidates": {concept: [word, …]}, "null": [word, …]}``; None without it
    or if it fails (best effort: the membrane is then trained without model synonyms)."""
    fn = getattr(backend, "transport_candidates", None)
    if fn is None or not concepts:
        return None
    try:
        out = fn(list(concepts), int(k), int(null), int(seed))
        return {"candidates": {str(c): [str(w) for w in ws] for c, ws in out["candidates"].items()},
                "null": [str(w) for w in out["null"]]}
    except Exception as e:  # never fail a training run for it
        log.warning("SPM: finding the candidate words of the model-synonym scan failed (%s); training without it", e)
        return None


def best_window(ids: Sequence[int] | None, concept: ConceptEmbedding, phrases: "PhraseCache",
                max_length: int) -> tuple[float, tuple[int, ...] | None, bool]:
    """(best similarity, its window, whether every window was prepared) of one row against ``concept``."""
    m = content_positions(concept.tokens, concept.embedding.shape[0])
    c, ce = phrases.concept_states(concept, m)
    best, where, complete = 0.0, None, True
    for w in all_windows(ids, max_length):
        st = phrases.get(w)
        if st is None:
            complete = False
            continue
        s = phrase_similarity(st, c, phrases.get_summary(w), ce)
        if s > best:
            best, where = s, w
    return best, where, complete


def ngram_calibrated(row_tokens: Sequence[Sequence[int] | None], concept: ConceptEmbedding,
                     phrases: PhraseCache) -> torch.Tensor:
    """The default ``ngram``: the best window of 1 … m + :data:`NGRAM_EXTRA` tokens of the row (each encoded
    alone, states centred as in :class:`PhraseCache`) against the concept, mapped through the concept's
    :class:`Calibration` on this encoder. → ``[B]``.  Rows with unknown tokens, unprepared windows or a
    concept not calibrated yet (:func:`calibrate`) score 0."""
    cal = phrases.calibrations.get((concept.text, tuple(content_ids(concept.tokens))))
    m = content_positions(concept.tokens, concept.embedding.shape[0])
    if cal is None or not cal.usable or m == 0 or not len(phrases):
        return torch.zeros(len(row_tokens))
    return cal.map(torch.tensor(_best_similarities(row_tokens, concept, phrases, cal), dtype=torch.float32))


def _best_similarities(row_tokens: Sequence[Sequence[int] | None], concept: ConceptEmbedding, phrases: PhraseCache,
                       cal: Calibration) -> list[float]:
    """Each row's best window similarity to ``concept`` (0 for unknown rows), cached in ``phrases.best`` once every
    window of the row was prepared."""
    out = []
    for ids in row_tokens:
        if ids is None:
            out.append(0.0)
            continue
        key = (tuple(ids), concept.text, "cal", cal.max_length)
        best = phrases.best.get(key)
        if best is None:
            best, _, complete = best_window(ids, concept, phrases, cal.max_length)
            if complete:
                phrases.best[key] = best
        out.append(best)
    return out


def vocabulary_matches(concept: ConceptEmbedding, phrases: PhraseCache, encode_ids: PhraseEncoder, cal: Calibration,
                       words: Sequence[int] | None = None, batch: int = 256) -> list[tuple[int, float, float]]:
    """Every whole word of the vocabulary that alone opens ``concept`` under its calibration: ``(token id,
    similarity, calibrated strength)`` for the words whose strength is > 0, the strongest first.

    ``words`` defaults to the CLIP vocabulary's whole words of three or more letters (about 32 000); the concept's
    own tokens are left out.  The words are encoded in batches and not cached.  This is what the membrane will act
    on besides the concept's own words, and what ``python -m spm explain --vocabulary`` lists.
    """
    return vocabulary_scan([(concept, cal)], phrases, encode_ids, words, batch)[0]


# ``progress(done, total)`` in vocabulary words, for whoever scans the vocabulary deep inside a host's call (the
# trainer's model-synonym scan: minutes on a CPU WebUI); set with ``VOCABULARY_PROGRESS.set(fn)`` in that thread
VOCABULARY_PROGRESS: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "spm_vocabulary_progress", default=None)


def vocabulary_similarity(concepts: Sequence[ConceptEmbedding], phrases: PhraseCache, encode_ids: PhraseEncoder,
                          words: Sequence[int] | None = None, batch: int = 256) -> tuple[list[int], list[torch.Tensor | None]]:
    """``(word ids, [one tensor of similarities per concept])``: the ``phrase_similarity`` of every whole word of the
    vocabulary (``words``; default the CLIP vocabulary's whole words of three or more letters, about 32 000) alone,
    as a one-token window, to each concept; ``None`` for a concept without content tokens.  The words are encoded
    once for all concepts, in batches; the words' states are not kept, each concept's similarities are
    (``phrases.vocabulary_sims``, until :meth:`PhraseCache.clear`), so a second scan for the same concept encodes
    nothing."""
    phrases.ensure_center(encode_ids)
    ids = [int(w) for w in (words if words is not None else _whole_words())]
    words_key = None if words is None else tuple(ids)
    keys = [(c.text, tuple(int(t) for t in c.tokens), words_key) for c in concepts]
    todo = []
    for concept, key in zip(concepts, keys):
        m = content_positions(concept.tokens, concept.embedding.shape[0])
        todo.append(phrases.concept_states(concept, m) if m and key not in phrases.vocabulary_sims else None)
    parts: list[list[torch.Tensor]] = [[] for _ in concepts]
    if not any(t is not None for t in todo):
        return ids, [phrases.vocabulary_sims.get(k) for k in keys]
    progress = VOCABULARY_PROGRESS.get()
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        if progress is not None:
            progress(i, len(ids))
        with torch.no_grad():
            states = encode_ids([(w,) for w in chunk])
        split = [phrases._split((w,), st.detach().float().cpu()) for w, st in zip(chunk, states)]
        u = phrases.unit(torch.stack([c[-1] for c, _ in split]))  # [n, d]: a one-token window's last state
        e = phrases.summary_unit(torch.stack([e for _, e in split])) if all(e is not None for _, e in split) else None
        for k, item in enumerate(todo):
            if item is None:
                continue
            c, ce = item
            sim = u @ c[-1]  # phrase_similarity of a one-token window (aligned when the concept has one token too)
            if e is not None and ce is not None:
                sim = 0.5 * (sim + e @ ce)
            parts[k].append(sim)
    for key, p, t in zip(keys, parts, todo):
        if t is not None:
            phrases.vocabulary_sims[key] = torch.cat(p)
    if progress is not None:  # the whole vocabulary read: the count ends at its total, not at the last batch's start
        progress(len(ids), len(ids))
    return ids, [phrases.vocabulary_sims.get(k) for k in keys]


def vocabulary_scan(pairs: Sequence[tuple[ConceptEmbedding, Calibration]], phrases: PhraseCache,
                    encode_ids: PhraseEncoder, words: Sequence[int] | None = None,
                    batch: int = 256) -> list[list[tuple[int, float, float]]]:
    """:func:`vocabulary_matches` for several ``(concept, calibration)`` pairs, encoding the vocabulary once."""
    use = [(ce, cal) for ce, cal in pairs if cal.usable]
    ids, sims = vocabulary_similarity([ce for ce, _ in use], phrases, encode_ids, words, batch)
    by_pair = iter(zip(use, sims))
    out: list[list[tuple[int, float, float]]] = []
    for concept, cal in pairs:
        if not cal.usable:
            out.append([])
            continue
        _, sim = next(by_pair)
        if sim is None:
            out.append([])
            continue
        own = set(content_ids(concept.tokens))
        strength = cal.map(sim)
        hits = [(ids[j], float(sim[j]), float(strength[j])) for j in (strength > 0).nonzero().flatten().tolist()
                if ids[j] not in own]
        out.append(sorted(hits, key=lambda x: -x[1]))
    return out


def similar_words(concepts: Sequence[ConceptEmbedding], phrases: PhraseCache, encode_ids: PhraseEncoder, k: int,
                  null: int, seed: int = NULL_SEED, words: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """``(per concept: the ``k`` whole words closest to it by :func:`vocabulary_similarity`, closest first, its own
    tokens and the vocabulary's most frequent words (:func:`frequent_words`) left out; ``null`` whole words drawn at
    random (``seed``) from the rest)``: the candidates and the null
    sample of the trainer's model-synonym scan (:mod:`spm.train.synonyms`)."""
    ids, sims = vocabulary_similarity(concepts, phrases, encode_ids, words)
    common = set(frequent_words())  # "the", "with", "red": in unrelated prompts all the time, never a synonym
    picked: list[list[int]] = []
    for ce, sim in zip(concepts, sims):
        if sim is None:
            picked.append([])
            continue
        own = set(content_ids(ce.tokens)) | common
        order = [ids[j] for j in sim.argsort(descending=True).tolist() if ids[j] not in own]
        picked.append(order[:k])
    taken = {w for p in picked for w in p} | {w for ce in concepts for w in content_ids(ce.tokens)}
    rest = [w for w in ids if w not in taken]
    g = torch.Generator().manual_seed(int(seed))
    draw = torch.randperm(len(rest), generator=g)[:null].tolist() if rest else []
    return picked, [rest[j] for j in draw]


def _need_phrases(phrases):
    if phrases is None:
        raise ValueError("the ngram metric needs the host's phrase states (use spm.attach.Transport)")
    return phrases


def _m_ngram(ctx, toks, ce, phrases=None):
    return ngram_calibrated(toks, ce, _need_phrases(phrases))


def _m_ngram_tokenuni(ctx, toks, ce, phrases=None):
    return torch.maximum(_m_ngram(ctx, toks, ce, phrases), tokenuni(toks, ce.tokens))


def _m_ngram_fixed(ctx, toks, ce, phrases=None):
    return ngram(toks, ce, _need_phrases(phrases))


def _m_ngram_fixed_tokenuni(ctx, toks, ce, phrases=None):
    return torch.maximum(_m_ngram_fixed(ctx, toks, ce, phrases), tokenuni(toks, ce.tokens))


def _m_membrane(ctx, toks, ce):
    """The membrane gate alone: it reads the membrane, not the concept, so its per-concept part is 0 and
    :class:`spm.attach.Transport` adds the gate per membrane (see :mod:`spm.gate`)."""
    return torch.zeros(ctx.shape[0])


def _m_robust(ctx, toks, ce, phrases=None):
    """``robust``: the default words metric (``ngram_tokenuni``) here; Transport takes its maximum with the gate."""
    return _m_ngram_tokenuni(ctx, toks, ce, phrases)


def _m_response(ctx, toks, ce, phrases=None):
    """``response``: the default words metric (``ngram_tokenuni``) here; Transport takes its maximum with the
    membrane gate (:mod:`spm.gate`, as ``robust``) and the response gate (:mod:`spm.response`), which asks the UNet
    whether the row draws the concept."""
    return _m_ngram_tokenuni(ctx, toks, ce, phrases)


for _fn in (_m_ngram, _m_ngram_tokenuni, _m_ngram_fixed, _m_ngram_fixed_tokenuni, _m_robust, _m_response):
    _fn.needs_phrases = True  # type: ignore[attr-defined]
_m_ngram.calibrated = _m_ngram_tokenuni.calibrated = _m_robust.calibrated = True  # type: ignore[attr-defined]
_m_response.calibrated = True  # type: ignore[attr-defined]
_m_membrane.gate = _m_robust.gate = True  # type: ignore[attr-defined]
_m_response.response = _m_response.gate = True  # type: ignore[attr-defined]


def needs_phrases(metric: str) -> bool:
    """Whether ``metric`` reads context-free phrase states (hosts must prepare them, see :class:`PhraseCache`)."""
    return bool(getattr(METRICS.get(metric), "needs_phrases", False))


def is_calibrated(metric: str) -> bool:
    """Whether ``metric`` maps through a per-concept :class:`Calibration` (hosts prepare it, see :func:`calibrate`)."""
    return bool(getattr(METRICS.get(metric), "calibrated", False))


def uses_gate(metric: str) -> bool:
    """Whether ``metric`` adds the membrane gate (:mod:`spm.gate`): each membrane's strength is then at least its
    gate's score of the row, whatever words the row has."""
    return bool(getattr(METRICS.get(metric), "gate", False))


def check_metric(metric: str) -> str:
    """``metric`` if it is a transport metric, else ValueError naming every choice (one message for every host)."""
    if metric not in METRICS:
        raise ValueError(f"unknown transport metric {metric!r}; choose one of {', '.join(sorted(METRICS))}")
    return metric


def uses_response(metric: str) -> bool:
    """Whether ``metric`` adds the response gate (:mod:`spm.response`): it runs the host's UNet on each new row,
    so only hosts that set :attr:`spm.attach.Transport.responder` can use it (the diffusers host; not the WebUI)."""
    return bool(getattr(METRICS.get(metric), "response", False))


def phrase_lengths(metric: str, m: int) -> set[int]:
    """The window lengths ``metric`` reads for a concept of ``m`` content tokens."""
    if m <= 0 or not needs_phrases(metric):
        return set()
    return set(window_lengths(m)) if is_calibrated(metric) else {m}


METRICS: dict[str, MetricFn] = {
    "clipcos_tokenuni": _m_clipcos_tokenuni,
    "clipcos": _m_clipcos,
    "tokenuni": _m_tokenuni,
    "tokenwin": _m_tokenwin,
    "tokenwin_tokenuni": _m_tokenwin_tokenuni,
    "ngram": _m_ngram,
    "ngram_tokenuni": _m_ngram_tokenuni,
    "ngram_fixed": _m_ngram_fixed,
    "ngram_fixed_tokenuni": _m_ngram_fixed_tokenuni,
    "membrane": _m_membrane,
    "robust": _m_robust,
    "response": _m_response,
    "off": _m_off,
}
DEFAULT_METRIC = "ngram_tokenuni"
# the metric that also opens for prompts without the concept's words: max(ngram_tokenuni, the membrane gate)
ROBUST_METRIC = "robust"
# the metric that also asks the UNet whether a row draws the concept: max(ngram_tokenuni, the membrane gate, the
# response gate of spm.response); the robust defaults' transport (bench.attack's robust row)
RESPONSE_METRIC = "response"


def register_metric(name: str, fn: MetricFn) -> None:
    """Add a matching metric ``fn(context [B,T,d], row_tokens, concept) -> scores [B]``."""
    METRICS[name] = fn


class ConceptCache:
    """Concept embeddings, computed once per (concept text, encoder key)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, object], ConceptEmbedding] = {}

    def get(self, texts: Sequence[str], encode: Encoder, encoder_key: object) -> list[ConceptEmbedding]:
        todo = [t for t in dict.fromkeys(texts) if (t, encoder_key) not in self._cache]
        if todo:
            with torch.no_grad():
                emb, toks = encode(list(todo))
            for t, e, k in zip(todo, emb, toks):
                self._cache[(t, encoder_key)] = ConceptEmbedding(t, e.detach().float().cpu().clone(), list(k))
        return [self._cache[(t, encoder_key)] for t in texts]

    def embeddings(self) -> list[ConceptEmbedding]:
        """Every concept embedding computed so far (any encoder key)."""
        return list(self._cache.values())

    def clear(self) -> None:
        self._cache.clear()


def concept_scores(
    context: torch.Tensor,
    row_tokens: Sequence[Sequence[int] | None],
    concepts: Sequence[ConceptEmbedding],
    metric: str = DEFAULT_METRIC,
    phrases: PhraseCache | None = None,
) -> torch.Tensor:
    """``max`` over concepts of the metric, clamped to [0, 1]. → ``[B]`` float32 on CPU.

    ``phrases`` is required by the metrics that read phrase states (:func:`needs_phrases`).
    """
    fn = METRICS[check_metric(metric)]
    if not concepts or metric == "off":
        return torch.ones(context.shape[0])
    if fn in (_m_ngram_tokenuni, _m_robust) and len(concepts) > 1:
        # the default metric for many concepts at once (a membrane with its model synonyms): the same float32
        # arithmetic with a few tensor ops in all, instead of several per concept
        return ngram_tokenuni_many(row_tokens, concepts, _need_phrases(phrases)).amax(0).clamp(0.0, 1.0)
    ctx = context.detach().float().cpu()
    kw = {"phrases": phrases} if getattr(fn, "needs_phrases", False) else {}
    s = torch.stack([fn(ctx, row_tokens, c, **kw).float() for c in concepts]).amax(0)
    return s.clamp(0.0, 1.0)


def ngram_tokenuni_many(row_tokens: Sequence[Sequence[int] | None], concepts: Sequence[ConceptEmbedding],
                        phrases: PhraseCache) -> torch.Tensor:
    """``ngram_tokenuni`` of every concept: ``[C, B]``, element for element what
    ``max(ngram_calibrated, tokenuni)`` gives per concept (the same best windows, cached the same way, and the
    same float32 calibration map), in a few tensor operations for all concepts.  The steady cost of scoring a
    prompt is then a dictionary look-up per (row, concept) rather than several small tensor operations."""
    b, n = len(row_tokens), len(concepts)
    best = [[0.0] * b for _ in range(n)]
    tok = [[0.0] * b for _ in range(n)]
    lo, den, use = [0.0] * n, [1.0] * n, [False] * n
    rows = [content_tokens(ids) for ids in row_tokens]
    prepared = len(phrases) > 0
    for i, concept in enumerate(concepts):
        own = content_tokens(concept.tokens)
        if own:
            tok[i] = [len(r & own) / len(own) for r in rows]
        cal = phrases.calibrations.get((concept.text, tuple(content_ids(concept.tokens))))
        m = content_positions(concept.tokens, concept.embedding.shape[0])
        if cal is None or not cal.usable or m == 0 or not prepared:
            continue
        use[i], lo[i], den[i] = True, cal.lo, cal.hi - cal.lo
        best[i] = _best_similarities(row_tokens, concept, phrases, cal)
    s = torch.tensor(best, dtype=torch.float32).view(n, b)
    ng = ((s - torch.tensor(lo, dtype=torch.float32)[:, None]) / torch.tensor(den, dtype=torch.float32)[:, None])
    ng = torch.where(torch.tensor(use)[:, None], ng.clamp(0.0, 1.0), torch.zeros(()))
    return torch.maximum(ng, torch.tensor(tok, dtype=torch.float32).view(n, b))


class RowRegistry:
    """Remembers which token ids produced which conditioning row, so that hooks on the UNet — which see
    only tensors — can score each row with token-based metrics.

    Hosts call :meth:`record` wherever they encode prompts; :meth:`lookup` matches rows by a fingerprint
    of strided values (exact tensors, any dtype).  Unknown rows get ``None`` (token metrics score 0).
    """

    def __init__(self, capacity: int = 1024, points: int = 256):
        self.capacity = capacity
        self.points = points
        self._sigs: list[torch.Tensor] = []
        self._tokens: list[list[int]] = []
        self.total = 0  # rows ever recorded; row number i (0-based) is still held while i >= dropped
        self.dropped = 0  # rows forgotten (the oldest first), by eviction past ``capacity`` or clear()

    def _sig(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.detach().reshape(rows.shape[0], -1)
        n = flat.shape[1]
        idx = torch.linspace(0, n - 1, self.points, device=flat.device).long()
        return torch.cat([flat[:, idx].float().cpu(), torch.full((flat.shape[0], 1), float(n))], 1)

    def record(self, rows: torch.Tensor, tokens: Sequence[Sequence[int]]) -> None:
        sig = self._sig(rows)
        for s, t in zip(sig, tokens):
            self._sigs.append(s)
            self._tokens.append(list(t))
            self.total += 1
        if len(self._sigs) > self.capacity:
            drop = len(self._sigs) - self.capacity
            del self._sigs[:drop], self._tokens[:drop]
            self.dropped += drop

    def lookup(self, rows: torch.Tensor) -> list[list[int] | None]:
        if not self._sigs:
            return [None] * rows.shape[0]
        sig = self._sig(rows)
        bank = torch.stack(self._sigs)
        out: list[list[int] | None] = []
        for s in sig:
            # element-wise relative tolerance: exact rows match in any float dtype (fp16 rounding ~5e-4)
            ok = ((bank - s).abs() <= 2e-3 * bank.abs() + 1e-5).all(1)
            idx = ok.nonzero()
            if not len(idx):
                out.append(None)
                continue
            err = (bank[idx[:, 0]] - s).abs().sum(1)
            out.append(self._tokens[int(idx[int(err.argmin()), 0])])
        return out

    def tokens(self) -> list[list[int]]:
        """The token ids of every recorded row, oldest first."""
        return list(self._tokens)

    def clear(self) -> None:
        self._sigs.clear()
        self._tokens.clear()
        self.dropped = self.total


__all__ = [
    "DEFAULT_METRIC", "METRICS", "RESPONSE_METRIC", "ROBUST_METRIC", "Calibration", "ConceptCache", "ConceptEmbedding", "Encoder", "PhraseCache",
    "PhraseEncoder", "RowRegistry", "all_windows", "best_window", "calibrate", "calibration_metadata", "check_metric",
    "causal_phrase_encoder", "checked_phrase_encoder", "clipcos", "compute_calibration", "concept_scores",
    "ngram_tokenuni_many", "VOCABULARY_PROGRESS",
    "content_ids", "content_tokens", "encoder_fingerprint", "fingerprint_distance", "is_calibrated", "needs_phrases",
    "frequent_words", "ngram", "ngram_calibrated", "null_windows", "phrase_lengths", "phrase_similarity", "register_metric",
    "similar_words", "tokenuni", "training_calibration", "training_candidates", "training_neighbours", "uses_gate", "uses_response",
    "vocabulary_matches", "vocabulary_scan", "vocabulary_similarity", "window_lengths", "windows",
]
