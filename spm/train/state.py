"""Resumable training state beside the membrane: ``<membrane>.safetensors.trainstate``.

Written with every checkpoint (``save_every``) and at the end; the trainer deletes it when the run finished all
its iterations (unless ``keep_state``), so a finished membrane leaves no state behind and an interrupted one
can be resumed.

A safetensors file (no pickles): the optimizer's per-parameter tensors under ``opt.<index>.<name>``, the
generator state under ``rng``, and everything else (step, optimizer hyper-parameters, anchor weight, the
settings) as JSON in the metadata.  Written atomically like the membrane itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import MembraneFileError, atomic_save, read_file
from .config import PREDATING

SUFFIX = ".trainstate"


def state_path(output: str | Path) -> Path:
    p = Path(output)
    return p.with_name(p.name + SUFFIX)


def save_state(path: str | Path, optimizer: torch.optim.Optimizer, generator: torch.Generator, meta: dict[str, Any],
               extra: dict[str, torch.Tensor] | None = None) -> Path:
    """``extra``: more tensors to keep (saved as ``x.<name>``; :func:`load_state` returns them as ``meta["tensors"]``)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng": generator.get_state()}
    tensors.update({f"x.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    metadata = {
        "spm_trainstate": json.dumps({**meta, "param_groups": groups, "scalars": scalars}, default=str),
    }
    return atomic_save(tensors, path, metadata)


def load_state(path: str | Path, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, Any]:
    """Restore optimizer and generator; returns the JSON metadata (``step``, ``anchor_weight``, …)."""
    p = Path(path)
    if not p.exists():
        raise MembraneFileError(f"cannot resume: {p.name} not found beside the membrane (a run that finished deletes "
                                "it unless trained with keep_state / --keep-state; an interrupted run keeps it)")
    # read_file insists on the .safetensors suffix; the state file is safetensors under another name
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get("spm_trainstate")
    except Exception as e:
        raise MembraneFileError(f"cannot resume: {p.name} is unreadable ({e})") from None
    if raw is None:
        raise MembraneFileError(f"cannot resume: {p.name} is not an SPM training state")
    meta = json.loads(raw)
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise MembraneFileError(f"cannot resume from {p.name}: the optimizer state does not fit ({e})") from None
    if "rng" in tensors:
        generator.set_state(tensors["rng"])
    meta["tensors"] = {k[2:]: v for k, v in tensors.items() if k.startswith("x.")}
    return meta


# settings a resumed run keeps from its saved state (the optimiser's groups and the context prompts must be the saved
# run's), with the value a state from before the setting means
RESUMED_SETTINGS = {k: PREDATING[k] for k in ("lr_layers", "context_words")}


def saved_settings(path: str | Path) -> dict[str, str] | None:
    """The :data:`RESUMED_SETTINGS` a saved state's run used (a state written before a setting existed: its value of
    then); None where the state is missing or unreadable (:func:`load_state` then says why).  A value that is not a
    string is left out."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("spm_trainstate", "null"))
    except Exception:
        return None
    if not isinstance(meta, dict):
        return None
    cfg = meta.get("config") or {}
    out = {k: cfg.get(k, before) for k, before in RESUMED_SETTINGS.items()}
    return {k: v for k, v in out.items() if isinstance(v, str)}


__all__ = ["RESUMED_SETTINGS", "SUFFIX", "load_state", "read_file", "save_state", "saved_settings", "state_path"]
