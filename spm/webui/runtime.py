"""Membranes on the WebUI's loaded model (A1111 1.10 and Forge), with per-row strengths.

**Where the UNet is.** A1111: ``sd_model.model.diffusion_model`` (LDM for SD1/SD2, sgm for SDXL).
Forge (backend era): ``sd_model.forge_objects.unet`` (an ``UnetPatcher``) ``.model.diffusion_model``; its
``forge_objects`` are reset every batch, but clones share the module tree, so hooks on the modules persist.
Forge's Linear is not an ``nn.Linear``: :mod:`spm.naming` finds targets by name and weight shape.

**Where the strengths come from.** Nothing here looks at how the WebUI lays out its UNet batch.  The
:class:`~spm.attach.MembraneStack` pre-hook on the UNet reads each row's own conditioning (the ``context``
argument) and asks :class:`RowWeightTransport` for ``[rows, membranes]`` strengths =
transport score(row, concepts) × weight(row) × facilitate factor.  To know a row's *weight* (its prompt's
tags) and its *token ids* (for ``tokenuni``), the model's ``get_learned_conditioning`` is wrapped (an
instance attribute, removed on detach) and records every conditioning row it returns together with the
text it came from and its token ids.  Rows are later recognised by a fingerprint of their values
(:class:`spm.transport.RowRegistry`).  Batches of different prompts, negative prompts, AND, prompt
editing, the hires pass and chunked UNet calls therefore need no bookkeeping.

**Weight of a row.** A row whose text is one of the texts the WebUI derives from a prompt of the batch
(AND parts, prompt-editing alternatives, via the WebUI's own ``prompt_parser``) gets that prompt's weights
(the maximum, if two prompts share the text).  Every other row — negative prompts, the empty
unconditional, rows that cannot be recognised — gets the panel weights only: a ``<spm:…>`` tag never acts
on another prompt's images, and a negative prompt is treated as text like any other (its own transport
score decides how much a panel membrane acts on it, as in the reference, which applied the membrane to
both CFG branches).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..attach import MembraneStack, Transport
from ..membrane import Membrane
from ..transport import DEFAULT_METRIC, RowRegistry, check_metric
from .plan import BatchPlan

log = logging.getLogger("spm")

Tokenize = Callable[[list[str]], list[list[int]]]


# --- host discovery ------------------------------------------------------------------------------
def is_forge() -> bool:
    """True inside Forge (``modules_forge`` imports only there)."""
    import importlib.util
    import sys

    if "modules_forge" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def find_unet(sd_model: Any) -> tuple[nn.Module, str]:
    """``(diffusion_model, host)`` with host ``"forge"`` or ``"a1111"``; ``LookupError`` if none is loaded."""
    if sd_model is None:
        raise LookupError("no Stable Diffusion model is loaded")
    fo = getattr(sd_model, "forge_objects", None)
    patcher = getattr(fo, "unet", None) if fo is not None else None
    if patcher is not None:
        inner = getattr(patcher, "model", None)
        unet = getattr(inner, "diffusion_model", None)
        if isinstance(unet, nn.Module):
            return unet, "forge"
    wrapper = getattr(sd_model, "model", None)
    unet = getattr(wrapper, "diffusion_model", None)
    if isinstance(unet, nn.Module):
        return unet, "a1111"
    raise LookupError(f"cannot find the UNet of {type(sd_model).__name__} (neither model.diffusion_model nor forge_objects.unet)")


def crossattn(cond: Any) -> torch.Tensor | None:
    """The cross-attention rows of a conditioning: the tensor itself, or SDXL's ``cond['crossattn']``."""
    if isinstance(cond, torch.Tensor):
        return cond
    if isinstance(cond, dict):
        for key in ("crossattn", "c_crossattn", "cond"):
            v = cond.get(key)
            if isinstance(v, torch.Tensor):
                return v
    return None


