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

This module knows nothing of any host: a host supplies an ``encode(texts)`` function returning
conditioning exactly as its UNet receives it, plus token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

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


METRICS: dict[str, MetricFn] = {
    "clipcos_tokenuni": _m_clipcos_tokenuni,
    "clipcos": _m_clipcos,
    "tokenuni": _m_tokenuni,
    "tokenwin": _m_tokenwin,
    "tokenwin_tokenuni": _m_tokenwin_tokenuni,
    "off": _m_off,
}
DEFAULT_METRIC = "clipcos_tokenuni"


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

    def clear(self) -> None:
        self._cache.clear()


def concept_scores(
    context: torch.Tensor,
    row_tokens: Sequence[Sequence[int] | None],
    concepts: Sequence[ConceptEmbedding],
    metric: str = DEFAULT_METRIC,
) -> torch.Tensor:
    """``max`` over concepts of the metric, clamped to [0, 1]. → ``[B]`` float32 on CPU."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown transport metric {metric!r}; choose one of {sorted(METRICS)}") from None
    if not concepts or metric == "off":
        return torch.ones(context.shape[0])
    ctx = context.detach().float().cpu()
    s = torch.stack([fn(ctx, row_tokens, c).float() for c in concepts]).amax(0)
    return s.clamp(0.0, 1.0)


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
        if len(self._sigs) > self.capacity:
            drop = len(self._sigs) - self.capacity
            del self._sigs[:drop], self._tokens[:drop]

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

    def clear(self) -> None:
        self._sigs.clear()
        self._tokens.clear()


__all__ = [
    "DEFAULT_METRIC", "METRICS", "ConceptCache", "ConceptEmbedding", "Encoder", "RowRegistry",
    "clipcos", "concept_scores", "content_tokens", "register_metric", "tokenuni",
]
