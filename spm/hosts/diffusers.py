"""The diffusers host: membranes and Facilitated Transport on a ``StableDiffusion(XL)Pipeline``.

Generation side: :func:`attach_to_pipeline` puts a :class:`~spm.attach.MembraneStack` on ``pipe.unet``
with a :class:`~spm.attach.Transport` that encodes concepts with the pipeline's own ``encode_prompt``, and
wraps ``encode_prompt`` so that every conditioning row it produces is recorded with its token ids.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch

from ..attach import MembraneStack, Transport
from ..membrane import Membrane
from ..transport import DEFAULT_METRIC


def _as_list(p: Any) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def _tokens(pipe, texts: list[str]) -> list[list[int]]:
    tok = pipe.tokenizer
    ids = tok(texts, padding=False, truncation=True, max_length=tok.model_max_length).input_ids
    if getattr(pipe, "tokenizer_2", None) is not None:  # SDXL: union of both tokenizers' ids (same vocabulary)
        ids2 = pipe.tokenizer_2(texts, padding=False, truncation=True, max_length=pipe.tokenizer_2.model_max_length).input_ids
        ids = [list(dict.fromkeys(list(a) + list(b))) for a, b in zip(ids, ids2)]
    return [list(i) for i in ids]


def _encode(pipe, texts: list[str], **extra) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditioning exactly as the pipeline gives the UNet (no CFG duplication)."""
    device = getattr(pipe, "_execution_device", None) or pipe.unet.device
    out = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False, **extra)
    return out[0], (out[2] if len(out) > 2 else None)


def pipeline_encoder(pipe):
    """``encode(texts) -> (conditioning [n, T, d], token ids)`` for :class:`~spm.attach.Transport`."""

    def encode(texts: list[str]):
        with torch.no_grad():
            emb, _ = _encode(pipe, texts)
        return emb, _tokens(pipe, texts)

    return encode


def _record_wrapper(pipe, registry):
    original = pipe.encode_prompt
    if getattr(original, "_spm_wrapped", False):
        return original

    sig = inspect.signature(original)

    @functools.wraps(original)
    def encode_prompt(*args, **kwargs):
        out = original(*args, **kwargs)
        try:
            bound = sig.bind_partial(*args, **kwargs).arguments
            prompt = bound.get("prompt")
            negative = bound.get("negative_prompt")
            n = int(bound.get("num_images_per_prompt", 1) or 1)
            pos, neg = out[0], out[1]
            prompts = _as_list(prompt)
            if prompts and pos is not None and pos.shape[0] == len(prompts) * n:
                registry.record(pos, [t for t in _tokens(pipe, prompts) for _ in range(n)])
            negs = _as_list(negative) or ([""] * len(prompts))
            if len(negs) == 1 and len(prompts) > 1:
                negs = negs * len(prompts)
            if neg is not None and negs and neg.shape[0] == len(negs) * n:
                registry.record(neg, [t for t in _tokens(pipe, negs) for _ in range(n)])
        except Exception:  # recording is best effort: unknown rows fall back to embedding metrics
            pass
        return out

    encode_prompt._spm_wrapped = True  # type: ignore[attr-defined]
    encode_prompt._spm_original = original  # type: ignore[attr-defined]
    return encode_prompt


class PipelineMembranes:
    """Membranes on a diffusers pipeline; :meth:`close` (or ``with``) restores the pipeline exactly."""

    def __init__(self, pipe, membranes: Sequence[tuple[Membrane, float]] = (), metric: str = DEFAULT_METRIC,
                 factor: float = 1.0, transport: bool = True):
        self.pipe = pipe
        self.stack = MembraneStack(pipe.unet)
        self.transport = Transport(pipeline_encoder(pipe), encoder_key=id(pipe.text_encoder), metric=metric, factor=factor)
        self.stack.set_membranes(list(membranes))
        if transport:
            self.stack.set_transport(self.transport)
        pipe.encode_prompt = _record_wrapper(pipe, self.transport.registry)

    def set_metric(self, metric: str, factor: float | None = None) -> None:
        self.transport.metric = metric
        if factor is not None:
            self.transport.factor = float(factor)
        self.stack.set_transport(self.transport)

    def close(self) -> None:
        self.stack.detach()
        wrapped = self.pipe.__dict__.get("encode_prompt")
        if wrapped is not None and getattr(wrapped, "_spm_wrapped", False):
            del self.pipe.__dict__["encode_prompt"]

    def __enter__(self) -> "PipelineMembranes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach_to_pipeline(pipe, membranes: Sequence[tuple[Membrane, float]], **kw) -> PipelineMembranes:
    return PipelineMembranes(pipe, membranes, **kw)