def find_tokenizer(sd_model: Any) -> Tokenize | None:
    """The model's own ``tokenize(texts) -> ids`` (A1111's hijacked CLIP wrappers, SDXL's first embedder,
    Forge's text-processing engines), else None (token metrics then score 0; ``clipcos`` still works)."""
    candidates = []
    for attr in ("cond_stage_model", "text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
        obj = getattr(sd_model, attr, None)
        if obj is not None:
            candidates.append(obj)
            candidates.extend(getattr(obj, "embedders", None) or [])
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:
        candidates.extend(getattr(conditioner, "embedders", None) or [])
    for obj in candidates:
        fn = getattr(obj, "tokenize", None)
        if callable(fn):
            def tokenize(texts: list[str], fn=fn) -> list[list[int]]:
                return [list(map(int, ids)) for ids in fn(list(texts))]

            return tokenize
    return None


def find_text_encoders(sd_model: Any) -> list[Any]:
    """The WebUI's text encoders whose outputs make the cross-attention rows, in the order they are
    concatenated, each with ``encode_with_transformers(ids [n, L]) -> states [n, L, d]`` (A1111's hijacked
    ``cond_stage_model`` or SDXL ``conditioner.embedders``; Forge's ``text_processing_engine`` or its ``_l`` and
    ``_g``), or [] when the model has another layout (the exact padded path is then used)."""
    def usable(objs):
        return [o for o in objs if callable(getattr(o, "encode_with_transformers", None))]

    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:  # A1111 SDXL (sgm): CLIP-L then OpenCLIP-G; the vector embedders have no such method
        return usable(getattr(conditioner, "embedders", None) or [])
    for attrs in (("text_processing_engine_l", "text_processing_engine_g"), ("text_processing_engine",),
                  ("cond_stage_model",)):
        objs = [getattr(sd_model, a, None) for a in attrs]
        if all(o is not None for o in objs):
            found = usable(objs)
            return found if len(found) == len(objs) else []
    return []


def phrase_encoder(sd_model: Any):
    """A fast, unpadded phrase-window encoder on the WebUI's own text encoders
    (:func:`spm.transport.causal_phrase_encoder`), or None.

    The WebUI pads every text to 77-token chunks; calibrating Facilitated Transport and scoring phrase
    windows through ``get_learned_conditioning`` therefore costs minutes on a CPU WebUI.  Each window is
    encoded here as ``[BOS, *ids, EOS]`` by the same ``encode_with_transformers`` the WebUI uses (its clip
    skip, its layer choice; Forge loads the text encoder first, as its ``get_learned_conditioning`` does).
    :class:`~spm.attach.Transport` uses it only after it matched the exact path on a probe phrase.
    """
    encoders = find_text_encoders(sd_model)
    if not encoders:
        return None
    from ..transport import causal_phrase_encoder

    def device() -> Any:
        try:
            from modules import devices

            return devices.device
        except (ImportError, AttributeError):
            return None

    def load() -> None:
        clip = getattr(getattr(sd_model, "forge_objects", None), "clip", None)
        patcher = getattr(clip, "patcher", None)
        if patcher is None:
            return
        try:
            from backend import memory_management
        except ImportError:  # not Forge
            return
        memory_management.load_model_gpu(patcher)

    def run(ids: torch.Tensor) -> torch.Tensor:
        load()
        dev = device()
        ids = ids.to(dev) if dev is not None else ids
        states = [enc.encode_with_transformers(ids) for enc in encoders]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)

    return causal_phrase_encoder(run)


# --- recording conditioning rows ----------------------------------------------------------------
CHUNK = 77  # tokens per CLIP chunk in the WebUI (75 + BOS + EOS)


def lookup_with_prefix(lookup: Callable[[torch.Tensor], list], rows: torch.Tensor) -> list:
    """``lookup(rows)``, retrying unknown rows longer than one chunk with their first 77 tokens.

    The WebUI lengthens rows it never encoded that way: A1111's ``stack_conds`` pads a short prompt's rows
    with copies of its last vector when a batch mixes prompt lengths, and Forge repeats rows to a common
    length.  Their first chunk is still the recorded row.
    """
    hits = list(lookup(rows))
    if rows.ndim == 3 and rows.shape[1] > CHUNK and rows.shape[1] % CHUNK == 0:
        missing = [i for i, h in enumerate(hits) if h is None]
        if missing:
            for i, h in zip(missing, lookup(rows[missing, :CHUNK])):
                hits[i] = h
    return hits


