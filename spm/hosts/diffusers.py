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
from ..transport import DEFAULT_METRIC, uses_response


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


def pipeline_responder(pipe, bypass=None):
    """The :class:`spm.response.Responder` of ``pipe``'s UNet; ``bypass``: the attached stack's
    :meth:`~spm.attach.MembraneStack.bypassed` (None where no membrane is attached)."""
    from ..response import Responder

    return Responder(DiffusersBackend(pipe), bypass)


def transport_calibration(pipe, concepts: Sequence[str]) -> dict:
    """``spm_transport`` metadata for a membrane erasing ``concepts``, calibrated on ``pipe``'s text encoder."""
    return _calibration(pipeline_transport(pipe), concepts)


def _calibration(tr: Transport, concepts: Sequence[str]) -> dict:
    from ..transport import calibration_metadata

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
        self._responder_for_metric()

    def _responder_for_metric(self) -> None:
        """The response gate (metrics with :func:`~spm.transport.uses_response`) runs this UNet from inside the
        stack's hook, membranes bypassed; set up only for those metrics."""
        if uses_response(self.transport.metric) and self.transport.responder is None:
            self.transport.responder = pipeline_responder(self.pipe, self.stack.bypassed)

    def set_metric(self, metric: str, factor: float | None = None) -> None:
        self.transport.metric = metric
        if factor is not None:
            self.transport.factor = float(factor)
        self._responder_for_metric()
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
        self._training_transport: Transport | None = None  # see _transport

    def _transport(self) -> Transport:
        """One transport for the trainer's calls on this pipeline (as a WebUI's runtime keeps one per model): its
        phrase cache, centring bank and vocabulary similarities serve the calibration and both word scans."""
        if self._training_transport is None:
            self._training_transport = pipeline_transport(self.pipe)
        return self._training_transport

    def transport_calibration(self, concepts: Sequence[str]) -> dict:
        """The ``spm_transport`` metadata the trainer stores (see :func:`transport_calibration`)."""
        return _calibration(self._transport(), concepts)

    def transport_neighbours(self, concepts: Sequence[str]) -> dict[str, list[str]]:
        """The words the trainer erases beside each concept: those the default transport opens each concept's
        membrane for (:func:`spm.explain.neighbour_words`)."""
        from ..explain import neighbour_words

        return neighbour_words(self._transport(), concepts)

    def transport_candidates(self, concepts: Sequence[str], k: int, null: int, seed: int) -> dict:
        """The model-synonym scan's candidate and null words on the pipeline's encoder
        (:func:`spm.explain.synonym_candidates`)."""
        from ..explain import synonym_candidates

        return synonym_candidates(self._transport(), concepts, k, null, seed)

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


class ModelLoadError(ValueError):
    """A model folder whose parts are missing or whose weights do not fit their model class."""


_NO_WEIGHTS_PARTS = ("safety_checker", "feature_extractor", "image_encoder")


def _quiet_loaders():
    """Silence diffusers' and transformers' loading warnings: what they warn about is checked and raised here."""
    import contextlib

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    @contextlib.contextmanager
    def quiet():
        dv, tv = dlog.get_verbosity(), tlog.get_verbosity()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        try:
            yield
        finally:
            dlog.set_verbosity(dv)
            tlog.set_verbosity(tv)

    return quiet()


def _weight_files(folder) -> list:
    from pathlib import Path

    return sorted(Path(folder).glob("*.safetensors"))


def _first(keys) -> str:
    keys = sorted(keys)
    return f"{len(keys)} (first: {keys[0]})" if keys else "0"


