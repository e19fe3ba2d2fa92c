"""Reading and writing membrane files (safetensors only), with validation that names the cause.

The format is the reference's: keys ``lora_unet_<module path, dots as underscores>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha`` and metadata ``prompts``, ``rank``, ``alpha``.  We add ``spm_*`` metadata
(concepts, surrogate, architecture, context width, training settings as JSON, format version); any
reader of the reference format reads our files.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .membrane import FORMAT_VERSION, Membrane, MembraneInfo, MembraneLayer, stem_of
from .naming import FILE_PREFIX, KeyMap, Target, arch_label, describe_architecture

log = logging.getLogger("spm")

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
MAX_HEADER = 64 * 1024 * 1024
LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MembraneFileError(ValueError):
    """A membrane file that cannot be used; the message names the file and the cause."""


class IncompatibleMembrane(MembraneFileError):
    """A membrane whose modules or shapes do not fit the loaded UNet."""


def _name(path: Path) -> str:
    return path.name


def _sniff(path: Path) -> dict[str, Any]:
    """Check the safetensors header by hand so that bad files get a precise message."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MembraneFileError(f"{_name(path)} is empty or truncated ({size} bytes); it is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > MAX_HEADER or n > size - 8:
            if head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5):
                raise MembraneFileError(
                    f"{_name(path)} is a PyTorch pickle (zip/pickle data), not safetensors, despite its name. "
                    "SPM never unpickles files (they can run code); convert it to .safetensors with a trusted tool."
                )
            raise MembraneFileError(
                f"{_name(path)} is truncated or corrupt: its header claims {n} bytes but the file has {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MembraneFileError(f"{_name(path)} is corrupt: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise MembraneFileError(f"{_name(path)} is corrupt: the safetensors header is not a JSON object")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offs = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not isinstance(offs, list) or len(offs) != 2:
            raise MembraneFileError(f"{_name(path)} is corrupt: tensor {key!r} has no data offsets")
        if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs) or offs[0] > offs[1]:
            raise MembraneFileError(f"{_name(path)} is corrupt: tensor {key!r} has invalid data offsets {offs!r}")
        end = max(end, offs[1])
    if 8 + n + end > size:
        raise MembraneFileError(
            f"{_name(path)} is truncated: its tensors need {8 + n + end} bytes, the file has {size} "
            "(an interrupted download or copy?)"
        )
    return header


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a membrane file, after the safety checks."""
    p = Path(path)
    if not p.exists():
        raise MembraneFileError(f"{p} does not exist (deleted or moved since the list was made? press refresh)")
    if not p.is_file():
        raise MembraneFileError(f"{p} is not a file")
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise MembraneFileError(
            f"{p.name}: {suffix} files are pickles, which can run code when loaded; SPM reads only .safetensors. "
            "Convert it with a tool you trust, or ask its author for a .safetensors file."
        )
    if suffix != ".safetensors":
        raise MembraneFileError(f"{p.name}: not a .safetensors file (membranes are .safetensors)")
    try:
        header = _sniff(p)
    except OSError as e:
        raise MembraneFileError(f"{p.name} cannot be read: {e.strerror or e}") from None
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise MembraneFileError(f"{p.name} is corrupt: {e}") from None
    meta = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _json(meta: dict[str, str], key: str, default: Any) -> Any:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return default


def _format_version(meta: dict[str, str], name: str) -> int:
    raw = meta.get("spm_format_version") or FORMAT_VERSION
    try:
        return int(raw)
    except ValueError:
        raise MembraneFileError(f"{name}: metadata spm_format_version={raw!r} is not a number") from None


def membrane_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], name: str = "membrane") -> Membrane:
    """Build a :class:`Membrane` from reference-format tensors; raises :class:`MembraneFileError`."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        stem, part = stem_of(key)
        if not part or not stem.startswith(FILE_PREFIX):
            unknown.append(key)
            continue
        groups.setdefault(stem, {})[part] = t
    if unknown:
        hint = " (text-encoder LoRA keys: SPM membranes adapt only the UNet)" if any(k.startswith("lora_te") for k in unknown) else ""
        shown = ", ".join(sorted(unknown)[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise MembraneFileError(f"{name}: keys SPM does not understand: {shown}{hint}")
    if not groups:
        raise MembraneFileError(f"{name}: no membrane tensors (lora_unet_….lora_down.weight) in the file")
    layers: dict[str, MembraneLayer] = {}
    missing_alpha = 0
    for stem, parts in sorted(groups.items()):
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise MembraneFileError(f"{name}: {stem} lacks its {'lora_down' if down is None else 'lora_up'} weight")
        for label, t in (("lora_down", down), ("lora_up", up)):
            if t.dtype not in LOADABLE_DTYPES:
                raise MembraneFileError(
                    f"{name}: {stem}.{label} has dtype {t.dtype}; membranes are float16, bfloat16, float32 or float64"
                )
            # checked after the cast to float32, which is what is used: float64 beyond ±3.4e38 becomes Inf
            if not torch.isfinite(t.float()).all():
                raise MembraneFileError(f"{name}: {stem}.{label} contains NaN or Inf values; the file is damaged")
            if 0 in t.shape:
                raise MembraneFileError(f"{name}: {stem}.{label} is empty (shape {tuple(t.shape)})")
        if down.ndim == 4 and up.ndim == 4 and down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
            kind = "conv"
        elif down.ndim == 2 and up.ndim == 2:
            kind = "linear"
        else:
            raise MembraneFileError(f"{name}: {stem} has shapes {tuple(down.shape)} / {tuple(up.shape)}, not a low-rank pair")
        rank, inf, outf = down.shape[0], down.shape[1], up.shape[0]
        if up.shape[1] != rank:
            raise MembraneFileError(f"{name}: {stem} rank mismatch: lora_down has rank {rank}, lora_up {up.shape[1]}")
        alpha_t = parts.get("alpha")
        if alpha_t is None:
            alpha = float(rank)
            missing_alpha += 1
        else:
            if alpha_t.numel() != 1 or alpha_t.dtype in (torch.bool, torch.complex64, torch.complex128) \
                    or not torch.isfinite(alpha_t.float()).all():
                raise MembraneFileError(f"{name}: {stem}.alpha must be one finite number")
            alpha = float(alpha_t.float().item())
        layer = MembraneLayer(kind, inf, outf, rank, alpha)
        with torch.no_grad():
            layer.lora_down.weight.copy_(down.float())
            layer.lora_up.weight.copy_(up.float())
        layers[stem] = layer
    if missing_alpha:
        log.info("%s: %d modules have no alpha; using alpha = rank (scale 1), as kohya-style loaders do", name, missing_alpha)
    ctx = None
    for stem, layer in layers.items():
        if stem.endswith("attn2_to_k"):
            ctx = layer.lora_down.weight.shape[1]
            break
    concepts = _json(meta, "spm_concepts", None)
    source = "spm"
    if not isinstance(concepts, list):
        source = "reference"
        concepts = [c.strip() for c in meta.get("prompts", "").split(",") if c.strip()]
    training = _json(meta, "spm_training", {}) or {}
    transport = _json(meta, "spm_transport", {}) or {}
    info = MembraneInfo(
        concepts=[str(c) for c in concepts],
        surrogate=meta.get("spm_surrogate", ""),
        architecture=meta.get("spm_architecture") or describe_architecture(ctx, len(layers)),
        context_dim=ctx,
        training=training if isinstance(training, dict) else {},
        format_version=_format_version(meta, name),
        source=source,
        transport=transport if isinstance(transport, dict) else {},
    )
    return Membrane(layers, info, name=name)


def load_membrane(path: str | os.PathLike, name: str | None = None) -> Membrane:
    """Load and validate one membrane file."""
    p = Path(path)
    tensors, meta = read_file(p)
    return membrane_from_tensors(tensors, meta, name=name or p.stem)


def metadata_for(membrane: Membrane) -> dict[str, str]:
    info = membrane.info
    alphas = {float(layer.alpha) for layer in membrane.layers.values()}
    meta = {
        "prompts": ",".join(info.concepts),
        "rank": str(membrane.rank),
        "alpha": str(alphas.pop() if len(alphas) == 1 else max(alphas)),
        "spm_concepts": json.dumps(info.concepts, ensure_ascii=False),
        "spm_surrogate": info.surrogate,
        "spm_architecture": info.architecture,
        "spm_context_dim": str(info.context_dim or ""),
        "spm_training": json.dumps(info.training, ensure_ascii=False, default=str),
        "spm_format_version": str(FORMAT_VERSION),
        # Facilitated Transport calibration on the training encoder (written only when there is one)
        **({"spm_transport": json.dumps(info.transport, ensure_ascii=False)} if info.transport else {}),
    }
    erasure = (info.training or {}).get("erasure")
    if isinstance(erasure, dict):  # the trainer's erasure signal at the end (spm/train/signal.py)
        meta["spm_erasure"] = json.dumps(erasure, ensure_ascii=False, default=str)
    return meta


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: ``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def file_mode_for(path: str | os.PathLike) -> int:
    """The permissions a file written at ``path`` should get: those of the file it replaces, else what a user's
    new files get (``0666 & ~umask``), as ``open()`` would give them — not ``mkstemp``'s 0600."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o666 & ~current_umask()


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    A failure (disk full, interrupt) removes the temp file and leaves any previous file untouched.  The file
    gets the permissions of :func:`file_mode_for` (the temp file's 0600 is not kept).
    """
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, file_mode_for(p))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def save_membrane(membrane: Membrane, path: str | os.PathLike) -> Path:
    """Write the reference keys plus ``spm_*`` metadata, atomically."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise MembraneFileError(f"{p.name}: membranes are saved as .safetensors")
    return atomic_save(membrane.reference_state_dict(), p, metadata_for(membrane))


def resolve_targets(membrane: Membrane, keymap: KeyMap, model_arch: str, model_ctx: int | None) -> dict[str, Target]:
    """Map each layer of ``membrane`` to a module of the model, or raise one :class:`IncompatibleMembrane`.

    Nothing is attached when this raises.
    """
    file_arch = arch_label(membrane.info.architecture, membrane.info.context_dim)
    here = arch_label(model_arch, model_ctx)
    mapping: dict[str, Target] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for stem, layer in membrane.layers.items():
        t = keymap.resolve(stem)
        if t is None:
            missing.append(stem)
            continue
        d, u = layer.down_matrix(), layer.up_matrix()
        if d.shape[1] != t.in_features or u.shape[0] != t.out_features:
            wrong.append(f"{stem}: file {d.shape[1]}→{u.shape[0]}, model {t.in_features}→{t.out_features}")
            continue
        mapping[stem] = t
    if missing or wrong:
        mismatch = membrane.info.context_dim != model_ctx or membrane.info.architecture != model_arch
        if mismatch:
            raise IncompatibleMembrane(f"{membrane.name}.safetensors is for {file_arch}; the loaded model is {here}")
        detail = (wrong or missing)[0]
        raise IncompatibleMembrane(
            f"{membrane.name}.safetensors does not fit the loaded model ({here}): "
            f"{len(missing)} modules not found, {len(wrong)} with other shapes (first: {detail})"
        )
    return mapping


def info_dict(path: str | os.PathLike) -> dict[str, Any]:
    """What ``python -m spm info FILE`` prints."""
    p = Path(path)
    m = load_membrane(p)
    return {
        "file": str(p),
        "name": m.name,
        "concepts": m.info.concepts,
        "surrogate": m.info.surrogate,
        "architecture": m.info.architecture,
        "context_dim": m.info.context_dim,
        "rank": m.rank,
        "alpha": float(next(iter(m.layers.values())).alpha),
        "modules": len(m.layers),
        "parameters": m.num_parameters(),
        "bytes": p.stat().st_size,
        "format": m.info.source,
        "format_version": m.info.format_version,
        "training": m.info.training,
        "erasure": (m.info.training or {}).get("erasure"),
    }


def info_as_json(path: str | os.PathLike) -> str:
    return json.dumps(info_dict(path), indent=2, ensure_ascii=False)


__all__ = [
    "IncompatibleMembrane", "MembraneFileError", "atomic_save", "current_umask", "file_mode_for", "info_dict", "load_membrane",
    "membrane_from_tensors", "metadata_for", "read_file", "resolve_targets", "save_membrane", "asdict",
]
