"""Attaching membranes to a UNet: one fused, removable forward hook per target module.

Every active membrane that touches a module is folded into one low-rank product::

    y = W x + U · diag(s_row) · D x,   D = [down_1; …; down_M]  (R × in),   U = [scale_1·up_1 … scale_M·up_M]  (out × R)

where ``s_row`` repeats each membrane's strength for that row of the batch over its rank columns.  Each
membrane is thus a separate delta (no cross terms), its effect linear in its strength, and a row whose
strengths are all 0 gets exactly ``W x``.  ``D``/``U`` are built once per (device, dtype) and only rebuilt
when the set of membranes changes; per UNet call only the strength vector changes.

Strengths are per row of the UNet batch.  They come either from :meth:`MembraneStack.set_strengths` or,
with a :class:`spm.transport`-based scorer, from a forward pre-hook on the UNet that reads each row's own
conditioning (``encoder_hidden_states`` / ``context``).  Nothing assumes how the host lays out its batch.

Removing the hooks (:meth:`MembraneStack.detach`) restores the model exactly: weights are never touched.

**No host sync per step.** A UNet call whose conditioning is the very tensor of the previous call (same
object, not modified in place since; diffusers pipelines pass one tensor to every step) costs the pre-hook
nothing: no fingerprint, no device work.  Another tensor is fingerprinted on its device and only the 16
sampled values per row come to the host (one small copy: a sync on CUDA); the transport scores rows only
when that fingerprint is new.  Strengths go to the device once per change (pinned, non-blocking), and
every per-module strength column is sliced from that copy on the device, so the hooks never sync.

**Row scaling** (:attr:`MembraneStack.row_scaling`): ``"cached"`` folds each row's strengths into a per-row
copy of ``U`` (``[B, R, out]`` per module, built once per strength change; one batched GEMM per module,
fastest on CPU, but its memory grows with batch × rank × width); ``"lowrank"`` scales the low-rank
activations ``D x`` (``[B, tokens, R]``) instead and adds ``U`` with one GEMM, caching nothing per row.
``"auto"`` (default): ``cached`` on CPU, ``lowrank`` on other devices (see the README, Overhead).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import resolve_targets
from .membrane import Membrane
from .naming import KeyMap, Target, context_dim, describe_architecture
from .transport import (
    DEFAULT_METRIC,
    METRICS,
    Calibration,
    ConceptCache,
    Encoder,
    PhraseCache,
    PhraseEncoder,
    RowRegistry,
    _m_clipcos,
    _m_clipcos_tokenuni,
    _m_tokenuni,
    calibrate,
    checked_phrase_encoder,
    concept_scores,
    content_ids,
    content_positions,
    content_tokens,
    is_calibrated,
    needs_phrases,
    phrase_lengths,
    uses_gate,
    uses_response,
    windows,
)

log = logging.getLogger("spm")


def default_context(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The cross-attention conditioning of a UNet call: diffusers ``encoder_hidden_states``, LDM ``context``."""
    for key in ("encoder_hidden_states", "context"):
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if len(args) >= 3 and isinstance(args[2], torch.Tensor):
        return args[2]
    return None


# a lone rank-1 down projection on an input at least this large runs as a 2-row GEMM (see MembraneStack._make_hook)
PAD_RANK1_MIN_NUMEL = 1 << 20

ROW_SCALING = ("auto", "cached", "lowrank")
FINGERPRINT_POINTS = 16  # strided values per conditioning row that decide whether strengths must be recomputed

# built-in metrics that Transport.scores evaluates batched: name -> (function, uses clipcos, uses tokenuni)
_BUILTIN = {
    "clipcos": (_m_clipcos, True, False),
    "tokenuni": (_m_tokenuni, False, True),
    "clipcos_tokenuni": (_m_clipcos_tokenuni, True, True),
}


@dataclass
class _Slot:
    membrane: Membrane
    weight: float
    mapping: dict[str, Target]


@dataclass
class _Fused:
    kind: str
    parts: list[tuple[int, Any]]  # (slot index, MembraneLayer)
    cols: torch.Tensor  # [R] slot index of each rank column
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    padded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # rank-1 downs, see the hook
    # modules with the same membranes (and ranks) share one strength-column tensor per call
    cols_key: tuple = ()
    cols_on: dict = field(default_factory=dict)  # device -> ``cols`` there (index of the device strengths)