def load_model_strict(cls, folder, dtype: torch.dtype = torch.float32, what: str = ""):
    """``cls.from_pretrained(folder)``, but weights that do not fit are an error, never a warning.

    Missing or unexpected keys raise :class:`ModelLoadError` naming them, except one known layout: a
    transformers text encoder saved without its ``text_model.`` prefix (transformers >= 5), whose keys are
    renamed and loaded strictly.
    """
    from pathlib import Path

    folder = Path(folder)
    what = what or folder.name
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json, so the {what} cannot be built")
    if not _weight_files(folder):
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
        why = f" (only pickled {', '.join(others)}: convert them to .safetensors)" if others else ""
        raise ModelLoadError(f"{folder}: no .safetensors weights for the {what}{why}")
    with _quiet_loaders():
        try:
            model, info = cls.from_pretrained(str(folder), torch_dtype=dtype, output_loading_info=True)
        except ValueError as e:
            if "keys are missing" not in str(e):
                raise ModelLoadError(f"{folder}: cannot load the {what}: {str(e).strip().splitlines()[0]}") from None
            missing = [m.strip().rstrip(".") for m in str(e).split("missing:", 1)[1].split("Please")[0].split(",")]
            raise ModelLoadError(f"{folder}: the {what} weights do not fit {cls.__name__}: missing keys "
                                 f"{_first([m for m in missing if m])}") from None
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    if not unexpected and hasattr(model, "_convert_deprecated_attention_blocks"):
        # diffusers' low-memory loader drops unexpected keys without reporting them: compare the files' keys
        from safetensors import safe_open

        stored: dict = {}
        for f in _weight_files(folder):
            with safe_open(str(f), framework="pt") as fh:
                stored.update(dict.fromkeys(fh.keys()))
        model._convert_deprecated_attention_blocks(stored)  # the old VAE attention names it renames itself
        unexpected = sorted(set(stored) - set(model.state_dict()))
    mismatched = list(info.get("mismatched_keys") or [])
    errors = list(info.get("error_msgs") or [])
    if missing and unexpected and not mismatched and not errors:
        prefix = _common_prefix(missing, unexpected)
        if prefix is not None:
            from safetensors.torch import load_file

            sd: dict = {}
            for f in _weight_files(folder):
                sd.update({(prefix + k if k in set(unexpected) else k): v for k, v in load_file(str(f)).items()})
            res = model.load_state_dict(sd, strict=False)
            missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    if missing or unexpected or mismatched or errors:
        detail = [f"{_first(missing)} missing" if missing else "", f"{_first(unexpected)} unexpected" if unexpected else "",
                  f"{len(mismatched)} with other shapes" if mismatched else "", errors[0] if errors else ""]
        raise ModelLoadError(f"{folder}: the {what} weights do not fit {cls.__name__} ("
                             f"{'; '.join(d for d in detail if d)} keys): the model would run with random weights")
    return model.to(dtype).eval()


def _common_prefix(missing: list[str], unexpected: list[str]) -> str | None:
    """``text_model.`` when every unexpected key is a missing key without that one prefix (what is left missing
    after the renaming is then reported by name)."""
    u, miss = set(unexpected), set(missing)
    for m in missing:
        for k in u:
            if m.endswith("." + k):
                prefix = m[: -len(k)]
                return prefix if {prefix + x for x in u} <= miss else None
    return None


def _scheduler(folder):
    import json
    from pathlib import Path

    import diffusers

    cfg = Path(folder) / "scheduler_config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder}: no scheduler_config.json")
    name = json.loads(cfg.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ModelLoadError(f"{cfg}: unknown scheduler class {name!r}")
    return cls.from_pretrained(str(folder))


def _folder_index(p) -> tuple[dict, bool]:
    """(model_index entries, has model_index.json): a diffusers folder, or one of components only (``unet/`` …)."""
    import json

    index = p / "model_index.json"
    if index.exists():
        try:
            return json.loads(index.read_text()), True
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{index} is not valid JSON ({e})") from None
    need = ("unet", "vae", "text_encoder", "scheduler")
    lacking = [n for n in need if not (p / n).is_dir()]
    if lacking:
        raise ModelLoadError(f"{p} is a folder but not a diffusers pipeline (no model_index.json, and no "
                             f"{', '.join(x + '/' for x in lacking)}); give a diffusers folder or a .safetensors checkpoint")
    entries = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "DDIMScheduler"], "_class_name": "StableDiffusionPipeline"}
    if (p / "text_encoder_2").is_dir():
        entries.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"],
                       _class_name="StableDiffusionXLPipeline")
    return entries, False


