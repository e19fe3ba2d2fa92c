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
    # the unwrapped encoder: concepts and phrase windows are not rows of any batch, so they are not recorded
    encode_prompt = getattr(pipe.encode_prompt, "_spm_original", pipe.encode_prompt)
    out = encode_prompt(texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False, **extra)
    return out[0], (out[2] if len(out) > 2 else None)


def pipeline_encoder(pipe):
    """``encode(texts) -> (conditioning [n, T, d], token ids)`` for :class:`~spm.attach.Transport`."""

    def encode(texts: list[str]):
        with torch.no_grad():
            emb, _ = _encode(pipe, texts)
        return emb, _tokens(pipe, texts)

    return encode


def phrase_runner(pipe):
    """``run(ids [n, L]) -> states [n, L, d]`` as ``encode_prompt`` builds the conditioning (no clip skip):
    SD1/SD2 the last hidden state, SDXL both encoders' penultimate hidden states side by side.
    ``None`` for pipelines without a first text encoder."""
    te1 = getattr(pipe, "text_encoder", None)
    te2 = getattr(pipe, "text_encoder_2", None)
    if te1 is None:
        return None
    xl = te2 is not None

    def run(ids: torch.Tensor) -> torch.Tensor:
        outs = []
        for te in (te1, te2) if xl else (te1,):
            o = te(ids.to(te.device), output_hidden_states=xl)
            outs.append(o.hidden_states[-2] if xl else o[0])
        return torch.cat(outs, -1) if xl else outs[0]

    return run


def phrase_encoder(pipe):
    """The fast phrase-window encoder of ``pipe`` (see :func:`spm.transport.causal_phrase_encoder`), or None."""
    from ..transport import causal_phrase_encoder

    run = phrase_runner(pipe)
    tok = getattr(pipe, "tokenizer", None)
    if run is None or tok is None or tok.bos_token_id is None or tok.eos_token_id is None:
        return None
    return causal_phrase_encoder(run, bos=tok.bos_token_id, eos=tok.eos_token_id,
                                 max_length=int(getattr(tok, "model_max_length", 77) or 77))


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


def pipeline_transport(pipe, metric: str = DEFAULT_METRIC, factor: float = 1.0) -> Transport:
    """The :class:`~spm.attach.Transport` of ``pipe``: concepts through ``encode_prompt``, phrase windows
    through the text encoder unpadded (once checked against the full path)."""
    return Transport(pipeline_encoder(pipe), encoder_key=id(pipe.text_encoder), metric=metric, factor=factor,
                     fast_encode_ids=phrase_encoder(pipe))


def transport_calibration(pipe, concepts: Sequence[str]) -> dict:
    """``spm_transport`` metadata for a membrane erasing ``concepts``, calibrated on ``pipe``'s text encoder."""
    from ..transport import calibration_metadata

    tr = pipeline_transport(pipe)
    return calibration_metadata(tr.concepts.get(list(concepts), tr.encode, tr.encoder_key), tr.phrases, tr.encode_ids)


class PipelineMembranes:
    """Membranes on a diffusers pipeline; :meth:`close` (or ``with``) restores the pipeline exactly."""

    def __init__(self, pipe, membranes: Sequence[tuple[Membrane, float]] = (), metric: str = DEFAULT_METRIC,
                 factor: float = 1.0, transport: bool = True):
        self.pipe = pipe
        self.stack = MembraneStack(pipe.unet)
        self.transport = pipeline_transport(pipe, metric, factor)
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


# --- the trainer backend ----------------------------------------------------------------------------

_PARAM = {"epsilon": "eps", "v_prediction": "v"}


def _is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__


