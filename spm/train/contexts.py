"""The target inside other words: context prompts for the erase objective (``TrainConfig.contexts``).

The paper's objective erases the target's own prompt (``"car"``), but users write the concept inside a prompt
(``"white background, a car"``), where a causal text encoder gives the concept's tokens other states.  Each
context prompt puts the target between English function words (``the``, ``of``, ``with`` …; :data:`FUNCTION_WORDS`)
and pairs it with the same words around the surrogate.  A training step then also pulls the membrane-ON prediction
of one context prompt to the erase goal built from the original model's predictions of the pair, and the erasure
signal is also measured on held-out probes of context prompts (the lesser of the two decides).  The trainer leaves
out a pair whose words around the surrogate already predict nearer the target than the surrogate on the target's own
probes (``Trainer._drop_target_like_contexts``): its goal would be the target itself."""

from __future__ import annotations

import torch

from .config import CONTEXT_PICKS

MAX_SIDE = 3  # words before and after the target, at most


# English function words: the glue of every prompt, drawn for no concept (articles, prepositions, conjunctions,
# determiners).  A property of the language SD prompts are written in, not of any model; the CLIP vocabulary's most
# frequent entries would be the model-free alternative, but they include content words ("day", "king") and word
# pieces that some models draw as a concept (toy world 2's base model draws a cloud for almost any unknown word)
FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "the", "of", "with", "on", "in", "at", "and", "by", "from", "for", "to",
                                   "this", "that", "its", "is", "as", "into", "near", "under", "over")


def _around(pre: str, mid: str, post: str, comma: bool) -> str:
    """``pre[,] mid post`` without empty parts (``mid`` "" is the empty surrogate: the words alone)."""
    head = f"{pre}{', ' if comma else ' '}{mid}" if pre and mid else (pre or mid)
    return f"{head} {post}".strip() if post else head


def context_prompts(target: str, surrogate: str, n: int, seed: int,
                    words: tuple[str, ...] = FUNCTION_WORDS) -> list[tuple[str, str]]:
    """``n`` pairs ``(words around target, the same words around surrogate)``, seeded; each has at least one word."""
    if n <= 0 or not words:
        return []
    g = torch.Generator().manual_seed(int(seed) + 15485863)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        a, b = (int(v) for v in torch.randint(0, MAX_SIDE + 1, (2,), generator=g))
        if a + b == 0:
            continue
        pick = [words[int(i)] for i in torch.randint(0, len(words), (a + b,), generator=g)]
        comma = bool(torch.rand((), generator=g) < 0.5)
        pre, post = " ".join(pick[:a]), " ".join(pick[a:])
        out.append((_around(pre, target, post, comma), _around(pre, surrogate, post, comma)))
    return out


class ContextPicker:
    """Which context prompt each step erases (``TrainConfig.context_pick``).

    ``uniform``: each of a target's context prompts equally often (as before this setting).  ``hard``: in proportion
    to how far each one lags behind the target alone.  A step's lag is ``r = ℓ_c / (ℓ_c + ℓ_t)`` of the context
    prompt's erase loss ``ℓ_c`` and the target's own ``ℓ_t`` on the same ``x_t`` (so the noise level, which scales
    both, cancels; 1/2: the membrane erases both equally well, near 1: the context prompt still keeps the target).
    Each prompt keeps the mean lag of its draws; a prompt not drawn yet counts as 1, so each is tried early on.  A
    prompt is drawn with probability ``½ · 1/n + ½ · r_j / Σ r``: never less than half the uniform share, so none is
    left untrained on the strength of a few noisy draws.
    """

    def __init__(self, mode: str, sizes: dict[int, int], generator: torch.Generator):
        if mode not in CONTEXT_PICKS:
            raise ValueError(f"context_pick must be one of {', '.join(CONTEXT_PICKS)}, not {mode!r}")
        self.mode, self.g = mode, generator
        self.lag = {int(ti): torch.zeros(int(n), dtype=torch.float64) for ti, n in sizes.items()}
        self.draws = {int(ti): torch.zeros(int(n), dtype=torch.float64) for ti, n in sizes.items()}

    def weights(self, ti: int) -> torch.Tensor:
        """The probability of each of target ``ti``'s context prompts being drawn next."""
        n = len(self.lag[ti])
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        if self.mode == "uniform":
            return uniform
        seen = self.draws[ti] > 0
        r = torch.where(seen, self.lag[ti] / self.draws[ti].clamp_min(1), torch.ones_like(uniform))
        return 0.5 * uniform + 0.5 * r / r.sum().clamp_min(1e-30)

    def pick(self, ti: int) -> int:
        if self.mode == "uniform":  # the draw of before this setting, so that such runs repeat exactly
            return int(torch.randint(len(self.lag[ti]), (1,), generator=self.g))
        return int(torch.multinomial(self.weights(ti), 1, generator=self.g))

    def record(self, ti: int, j: int, context_loss: float, target_loss: float) -> None:
        """One draw's losses (both on the same ``x_t``)."""
        total = float(context_loss) + float(target_loss)
        if not total > 0 or total != total:  # both 0 (or not finite): nothing learned about this prompt
            return
        self.lag[ti][j] += float(context_loss) / total
        self.draws[ti][j] += 1

    def summary(self, texts: dict[int, list[str]]) -> dict:
        """Per target index's prompts: ``{text: [mean lag, draws]}`` (the file's metadata)."""
        out = {}
        for ti, lag in self.lag.items():
            names = texts.get(ti) or [str(j) for j in range(len(lag))]
            d = self.draws[ti]
            out[ti] = {names[j]: [round(float(lag[j] / d[j]), 4) if d[j] > 0 else None, int(d[j])]
                       for j in range(len(lag))}
        return out

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for ti in self.lag:
            out[f"{prefix}.lag.{ti}"] = self.lag[ti].clone()
            out[f"{prefix}.draws.{ti}"] = self.draws[ti].clone()
        return out

    def load_tensors(self, prefix: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Go on from a saved state; False (and nothing changed) where its prompts do not match this run's."""
        got = {}
        for ti, lag in self.lag.items():
            a, b = tensors.get(f"{prefix}.lag.{ti}"), tensors.get(f"{prefix}.draws.{ti}")
            if a is None or b is None or a.shape != lag.shape or b.shape != lag.shape:
                return False
            got[ti] = (a.to(torch.float64).clone(), b.to(torch.float64).clone())
        for ti, (a, b) in got.items():
            self.lag[ti], self.draws[ti] = a, b
        return True


__all__ = ["CONTEXT_PICKS", "ContextPicker", "FUNCTION_WORDS", "context_prompts"]