def load_folder_pipeline(p, dtype: torch.dtype = torch.float32, xl: bool | None = None):
    """A pipeline from a diffusers folder (``model_index.json``) or a folder of its components only (``unet/``,
    ``vae/``, ``text_encoder/``, ``scheduler/``, optional ``tokenizer/``: what ``bench.toyworld build`` writes).

    Every model part loads strictly (:func:`load_model_strict`); a tokenizer folder may hold ``vocab.json`` +
    ``merges.txt`` or only ``tokenizer.json`` (see :func:`spm.tokenizer.load_tokenizer`); without one the
    CLIP tokenizer is built from its vocabulary.
    """
    import importlib
    import inspect as _inspect
    from pathlib import Path

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..tokenizer import TokenizerUnavailable, clip_tokenizer, load_tokenizer

    p = Path(p)
    entries, _ = _folder_index(p)
    is_xl = ("XL" in str(entries.get("_class_name", ""))) if xl is None else xl
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    params = _inspect.signature(cls.__init__).parameters
    comps: dict = {}
    for name, spec in entries.items():
        if name.startswith("_") or name not in params:
            continue
        if not isinstance(spec, (list, tuple)):
            comps[name] = spec  # a config value such as force_zeros_for_empty_prompt
            continue
        lib, cls_name = (list(spec) + [None, None])[:2]
        sub = p / name
        if name in _NO_WEIGHTS_PARTS or lib is None or cls_name is None:
            comps[name] = None
        elif name.startswith("tokenizer"):
            try:
                comps[name] = load_tokenizer(sub) if sub.is_dir() else clip_tokenizer("!" if name == "tokenizer_2" else "<|endoftext|>")
            except TokenizerUnavailable as e:
                raise ModelLoadError(str(e)) from None
        elif name == "scheduler":
            comps[name] = _scheduler(sub)
        else:
            if not sub.is_dir():
                raise ModelLoadError(f"{p}: model_index.json names {name} but there is no {name}/ folder")
            try:
                model_cls = getattr(importlib.import_module(lib), cls_name)
            except (ImportError, AttributeError):
                raise ModelLoadError(f"{p}/model_index.json: unknown {name} class {lib}.{cls_name}") from None
            comps[name] = load_model_strict(model_cls, sub, dtype, name.replace("_", " "))
    for name, par in params.items():
        if name != "self" and name not in comps and par.default is _inspect.Parameter.empty:
            if name in _NO_WEIGHTS_PARTS:
                comps[name] = None
            else:
                raise ModelLoadError(f"{p}: the pipeline needs a {name}/ folder")
    if "requires_safety_checker" in params:
        comps["requires_safety_checker"] = False
    for name in ("text_encoder", "text_encoder_2"):
        te, tok = comps.get(name), comps.get(name.replace("text_encoder", "tokenizer"))
        limit = getattr(getattr(te, "config", None), "max_position_embeddings", None)
        if tok is not None and limit and (tok.model_max_length or 0) > limit:
            tok.model_max_length = int(limit)
    with _quiet_loaders():
        return cls(**comps)


def load_pipeline(model: str, *, config: str | None = None, device: str | None = None,
                  dtype: torch.dtype = torch.float32, xl: bool | None = None):
    """A diffusers pipeline from a diffusers folder, a folder of its components, or a single ``.safetensors``.

    ``config``: for single files, a diffusers folder (or hub id, when online) whose configs describe the
    checkpoint; without it diffusers tries the Hugging Face hub.  Raises ``FileNotFoundError``/``ValueError``
    (:class:`ModelLoadError`) with the fix in the message.
    """
    from pathlib import Path

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlog

    p = Path(model)
    if not p.exists():
        from ..toy import missing_model

        raise FileNotFoundError(missing_model(str(model)))
    if p.is_dir():
        pipe = load_folder_pipeline(p, dtype, xl)
    else:
        if p.suffix.lower() != ".safetensors":
            raise ValueError(f"{p.name}: only .safetensors checkpoints are loaded (pickled .ckpt files can run code)")
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own types for a file that is not one
            raise ValueError(f"{p.name} is not a readable .safetensors checkpoint ({str(e).strip().splitlines()[0]})") from None
        if not any(k.startswith("model.diffusion_model.") for k in keys):
            raise ValueError(f"{p.name} holds no Stable Diffusion UNet (no model.diffusion_model.* keys): "
                             "is it a membrane or a LoRA rather than a checkpoint?")
        if xl is None:
            xl = any(k.startswith("conditioner.") for k in keys)
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        kw: dict = {"config": config} if config else {}
        if config and (Path(config) / "tokenizer").is_dir():  # a tokenizer.json-only folder loads through ours
            from ..tokenizer import TokenizerUnavailable, load_tokenizer

            try:
                kw["tokenizer"] = load_tokenizer(Path(config) / "tokenizer")
                if xl and (Path(config) / "tokenizer_2").is_dir():
                    kw["tokenizer_2"] = load_tokenizer(Path(config) / "tokenizer_2")
            except TokenizerUnavailable as e:
                raise ModelLoadError(str(e)) from None
        verb = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            pipe = cls.from_single_file(str(p), torch_dtype=dtype, **kw)
        except Exception as e:  # diffusers raises several types here (hub errors offline, config mismatches)
            hint = " Pass --config DIR, a diffusers folder of the same architecture, to load it offline." if not config else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"could not load {p.name} as a single-file checkpoint.{hint} ({first})") from None
        finally:
            dlog.set_verbosity(verb)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["DiffusersBackend", "ModelLoadError", "PipelineMembranes", "attach_to_pipeline", "load_folder_pipeline",
           "load_model_strict", "load_pipeline", "phrase_encoder", "pipeline_encoder", "pipeline_transport",
           "transport_calibration"]