class DiffusersBackend:
    """:class:`spm.backend.Backend` over a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``.

    Reads the parameterization from ``pipe.scheduler.config.prediction_type`` (``epsilon`` / ``v_prediction``)
    and the schedule from ``pipe.scheduler.alphas_cumprod``.  For SDXL it passes the pooled text embedding
    and ``add_time_ids = (H, W, 0, 0, H, W)`` (original size, crop top-left, target size) per row.
    """

    def __init__(self, pipe, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        from ..backend import LatentSpec
        from ..naming import context_dim, describe_architecture, param_device_dtype

        self.pipe = pipe
        self.unet = pipe.unet
        dev, dt = param_device_dtype(pipe.unet)
        self.device = torch.device(device) if device is not None else dev
        self.dtype = dtype or dt
        sched = pipe.scheduler
        pred = getattr(sched.config, "prediction_type", "epsilon")
        if pred not in _PARAM:
            raise ValueError(f"scheduler prediction_type {pred!r} is not supported (epsilon or v_prediction)")
        self.parameterization = _PARAM[pred]
        ac = getattr(sched, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(f"{type(sched).__name__} has no alphas_cumprod; use a DDIM/DDPM/Euler-style scheduler")
        self.alphas_cumprod = torch.as_tensor(ac, dtype=torch.float32).cpu()
        self.is_xl = _is_xl(pipe)
        vae_scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        size = pipe.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        self.latent = LatentSpec(int(pipe.unet.config.in_channels), int(vae_scale), int(size) * int(vae_scale))
        ctx = context_dim(pipe.unet)
        self.architecture = "SDXL" if self.is_xl else describe_architecture(ctx)
        self.time_ids_base: tuple[int, int] | None = None  # (H, W) override for SDXL time ids

    def transport_calibration(self, concepts: Sequence[str]) -> dict:
        """The ``spm_transport`` metadata the trainer stores (see :func:`transport_calibration`)."""
        return transport_calibration(self.pipe, concepts)

    # Backend protocol ------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]):
        from ..backend import Conditioning

        texts = list(texts)
        with torch.no_grad():
            out = self.pipe.encode_prompt(texts, device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        ctx = out[0].to(self.device)
        pooled = out[2].to(self.device) if (self.is_xl and len(out) > 2 and out[2] is not None) else None
        return Conditioning(ctx, pooled, _tokens(self.pipe, texts))

    def _added(self, x: torch.Tensor, cond) -> dict | None:
        if not self.is_xl:
            return None
        if cond.pooled is None:
            raise ValueError("SDXL needs pooled text embeddings in the conditioning")
        h, w = self.time_ids_base or (x.shape[2] * self.latent.downscale, x.shape[3] * self.latent.downscale)
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=self.dtype, device=x.device)[None].expand(x.shape[0], -1)
        return {"text_embeds": cond.pooled.to(device=x.device, dtype=self.dtype), "time_ids": ids}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        x = x_t.to(device=self.device, dtype=self.dtype)
        kw = {}
        added = self._added(x, cond)
        if added is not None:
            kw["added_cond_kwargs"] = added
        return self.unet(x, t.to(self.device), encoder_hidden_states=cond.context.to(self.device, self.dtype),
                         return_dict=False, **kw)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        sf = getattr(vae.config, "scaling_factor", 1.0) or 1.0
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            img = vae.decode((latents / sf + shift).to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1).cpu()


def load_pipeline(model: str, *, config: str | None = None, device: str | None = None,
                  dtype: torch.dtype = torch.float32, xl: bool | None = None):
    """A diffusers pipeline from a diffusers folder or a single ``.safetensors`` checkpoint.

    ``config``: for single files, a diffusers folder (or hub id, when online) whose configs describe the
    checkpoint; without it diffusers tries the Hugging Face hub.  Raises ``FileNotFoundError``/``ValueError``
    with the fix in the message.
    """
    import json
    from pathlib import Path

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlog

    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"--model {model}: no such file or folder (a diffusers folder or a .safetensors checkpoint)")
    verb = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        if p.is_dir():
            index = p / "model_index.json"
            if not index.exists():
                raise ValueError(f"{p} is a folder but not a diffusers pipeline (no model_index.json)")
            cls_name = json.loads(index.read_text()).get("_class_name", "")
            is_xl = "XL" in cls_name if xl is None else xl
            cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
            kw = {"safety_checker": None, "requires_safety_checker": False} if not is_xl else {}
            pipe = cls.from_pretrained(str(p), torch_dtype=dtype, **kw)
        else:
            if p.suffix.lower() != ".safetensors":
                raise ValueError(f"{p.name}: only .safetensors checkpoints are loaded (pickled .ckpt files can run code)")
            if xl is None:
                from safetensors import safe_open

                with safe_open(str(p), framework="pt") as f:
                    xl = any(k.startswith("conditioner.") for k in f.keys())
            cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
            kw = {"config": config} if config else {}
            try:
                pipe = cls.from_single_file(str(p), torch_dtype=dtype, **kw)
            except Exception as e:  # diffusers raises several types here (hub errors offline, config mismatches)
                hint = "" if config else " Pass --config DIR, a diffusers folder of the same architecture, to load it offline."
                raise ValueError(f"could not load {p.name} as a single-file checkpoint: {e}.{hint}") from None
    finally:
        dlog.set_verbosity(verb)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["DiffusersBackend", "PipelineMembranes", "attach_to_pipeline", "load_pipeline", "phrase_encoder", "pipeline_encoder",
           "pipeline_transport", "transport_calibration"]