def _dtype_versions(rows: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` and, unless already bf16, their bf16 rounding.

    Hosts cast the conditioning to the UNet's compute dtype before the call (A1111 ``dtype_unet``, Forge
    ``computation_dtype``).  fp16 rounding stays within the registry's tolerance; bf16 rounding (relative
    error up to 2^-8) does not, so the bf16-rounded rows are recorded too and then match exactly.
    """
    if rows.dtype == torch.bfloat16:
        return [rows]
    return [rows, rows.detach().to(torch.bfloat16)]


class TextRegistry:
    """Conditioning rows → (text, negative?) by value fingerprint (a :class:`RowRegistry` storing indices)."""

    def __init__(self, capacity: int = 2048):
        self._rows = RowRegistry(capacity=capacity)
        self._items: list[tuple[str, bool]] = []
        self._index: dict[tuple[str, bool], int] = {}

    def record(self, rows: torch.Tensor, texts: Sequence[str], negative: bool) -> None:
        ids = self._ids(texts, negative)
        for version in _dtype_versions(rows):
            self._rows.record(version, ids)

    def _ids(self, texts: Sequence[str], negative: bool) -> list[list[int]]:
        ids = []
        for t in texts:
            key = (str(t), bool(negative))
            if key not in self._index:
                self._index[key] = len(self._items)
                self._items.append(key)
            ids.append([self._index[key]])
        return ids

    def lookup(self, rows: torch.Tensor) -> list[tuple[str, bool] | None]:
        return [None if r is None else self._items[r[0]] for r in lookup_with_prefix(self._rows.lookup, rows)]

    def clear(self) -> None:
        self._rows.clear()
        self._items.clear()
        self._index.clear()


class RowWeightTransport(Transport):
    """:class:`~spm.attach.Transport` whose scores also carry each row's weight (its prompt's tags).

    The stack's own weights are all 1; ``scores`` returns score × weight(row, membrane).
    """

    def __init__(self, encode, tokenize: Tokenize | None, encoder_key: object = None,
                 metric: str = DEFAULT_METRIC, factor: float = 1.0, fast_encode_ids=None):
        # the text encoder may be offloaded while the UNet samples (lowvram, Forge): phrase states are
        # prepared before sampling (Attachment.prepare_concepts), never inside the UNet hook
        super().__init__(encode, encoder_key=encoder_key, metric=metric, factor=factor, lazy_phrases=False,
                         fast_encode_ids=fast_encode_ids)
        self.tokenize = tokenize
        self.texts = TextRegistry()
        self.panel: dict[str, float] = {}
        self.table: dict[str, dict[str, float]] = {}

    def phrase_text(self, text: str) -> str:
        """Escape the WebUI's attention syntax, so a decoded ``(`` is encoded as the literal token."""
        for ch in "\\()[]":
            text = text.replace(ch, "\\" + ch)
        return text

    def set_weights(self, panel: dict[str, float], table: dict[str, dict[str, float]]) -> None:
        self.panel = dict(panel)
        self.table = {k: dict(v) for k, v in table.items()}

    def row_weights(self, context: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """``[B, M]`` weights of each row for each membrane (see the module docstring for the rule)."""
        out = torch.zeros(context.shape[0], len(names))
        for i, hit in enumerate(self.texts.lookup(context)):
            weights = self.panel
            if hit is not None and not hit[1] and hit[0] in self.table:
                weights = self.table[hit[0]]
            for j, n in enumerate(names):
                out[i, j] = float(weights.get(n, 0.0))
        return out

    def scores(self, context, membranes, row_tokens=None):
        if row_tokens is None:
            row_tokens = lookup_with_prefix(self.registry.lookup, context)
        base = super().scores(context, membranes, row_tokens)
        return base * self.row_weights(context, [m.name for m in membranes])

    def record(self, texts: Sequence[str], cond: Any, negative: bool) -> None:
        rows = crossattn(cond)
        if rows is None or rows.shape[0] != len(texts):
            return
        texts = [str(t) for t in texts]
        self.texts.record(rows, texts, negative)
        if self.tokenize is not None:
            try:
                toks = self.tokenize(texts)
                for version in _dtype_versions(rows):
                    self.registry.record(version, toks)
            except Exception as e:  # tokens are an aid to tokenuni; never fail a generation for them
                log.debug("SPM: tokenizing for transport failed: %s", e)


def _wrap_conditioning(sd_model: Any, transport_ref: Callable[[], RowWeightTransport | None]) -> Callable:
    original = sd_model.get_learned_conditioning

    def get_learned_conditioning(texts, *args, **kwargs):
        out = original(texts, *args, **kwargs)
        transport = transport_ref()
        if transport is not None:
            try:
                transport.record(list(texts), out, bool(getattr(texts, "is_negative_prompt", False)))
            except Exception as e:  # recording is best effort
                log.debug("SPM: recording conditioning failed: %s", e)
        return out

    get_learned_conditioning._spm_original = original  # type: ignore[attr-defined]
    return get_learned_conditioning


class Attachment:
    """SPM on one loaded model: the conditioning recorder, the stack on its UNet, and the transport."""

    def __init__(self, sd_model: Any):
        self.unet, self.host = find_unet(sd_model)
        self._model_ref = weakref.ref(sd_model) if _weakrefable(sd_model) else (lambda m=sd_model: m)
        self.stack = MembraneStack(self.unet)
        original = sd_model.get_learned_conditioning
        self._original_glc = getattr(original, "_spm_original", original)

        def encode(texts: list[str]):
            with torch.no_grad():
                cond = self._original_glc(list(texts))
            rows = crossattn(cond)
            if rows is None:
                raise TypeError(f"get_learned_conditioning returned {type(cond).__name__}, not a tensor or a dict with 'crossattn'")
            toks = self.transport.tokenize(list(texts)) if self.transport.tokenize else [[] for _ in texts]
            return rows, toks

        self.transport = RowWeightTransport(encode, find_tokenizer(sd_model), encoder_key=id(sd_model),
                                            fast_encode_ids=phrase_encoder(sd_model))
        self._installed = False
        # (texts, negative) -> the registry's number of its first row when ensure_recorded recorded it
        self._seen: dict[tuple[tuple[str, ...], bool], int] = {}
        self.install_recorder()

    @property
    def sd_model(self) -> Any:
        return self._model_ref()

    def install_recorder(self) -> None:
        model = self.sd_model
        if model is None or self._installed:
            return
        ref = weakref.ref(self.transport)
        model.get_learned_conditioning = _wrap_conditioning(model, ref)
        self._installed = True

    def configure(self, plan: BatchPlan, texts_of: Callable[[str], set[str]], metric: str, factor: float) -> None:
        """Attach ``plan``'s membranes (hooks off when it has none) with per-row weights."""
        if not plan.active:
            self.clear()
            return
        check_metric(metric)
        table: dict[str, dict[str, float]] = {}
        for prompt, weights in plan.prompts:
            for text in texts_of(prompt):
                row = table.setdefault(text, {})
                for n, w in weights.items():
                    row[n] = max(row.get(n, w), w)
        self.transport.metric = metric
        self.transport.factor = float(factor)
        self.transport.set_weights(plan.panel, table)
        self.stack.set_membranes([(m, 1.0) for m in plan.membranes.values()])
        self.stack.set_transport(self.transport)  # also forgets cached strengths

    def ensure_recorded(self, groups: Sequence[tuple[str, ...]], negative: bool = False) -> int:
        """Encode and record the groups not recorded yet; returns how many were encoded.

        The WebUI caches conditionings between generations (and across Reload UI), so the recorder may
        never see them; encoding the same texts with the same function reproduces those rows exactly.
        A group is recorded again once the registry has forgotten its rows (it keeps the newest 1024: a long
        session, a flood of other texts), or its rows would silently get no strength.
        """
        reg = self.transport.registry
        todo = [g for g in dict.fromkeys(groups) if self._seen.get((g, negative), -1) < reg.dropped]
        for g in todo:
            with torch.no_grad():
                cond = self._original_glc(_conditioning_list(g, negative))
            first = reg.total
            self.transport.record(list(g), cond, negative)
            self._seen[(g, negative)] = first
        return len(todo)

    def prepare_concepts(self, membranes: Sequence[Membrane], prompts: Sequence[str] | None = None) -> None:
        """Encode concepts now (before sampling), so the text encoder is not needed inside the UNet hook.

        ``prompts``: the texts this generation conditions on (its prompts' groups and negatives); only their
        phrase windows are encoded, for the window lengths of ``membranes``' concepts.  Without them (or
        without a tokenizer) the windows of every recorded row are — which, after the recorder has seen
        thousands of texts (a training job's own encodings, a long session), costs minutes on a CPU."""
        tr = self.transport
        if tr.metric == "off":
            return
        texts = [c for m in membranes for c in m.gate_concepts]
        if texts:
            concepts = tr.concepts.get(texts, tr.encode, tr.encoder_key)
            # the calibrated ngram: from each file's spm_transport where this encoder matches it, else computed once
            tr.prepare_calibrations(membranes)
            if prompts is not None and tr.tokenize is not None:
                # the same tokenizer the recorder used, so these are the ids the hooks will look the rows up by
                rows = tr.tokenize(list(dict.fromkeys(str(t) for t in prompts)))
                tr.prepare_phrases(rows, tr._lengths(concepts))
            else:
                tr.prepare_phrases()  # windows of every recorded prompt, for the ngram metrics

    def clear(self) -> None:
        """Remove every UNet hook (the model computes exactly as without SPM); keep the recorder."""
        self.stack.clear()
        self.stack.set_transport(None)

    def detach(self) -> None:
        """Remove the hooks and the recorder: nothing of SPM stays on the model."""
        self.stack.detach()
        model = self.sd_model
        if model is not None and self._installed:
            wrapped = getattr(model, "__dict__", {}).get("get_learned_conditioning")
            if wrapped is not None and getattr(wrapped, "_spm_original", None) is not None:
                del model.__dict__["get_learned_conditioning"]
        self._installed = False
        self.transport.texts.clear()
        self.transport.registry.clear()
        self.transport.concepts.clear()
        self._seen.clear()


def _conditioning_list(texts: Sequence[str], negative: bool) -> list[str]:
    """``texts`` as the WebUI passes them (its ``SdConditioning`` when available, to carry the negative flag)."""
    try:
        from modules import prompt_parser

        return prompt_parser.SdConditioning(list(texts), is_negative_prompt=negative)
    except (ImportError, AttributeError, TypeError):
        return list(texts)


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


class Runtime:
    """The process-wide SPM state: at most one :class:`Attachment`, for the model in use."""

    def __init__(self) -> None:
        self.attachment: Attachment | None = None

    def attach(self, sd_model: Any) -> Attachment:
        """The attachment for ``sd_model``, created (and any other one detached) when needed."""
        unet, _ = find_unet(sd_model)
        att = self.attachment
        if att is not None and (att.sd_model is not sd_model or att.unet is not unet):
            self.detach()
            att = None
        if att is None:
            att = self.attachment = Attachment(sd_model)
        else:
            att.install_recorder()
        return att

    def clear(self) -> None:
        if self.attachment is not None:
            self.attachment.clear()

    def model_loaded(self, sd_model: Any) -> None:
        """``on_model_loaded``: a new model → detach everything; the same model (a VAE change fires this
        too) → only remove the UNet hooks, keeping what was recorded."""
        att = self.attachment
        if att is None:
            return
        try:
            same = att.sd_model is sd_model and find_unet(sd_model)[0] is att.unet
        except LookupError:
            same = False
        if same:
            att.clear()
        else:
            self.detach()

    def detach(self) -> None:
        """Model switch, Reload UI, disabling: every hook and wrapper off."""
        if self.attachment is not None:
            self.attachment.detach()
            self.attachment = None


def derived_groups(prompt: str, steps: Sequence[int], hires_steps: Sequence[int | None] = (None,),
                   use_old_scheduling: bool = False) -> list[tuple[str, ...]]:
    """The text groups the WebUI encodes for ``prompt``: per AND part, its prompt-editing alternatives.

    Each group is one ``get_learned_conditioning`` call of the WebUI (its texts are padded together, so a
    group must be encoded together to reproduce the rows exactly).  Uses the WebUI's own
    ``modules.prompt_parser``; the union over the given step counts (a superset is harmless: a text only
    matters if some conditioning row has exactly that text).
    """
    groups: dict[tuple[str, ...], None] = {}
    try:
        from modules import prompt_parser
    except ImportError:
        return [(prompt,)]
    try:
        _, flat, _ = prompt_parser.get_multicond_prompt_list([prompt])
        for s in steps:
            for h in hires_steps:
                for schedule in prompt_parser.get_learned_conditioning_prompt_schedules(list(flat), s, h, use_old_scheduling):
                    groups[tuple(text for _, text in schedule)] = None
    except Exception as e:  # a prompt the parser rejects is encoded as plain text by the WebUI too
        log.debug("SPM: prompt_parser failed on %r: %s", prompt, e)
        groups[(prompt,)] = None
    return list(groups)


def derived_texts(prompt: str, steps: Sequence[int], hires_steps: Sequence[int | None] = (None,),
                  use_old_scheduling: bool = False) -> set[str]:
    """Every text of :func:`derived_groups`."""
    return {t for g in derived_groups(prompt, steps, hires_steps, use_old_scheduling) for t in g}


__all__ = [
    "Attachment", "RowWeightTransport", "Runtime", "TextRegistry", "crossattn", "derived_groups", "derived_texts",
    "find_text_encoders", "find_tokenizer", "find_unet", "is_forge", "phrase_encoder",
]