class Transport:
    """Facilitated Transport scorer bound to one host's text encoder.

    ``encode(texts)`` must return conditioning exactly as the UNet receives it plus token ids, so that
    concept embeddings and rows are comparable.  ``encoder_key`` identifies the encoder for the cache
    (e.g. the checkpoint hash); change it when the model changes.
    """

    def __init__(self, encode: Encoder, encoder_key: object = None, metric: str = DEFAULT_METRIC,
                 factor: float = 1.0, registry: RowRegistry | None = None,
                 encode_ids: PhraseEncoder | None = None, lazy_phrases: bool = True,
                 fast_encode_ids: PhraseEncoder | None = None):
        self.encode = encode
        self.encoder_key = encoder_key
        self.metric = metric
        self.factor = float(factor)
        self.registry = registry or RowRegistry()
        self.concepts = ConceptCache()
        self.phrases = PhraseCache()
        self.encode_ids = encode_ids or self._decode_and_encode
        if fast_encode_ids is not None:  # e.g. causal_phrase_encoder: used once it matches the exact path
            self.encode_ids = checked_phrase_encoder(fast_encode_ids, self.encode_ids)
        # lazy: missing phrase states are encoded inside scores() (fine where the text encoder stays loaded);
        # otherwise hosts call prepare_phrases() before sampling and missing windows score 0
        self.lazy_phrases = lazy_phrases
        self._matrices: dict[tuple, tuple] = {}  # concept set -> (embeddings kept alive, unit matrix, token sets, shape)
        self._tokenizer = None
        from .gate import GateCache

        self.gates = GateCache()  # the membrane gates (metrics with uses_gate), calibrated once per membrane
        # the response gate (metrics with uses_response): a host that can run its UNet inside the hooks sets a
        # spm.response.Responder here; without one those metrics are their words part alone (warned once)
        self.responder = None
        self._warned_responder = False

    def _decode_and_encode(self, seqs: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Default phrase encoder: token ids → text (the CLIP vocabulary) → ``encode`` → content states and the EOS
        state after them (see :data:`spm.transport.PhraseEncoder`)."""
        if self._tokenizer is None:
            from .tokenizer import clip_tokenizer

            self._tokenizer = clip_tokenizer()
        texts = [self.phrase_text(self._tokenizer.decode(list(q), skip_special_tokens=True,
                                                         clean_up_tokenization_spaces=False).strip()) for q in seqs]
        emb, toks = self.encode(texts)
        out = []
        for e, t, q in zip(emb, toks, seqs):
            n = max(1, min(len(content_ids(t)) or len(q), e.shape[0] - 2))
            if n == len(q):
                out.append(e[1:2 + n])  # content states, then the EOS
            else:  # decoding changed the tokens: the content states only, never len(q) + 1 rows (read as content + EOS)
                out.append(e[1:1 + (len(q) if n == len(q) + 1 else n)])
        return out

    def phrase_text(self, text: str) -> str:
        """A decoded window as the host's ``encode`` must see it (hosts with prompt syntax escape it)."""
        return text

    def _lengths(self, concepts) -> set[int]:
        """The window lengths the metric reads for ``concepts``."""
        return {n for ce in concepts for n in phrase_lengths(self.metric, content_positions(ce.tokens, ce.embedding.shape[0]))}

    def prepare_calibrations(self, membranes: Sequence[Membrane]) -> list[Calibration]:
        """Calibrate the membranes' concepts on this encoder (calibrated metrics only; from each file's
        ``spm_transport`` where its encoder fingerprint matches), while the text encoder is available."""
        if uses_gate(self.metric):
            self.prepare_gates(membranes)
        if not is_calibrated(self.metric):
            return []
        out = []
        for m in membranes:
            for ce in self.concepts.get(m.gate_concepts, self.encode, self.encoder_key):
                out.append(calibrate(ce, self.phrases, self.encode_ids, getattr(m.info, "transport", None)))
        return out

    def _encode_context(self, texts: list[str]) -> torch.Tensor:
        return self.encode([self.phrase_text(t) for t in texts])[0]

    def prepare_gates(self, membranes: Sequence[Membrane]) -> list:
        """Calibrate the membranes' gates on this encoder (from each file's ``spm_transport["gate"]`` where its
        encoder and weights match), while the text encoder is available. Returns the gates."""
        return [self.gates.get(m, self._encode_context) for m in membranes]

    def gate_scores(self, context: torch.Tensor, membranes: Sequence[Membrane]) -> torch.Tensor:
        """``[B, M]`` gate scores of each row for each membrane (0 for a membrane whose gate is not prepared,
        where phrases are not encoded lazily)."""
        cols = []
        for m in membranes:
            gate = self.gates.peek(m)
            if gate is None and self.lazy_phrases:
                gate = self.gates.get(m, self._encode_context)
            cols.append(gate.score(context) if gate is not None else torch.zeros(context.shape[0]))
        return torch.stack(cols, 1) if cols else torch.zeros(context.shape[0], 0)

    def prepare_phrases(self, row_tokens: Sequence[Sequence[int] | None] | None = None,
                        lengths: Sequence[int] | None = None) -> int:
        """Encode the phrase windows of ``row_tokens`` (default: every recorded row) for the concept lengths
        known so far (or ``lengths``), while the text encoder is available. Returns how many were encoded."""
        if not needs_phrases(self.metric):
            return 0
        rows = self.registry.tokens() if row_tokens is None else row_tokens
        lens = set(lengths) if lengths is not None else self._lengths(self.concepts.embeddings())
        done = self.phrases.prepared
        todo = {(tuple(ids), m) for ids in rows if ids is not None for m in lens} - done
        seqs = [w for ids, m in todo for w in windows(ids, m)]
        n = self.phrases.prepare(seqs, self.encode_ids) if seqs else 0
        done.update(todo)
        return n

    def scores(self, context: torch.Tensor, membranes: Sequence[Membrane],
               row_tokens: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
        """Clamped scores ``[B, M]`` (before weights and factor)."""
        if row_tokens is None:
            row_tokens = self.registry.lookup(context)
        fast = _BUILTIN.get(self.metric)
        if fast is not None and METRICS.get(self.metric) is fast[0] and membranes:
            out = self._scores_batched(context, membranes, row_tokens, *fast[1:])
            if out is not None:
                return out
        cols = []
        phrases = needs_phrases(self.metric)
        gated = uses_gate(self.metric)
        for m in membranes:
            concepts = self.concepts.get(m.gate_concepts, self.encode, self.encoder_key) if self.metric != "off" else []
            if phrases and self.lazy_phrases and concepts:
                self.prepare_calibrations([m])
                self.prepare_phrases(row_tokens, self._lengths(concepts))
            if gated and concepts and not phrases:  # the gate alone: its words part is 0
                cols.append(torch.zeros(context.shape[0]))
                continue
            cols.append(concept_scores(context, row_tokens, concepts, self.metric, phrases=self.phrases))
        out = torch.stack(cols, 1) if cols else torch.zeros(context.shape[0], 0)
        if gated and membranes:
            out = torch.maximum(out, self.gate_scores(context, membranes))
        if uses_response(self.metric) and membranes:
            out = torch.maximum(out, self.response_scores(context, membranes))
        return out

    def response_scores(self, context: torch.Tensor, membranes: Sequence[Membrane]) -> torch.Tensor:
        """``[B, M]`` response-gate scores (:mod:`spm.response`); 0 without a host responder."""
        if self.responder is None:
            if not self._warned_responder:
                self._warned_responder = True
                log.warning("SPM: the %r transport metric needs a host that runs its UNet for the response gate; "
                            "this host has none, so only its words part applies", self.metric)
            return torch.zeros(context.shape[0], len(membranes))
        try:
            return self.responder.scores(context, membranes)
        except Exception as e:  # e.g. another extension's UNet patch that does not expect a second call: never fail
            if not self._warned_responder:  # a generation for it; the words part still applies
                self._warned_responder = True
                log.warning("SPM: the response gate failed (%s: %s); only the words part of %r applies",
                            type(e).__name__, e, self.metric)
            return torch.zeros(context.shape[0], len(membranes))

    def _scores_batched(self, context: torch.Tensor, membranes: Sequence[Membrane],
                        row_tokens: Sequence[Sequence[int] | None], use_cos: bool, use_tok: bool) -> torch.Tensor | None:
        """The built-in metrics for all membranes' concepts at once: one ``[B·chunks, C]`` matmul of unit
        vectors for ``clipcos`` instead of a cosine per (row, concept), the same formula as
        :func:`spm.transport.concept_scores`.  ``None`` where a row and a concept have incomparable lengths
        (the per-concept path handles those)."""
        texts = list(dict.fromkeys(c for m in membranes for c in m.gate_concepts))
        b = context.shape[0]
        if not texts:
            return torch.ones(b, len(membranes))
        ces = self.concepts.get(texts, self.encode, self.encoder_key)
        key = tuple(id(ce) for ce in ces)
        entry = self._matrices.get(key)
        if entry is None:
            shapes = {tuple(ce.embedding.shape) for ce in ces}
            if len(shapes) != 1:
                return None
            # unit vectors (normalised in float64), laid out per token: [T0, d, C] float32
            mat = torch.stack([ce.embedding.reshape(-1) for ce in ces]).double()
            mat = mat / mat.norm(dim=1, keepdim=True).clamp_min(1e-8)
            t0_, d_ = next(iter(shapes))
            mat = mat.reshape(len(ces), t0_, d_).permute(1, 2, 0).float().contiguous()
            entry = (ces, mat, [content_tokens(ce.tokens) for ce in ces], next(iter(shapes)))
            if len(self._matrices) > 64:
                self._matrices.clear()
            self._matrices[key] = entry
        _, mat, concept_sets, (t0, dim) = entry
        s = torch.zeros(b, len(texts))
        if use_cos:
            ctx = context.detach().float().cpu()
            t = ctx.shape[1]
            if ctx.ndim != 3 or ctx.shape[2] != dim or t % t0:
                return None
            rows = ctx.reshape(b * (t // t0), t0, dim)
            # per-token float32 products, summed over tokens in float64: as accurate as the per-pair cosines
            # of clipcos, at float32 matmul speed
            dots = torch.bmm(rows.transpose(0, 1), mat).double().sum(0)
            norms = rows.reshape(rows.shape[0], -1).norm(dim=1, keepdim=True).double().clamp_min(1e-8)
            s = (dots / norms).reshape(b, t // t0, len(texts)).amax(1).float()
        if use_tok:
            sets = [content_tokens(r) for r in row_tokens]
            tok = torch.tensor([[len(r & c) / len(c) if c else 0.0 for c in concept_sets] for r in sets],
                               dtype=torch.float32).reshape(b, len(texts))
            s = torch.maximum(s, tok) if use_cos else tok
        index = {c: i for i, c in enumerate(texts)}
        cols = []
        for m in membranes:
            if m.gate_concepts:
                cols.append(s[:, [index[c] for c in m.gate_concepts]].amax(1).clamp(0.0, 1.0))
            else:
                cols.append(torch.ones(b))
        return torch.stack(cols, 1)


class MembraneStack:
    """Any number of membranes on one UNet, each with a user weight and a per-row strength.

    Usage::

        stack = MembraneStack(unet)
        stack.add(membrane, weight=1.0)          # validates first; nothing attached on error
        stack.set_transport(Transport(encode))   # strengths from each row's conditioning
        ...                                      # run the UNet as usual
        stack.detach()                           # bit-identical model again
    """

    def __init__(self, unet: nn.Module, *, trainable: bool = False,
                 context_getter: Callable[[tuple, dict], torch.Tensor | None] = default_context):
        self.unet = unet
        self.keymap = KeyMap.for_model(unet)
        if not len(self.keymap):
            raise ValueError("no SPM targets found in this model (is it a Stable Diffusion UNet?)")
        self.model_ctx = context_dim(unet)
        self.model_arch = describe_architecture(self.model_ctx)
        self.trainable = trainable
        self.context_getter = context_getter
        self.transport: Transport | None = None
        self._modules = dict(unet.named_modules())
        self._slots: list[_Slot] = []
        self._fused: dict[str, _Fused] = {}
        self._hooks: dict[str, Any] = {}
        self._pre_hook = None
        self._strengths: torch.Tensor | None = None  # [B, M] float32 cpu, or None = off
        self._version = 0
        self._col_cache: dict[tuple, torch.Tensor] = {}
        self._last_sig: tuple | None = None
        self._last_ctx: tuple | None = None  # (weakref to the last conditioning tensor, its version, config)
        self._fp_index: dict[tuple, torch.Tensor] = {}  # (numel, device) -> fingerprint positions there
        self._dev_strengths: dict[torch.device, torch.Tensor] = {}  # the strengths, copied once per device
        self._warned: set[str] = set()
        #: how per-row strengths are applied in the in-place path: see the module docstring
        self.row_scaling = "auto"

    # --- membranes -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.membrane.name for s in self._slots]

    @property
    def membranes(self) -> list[Membrane]:
        return [s.membrane for s in self._slots]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self._slots]

    def add(self, membrane: Membrane, weight: float = 1.0) -> None:
        """Attach ``membrane`` (replacing one of the same name). Raises before attaching anything."""
        mapping = resolve_targets(membrane, self.keymap, self.model_arch, self.model_ctx)
        slot = _Slot(membrane, float(weight), mapping)
        for i, s in enumerate(self._slots):
            if s.membrane.name == membrane.name:
                self._slots[i] = slot
                break
        else:
            self._slots.append(slot)
        self._rebuild()

    def remove(self, name: str) -> None:
        self._slots = [s for s in self._slots if s.membrane.name != name]
        self._rebuild()

    def set_weight(self, name: str, weight: float) -> None:
        for s in self._slots:
            if s.membrane.name == name:
                s.weight = float(weight)
        self._last_sig = None

    def set_membranes(self, items: Sequence[tuple[Membrane, float]]) -> None:
        """Make the attached set exactly ``items`` (validating all before changing anything)."""
        slots = [_Slot(m, float(w), resolve_targets(m, self.keymap, self.model_arch, self.model_ctx)) for m, w in items]
        same = [s.membrane for s in slots] == self.membranes
        self._slots = slots
        if same:
            self._last_sig = None
        else:
            self._rebuild()

    def clear(self) -> None:
        self._slots = []
        self._rebuild()

    def _rebuild(self) -> None:
        per_module: dict[str, list[tuple[int, Any]]] = {}
        for i, slot in enumerate(self._slots):
            for stem, target in slot.mapping.items():
                per_module.setdefault(target.name, []).append((i, slot.membrane.layers[stem]))
        self._fused = {}
        for name, parts in per_module.items():
            cols = torch.cat([torch.full((layer.rank,), i, dtype=torch.long) for i, layer in parts])
            self._fused[name] = _Fused(parts[0][1].kind, parts, cols, cols_key=tuple(cols.tolist()))
        for name in list(self._hooks):
            if name not in self._fused:
                self._hooks.pop(name).remove()
        for name in self._fused:
            if name not in self._hooks:
                self._hooks[name] = self._modules[name].register_forward_hook(self._make_hook(name))
        if self._slots and self._pre_hook is None:
            self._pre_hook = self.unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True)
        if not self._slots and self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        self._version += 1
        self._new_strengths()
        self._last_sig = None

    def detach(self) -> None:
        """Remove every hook. The model is exactly as before :meth:`add`."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        self._slots = []
        self._fused = {}
        self._strengths = None

    def __enter__(self) -> "MembraneStack":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # --- strengths -------------------------------------------------------------------------
    def set_transport(self, transport: Transport | None) -> None:
        """Strengths from each row's conditioning (None: uniform user weights)."""
        self.transport = transport
        self._last_sig = None

    def set_strengths(self, strengths: torch.Tensor | Sequence[float] | None) -> None:
        """Fix strengths for the next UNet calls: ``[B, M]`` per row, ``[M]`` for all rows, or None.

        Explicit strengths replace transport and user weights until :meth:`release_strengths`.
        """
        if strengths is not None:
            s = torch.as_tensor(strengths, dtype=torch.float32).cpu()
            if s.ndim == 1:
                s = s[None]
            if s.shape[-1] != len(self._slots):
                raise ValueError(f"strengths have {s.shape[-1]} columns for {len(self._slots)} membranes")
            strengths = s
        self._strengths = strengths
        self._manual = True
        self._new_strengths()

    def _new_strengths(self) -> None:
        """Forget everything derived from the strengths (columns, device copies, scaled ups, row runs)."""
        self._col_cache.clear()
        self._dev_strengths.clear()

    def release_strengths(self) -> None:
        self._manual = False
        self._strengths = None
        self._last_sig = None

    _manual = False
    _bypass = False

    @contextlib.contextmanager
    def bypassed(self):
        """UNet calls inside this block compute as without membranes, and leave the stack's state as it was: for
        calls made from inside the stack's own hook (the response gate, :mod:`spm.response`)."""
        saved = (self._strengths, self._bypass)
        self._strengths, self._bypass = None, True
        try:
            yield self
        finally:
            self._strengths, self._bypass = saved

    @property
    def current_strengths(self) -> torch.Tensor | None:
        """The ``[B, M]`` strengths of the last UNet call (for logs and tests)."""
        return self._strengths

    def strengths_for(self, context: torch.Tensor, row_tokens: Sequence[Sequence[int] | None] | None = None,
                      batch: int | None = None) -> torch.Tensor:
        """``[B, M]`` = weight × factor × transport score (or weight alone without transport)."""
        w = torch.tensor(self.weights, dtype=torch.float32)
        if self.transport is None or context is None:
            b = batch if batch is not None else (context.shape[0] if context is not None else 1)
            return w[None].expand(b, -1).clone()
        sc = self.transport.scores(context, self.membranes, row_tokens)
        return sc * w[None] * self.transport.factor

    def _config_sig(self) -> tuple:
        """What the strengths depend on besides the conditioning."""
        return (self._version, id(self.transport), tuple(self.weights), getattr(self.transport, "factor", None),
                getattr(self.transport, "metric", None))

    @staticmethod
    def _tensor_version(t: torch.Tensor) -> int | None:
        """``t``'s in-place version counter; None for inference tensors, which do not track one."""
        try:
            return None if t.is_inference() else int(t._version)
        except RuntimeError:
            return None

    def _same_tensor(self, ctx: torch.Tensor, conf: tuple) -> bool:
        """Whether ``ctx`` is the last call's conditioning tensor itself, unchanged since (no device work)."""
        last = self._last_ctx
        if last is None or self._last_sig is None or last[0]() is not ctx or last[2] != conf:
            return False
        return last[1] is not None and self._tensor_version(ctx) == last[1]

    def _remember(self, ctx: torch.Tensor, conf: tuple) -> None:
        try:
            self._last_ctx = (weakref.ref(ctx), self._tensor_version(ctx), conf)
        except TypeError:
            self._last_ctx = None

    def _fingerprint(self, ctx: torch.Tensor) -> bytes:
        """:data:`FINGERPRINT_POINTS` strided values per row, gathered on the device; only they come to the host."""
        flat = ctx.detach().reshape(ctx.shape[0], -1)
        key = (flat.shape[1], flat.device)
        idx = self._fp_index.get(key)
        if idx is None:
            idx = torch.linspace(0, flat.shape[1] - 1, FINGERPRINT_POINTS).long().to(flat.device)
            if len(self._fp_index) > 16:
                self._fp_index.clear()
            self._fp_index[key] = idx
        return flat.index_select(1, idx).float().cpu().numpy().tobytes()

    def _unet_pre_hook(self, module, args, kwargs):
        if self._manual or self._bypass or not self._slots:
            return None
        ctx = self.context_getter(args, kwargs)
        batch = None
        if ctx is None:
            x = args[0] if args else kwargs.get("sample", kwargs.get("x"))
            batch = x.shape[0] if isinstance(x, torch.Tensor) else 1
        sig = None
        if ctx is not None:
            conf = self._config_sig()
            if self._same_tensor(ctx, conf):  # the steady state of a sampling loop: nothing to do
                return None
            sig = (conf, tuple(ctx.shape), self._fingerprint(ctx))
            if sig != self._last_sig:
                self._strengths = self.strengths_for(ctx)
                self._new_strengths()
                self._last_sig = sig
            self._remember(ctx, conf)
            return None
        self._strengths = self.strengths_for(ctx, batch=batch)
        self._new_strengths()
        self._last_sig = None
        self._last_ctx = None
        return None

    # --- the hook --------------------------------------------------------------------------
    @staticmethod
    def _stacked(f: _Fused) -> tuple[torch.Tensor, torch.Tensor]:
        """``D [R, in]`` and ``U [out, R]`` (scales folded into U) of all membranes on one module."""
        downs = [layer.down_matrix() for _, layer in f.parts]
        ups = [layer.up_matrix() * layer.scale for _, layer in f.parts]
        d = downs[0] if len(downs) == 1 else torch.cat(downs, 0)
        u = ups[0] if len(ups) == 1 else torch.cat(ups, 1)
        return d, u

    def _fused_tensors(self, f: _Fused, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if not self.trainable and key in f.cache:
            return f.cache[key]
        if self.trainable:
            d, u = self._stacked(f)
            return d.to(device=device, dtype=dtype), u.to(device=device, dtype=dtype)
        # normal (not inference-mode) tensors, so that a later call with autograd recording can use the cache
        with torch.inference_mode(False), torch.no_grad():
            d, u = self._stacked(f)
            d = d.detach().to(device=device, dtype=dtype).contiguous()
            u = u.detach().to(device=device, dtype=dtype).contiguous()
        f.cache[key] = (d, u)
        return d, u

    @staticmethod
    def _padded_down(f: _Fused, d: torch.Tensor) -> torch.Tensor:
        """``d`` ([1, in]) with a zero second row, cached next to it."""
        key = (d.device, d.dtype)
        hit = f.padded.get(key)
        if hit is None or hit[1] is not d:
            with torch.inference_mode(False), torch.no_grad():
                hit = (torch.cat([d, torch.zeros_like(d)], 0).contiguous(), d)
            f.padded[key] = hit
        return hit[0]

    def _strengths_on(self, device: torch.device) -> torch.Tensor:
        """The ``[B, M]`` strengths on ``device``: one copy per strength change (pinned and non-blocking to
        CUDA, so the host does not wait for the GPU)."""
        hit = self._dev_strengths.get(device)
        if hit is None:
            s = self._strengths
            if device.type == "cpu":
                hit = s
            elif device.type == "cuda":
                hit = s.pin_memory().to(device, non_blocking=True)
            else:
                hit = s.to(device)
            self._dev_strengths[device] = hit
        return hit

    def _row_scales(self, f: _Fused, device, dtype) -> torch.Tensor | None:
        s = self._strengths
        if s is None:
            return None
        key = (f.cols_key, device, dtype)
        hit = self._col_cache.get(key)
        if hit is None:
            with torch.inference_mode(False):  # usable by calls with and without autograd (see _fused_tensors)
                if not torch.any(s[:, f.cols] != 0):  # decided on the host copy: no device sync
                    hit = torch.empty(0)
                else:
                    cols = f.cols_on.get(device)
                    if cols is None:
                        cols = f.cols_on[device] = f.cols.to(device)
                    hit = self._strengths_on(device).index_select(1, cols).to(dtype)
            self._col_cache[key] = hit
        return None if hit.numel() == 0 else hit

    def _scaling_mode(self, device: torch.device) -> str:
        mode = self.row_scaling
        if mode not in ROW_SCALING:
            raise ValueError(f"row_scaling={mode!r}; expected one of {ROW_SCALING}")
        if mode == "auto":
            return "cached" if device.type == "cpu" else "lowrank"
        return mode

    def _active_runs(self, f: _Fused, b: int) -> list[tuple[int, int]]:
        """Maximal runs ``[start, end)`` of rows with a non-zero strength on ``f``'s membranes.  Rows whose
        strengths are all 0 (e.g. an unconditional row that names no erased concept) are skipped entirely:
        their output is the module's own, and the hook costs nothing for them."""
        key = ("runs", f.cols_key, b)
        hit = self._col_cache.get(key)
        if hit is None:
            active = (self._strengths[:, f.cols] != 0).any(1).tolist()
            hit, start = [], None
            for i, a in enumerate(active + [False]):
                if a and start is None:
                    start = i
                elif not a and start is not None:
                    hit.append((start, i))
                    start = None
            self._col_cache[key] = hit
        return hit

    def _scaled_up(self, name: str, u: torch.Tensor, sc: torch.Tensor, conv: bool) -> torch.Tensor:
        """Per-row ``U · diag(s_row)``: ``[B, out, R]`` (conv) or ``[B, R, out]`` (linear), cached until the
        strengths change (the strength-column cache is cleared at the same moments)."""
        key = ("up", name, u.device, u.dtype, sc.shape[0])
        hit = self._col_cache.get(key)
        if hit is None:
            with torch.inference_mode(False):
                hit = (u[None] * sc[:, None, :]) if conv else (u.t()[None] * sc[:, :, None])
                hit = hit.contiguous()
            self._col_cache[key] = hit
        return hit

    def _make_hook(self, name: str):
        def hook(module, args, output):
            f = self._fused.get(name)
            if f is None or not isinstance(output, torch.Tensor):
                return None
            sc = self._row_scales(f, output.device, output.dtype)
            if sc is None:
                return None
            x = args[0]
            b = x.shape[0]
            if sc.shape[0] != b:
                if sc.shape[0] == 1:
                    sc = sc.expand(b, -1)
                else:
                    if name not in self._warned:
                        self._warned.add(name)
                        log.warning("SPM: %s got %d rows but strengths for %d; using the maximum strength", name, b, sc.shape[0])
                    sc = sc.amax(0, keepdim=True).expand(b, -1)
            d, u = self._fused_tensors(f, output.device, output.dtype)
            if x.dtype != output.dtype:
                x = x.to(output.dtype)
            # Inference: add the low-rank product into the module's fresh output in place, as one GEMM with
            # beta = 1 (no delta tensor, no second pass over the output).  With autograd recording, keep the
            # out-of-place form.
            if output.is_contiguous() and not (torch.is_grad_enabled() and (output.requires_grad or self.trainable)):
                # two ops per module: the down projection, then one batched GEMM with the per-row scaled
                # ups (built once per strength change), so no separate scaling pass; rows without any
                # strength are skipped (batch slices of contiguous tensors are contiguous views)
                runs = self._active_runs(f, b) if self._strengths.shape[0] == b else [(0, b)]  # sc is set: so are strengths
                lowrank = self._scaling_mode(output.device) == "lowrank"
                if f.kind == "conv":
                    if x.is_contiguous() and x.ndim == 4:
                        ub = None if lowrank else self._scaled_up(name, u, sc, conv=True)  # [B, out, R]
                        for a, e in runs:
                            xs = x if (a, e) == (0, b) else x[a:e]
                            h = torch.matmul(d, xs.reshape(e - a, x.shape[1], -1))  # [b', R, HW]
                            o = output[a:e].view(e - a, output.shape[1], -1)
                            if lowrank:  # scale the R low-rank channels per row, then one shared U
                                o.baddbmm_(u.expand(e - a, -1, -1), h.mul_(sc[a:e, :, None]))
                            else:
                                o.baddbmm_(ub[a:e], h)
                        return output
                elif x.is_contiguous() or runs == [(0, b)]:
                    ub = None if lowrank else self._scaled_up(name, u, sc, conv=False)  # [B, R, out]
                    # rank 1 in all: a one-row down projection is a GEMV, which runs on one thread; with a zero
                    # second row it is a (threaded) GEMM, about twice as fast on large inputs
                    dd = self._padded_down(f, d) if d.shape[0] == 1 and x.numel() >= PAD_RANK1_MIN_NUMEL else d
                    for a, e in runs:
                        xs = x if (a, e) == (0, b) else x[a:e]
                        h = F.linear(xs, dd)
                        if dd is not d:
                            h = h[..., :1]
                        h = h.reshape(e - a, -1, h.shape[-1])  # [b', tokens, R]
                        o = output[a:e].view(e - a, -1, output.shape[-1])
                        if lowrank:  # h · diag(s_row), then all rows' tokens through U in one GEMM
                            h = h * sc[a:e, None, :]
                            o.view(-1, o.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), u.t())
                        else:
                            o.baddbmm_(h, ub[a:e])
                    return output
            if f.kind == "conv":
                h = F.conv2d(x, d[:, :, None, None]) * sc[:, :, None, None]
                delta = F.conv2d(h, u[:, :, None, None])
            else:
                h = F.linear(x, d)
                h = h * sc.reshape(b, *([1] * (h.ndim - 2)), -1)
                delta = F.linear(h, u)
            return output + delta

        return hook


__all__ = ["MembraneStack", "Transport", "default_context"]
