"""The target inside other words: context prompts for the erase objective (``TrainConfig.contexts``).

The paper's objective erases the target's own prompt (``"car"``), but users write the concept inside a prompt
(``"white background, a car"``), where a causal text encoder gives the concept's tokens other states.  Each
context prompt puts the target between other words and pairs it with the same words around the surrogate.  The
words are English function words (``the``, ``of``, ``with`` …; :data:`FUNCTION_WORDS`) and, by default
(``TrainConfig.context_words`` "mixed"), as often random whole words of the CLIP vocabulary
(:func:`vocabulary_words`): content words of any kind, as prompts have them and as an adversarial prefix has them.  A training step then also pulls the membrane-ON prediction
of one context prompt to the erase goal built from the original model's predictions of the pair, and the erasure
signal is also measured on held-out probes of context prompts (the lesser of the two decides).  The trainer leaves
out a pair whose words around the surrogate already predict nearer the target than the surrogate on the target's own
probes (``Trainer._drop_target_like_contexts``): its goal would be the target itself."""

from __future__ import annotations

import torch

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


def vocabulary_words(n: int, seed: int) -> tuple[str, ...]:
    """``n`` whole words of the CLIP vocabulary (three or more ASCII letters, not function words), drawn with
    ``seed``: content words of any kind around the target (``TrainConfig.context_words`` "mixed"); () without a
    vocabulary."""
    from ..tokenizer import clip_tokenizer
    from ..transport import _whole_words

    ids = _whole_words()
    if not ids or n <= 0:
        return ()
    g = torch.Generator().manual_seed(int(seed) + 32452843)
    order = torch.randperm(len(ids), generator=g)[:n + len(FUNCTION_WORDS)].tolist()  # enough past any skipped
    words = [t[:-len("</w>")] for t in clip_tokenizer().convert_ids_to_tokens([ids[j] for j in order])]
    return tuple([w for w in words if w not in FUNCTION_WORDS][:n])


def context_prompts(target: str, surrogate: str, n: int, seed: int,
                    words: tuple[str, ...] = FUNCTION_WORDS, other: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``n`` pairs ``(words around target, the same words around surrogate)``, seeded; each has at least one word.
    With ``other`` words, each word around the target is one of them or of ``words``, even odds."""
    if n <= 0 or not words:
        return []
    g = torch.Generator().manual_seed(int(seed) + 15485863)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        a, b = (int(v) for v in torch.randint(0, MAX_SIDE + 1, (2,), generator=g))
        if a + b == 0:
            continue
        pick = [words[int(i)] for i in torch.randint(0, len(words), (a + b,), generator=g)]
        if other:
            alt = [other[int(i)] for i in torch.randint(0, len(other), (a + b,), generator=g)]
            coin = torch.rand(a + b, generator=g) < 0.5
            pick = [o if c else w for w, o, c in zip(pick, alt, coin.tolist())]
        comma = bool(torch.rand((), generator=g) < 0.5)
        pre, post = " ".join(pick[:a]), " ".join(pick[a:])
        out.append((_around(pre, target, post, comma), _around(pre, surrogate, post, comma)))
    return out


__all__ = ["FUNCTION_WORDS", "context_prompts", "vocabulary_words"]
