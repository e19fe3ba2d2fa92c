"""A membrane: a rank-r adapter (rank 1 by default) on every transformer Linear/Conv of a UNet.

Per target module it holds ``lora_down`` (in → r, no bias), ``lora_up`` (r → out, no bias; 1×1 convs for
conv targets) and an ``alpha`` buffer; the update is ``y = W x + m · (alpha / r) · up(down(x))``.
``lora_down`` is kaiming-uniform (a = √5) and ``lora_up`` zero, so a fresh membrane is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .naming import Target, file_key

FORMAT_VERSION = 1


class MembraneLayer(nn.Module):
    """The rank-r update for one target module."""

    def __init__(self, kind: str, in_features: int, out_features: int, rank: int = 1, alpha: float = 1.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.kind = kind
        if kind == "conv":
            self.lora_down = nn.Conv2d(in_features, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        elif kind == "linear":
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        else:
            raise ValueError(f"unknown target kind {kind!r}")
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def down_matrix(self) -> torch.Tensor:
        """``[r, in]`` (conv kernels flattened)."""
        return self.lora_down.weight.reshape(self.rank, -1)

    def up_matrix(self) -> torch.Tensor:
        """``[out, r]``."""
        return self.lora_up.weight.reshape(-1, self.rank)


@dataclass
class MembraneInfo:
    """What a membrane erases and how it was made (the ``spm_*`` metadata)."""

    concepts: list[str] = field(default_factory=list)
    surrogate: str = ""
    architecture: str = "unknown"
    context_dim: int | None = None
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    source: str = "spm"  # "spm" (ours) or "reference" (metadata had only prompts/rank/alpha)
    transport: dict[str, Any] = field(default_factory=dict)  # spm_transport: calibration (spm.transport.calibration_metadata)


class Membrane(nn.Module):
    """A set of :class:`MembraneLayer`, keyed by reference file-key stem (``lora_unet_…``)."""

    def __init__(self, layers: dict[str, MembraneLayer], info: MembraneInfo | None = None, name: str = "membrane"):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.info = info or MembraneInfo()
        self.name = name

    @classmethod
    def for_targets(cls, targets: list[Target], rank: int = 1, alpha: float = 1.0, info: MembraneInfo | None = None,
                    name: str = "membrane") -> "Membrane":
        """A fresh (identity) membrane over ``targets`` — see :func:`spm.naming.find_targets`."""
        layers = {t.file_key: MembraneLayer(t.kind, t.in_features, t.out_features, rank, alpha) for t in targets}
        return cls(layers, info, name)

    @property
    def concepts(self) -> list[str]:
        return self.info.concepts

    @property
    def synonyms(self) -> dict[str, list[str]]:
        """The model synonyms found at training time (``spm_transport["synonyms"]``: concept → words the model
        draws as that concept; :mod:`spm.train.synonyms`), for the concepts this membrane erases."""
        raw = (self.info.transport or {}).get("synonyms") or {}
        if not isinstance(raw, dict):
            return {}
        return {str(c): [str(w) for w in ws if str(w).strip()] for c, ws in raw.items()
                if c in self.info.concepts and isinstance(ws, (list, tuple))}

    @property
    def gate_concepts(self) -> list[str]:
        """What Facilitated Transport opens this membrane for: its concepts, then their model synonyms."""
        return list(dict.fromkeys([*self.info.concepts, *(w for ws in self.synonyms.values() for w in ws)]))

    def synonym_of(self, text: str) -> str | None:
        """The concept ``text`` is a model synonym of (None for the concepts themselves and other text)."""
        if text in self.info.concepts:
            return None
        return next((c for c, ws in self.synonyms.items() if text in ws), None)

    @property
    def rank(self) -> int:
        ranks = {layer.rank for layer in self.layers.values()}
        return max(ranks) if ranks else 0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the reference keys: ``<stem>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
        out: dict[str, torch.Tensor] = {}
        for stem, layer in self.layers.items():
            out[f"{stem}.lora_down.weight"] = layer.lora_down.weight.detach()
            out[f"{stem}.lora_up.weight"] = layer.lora_up.weight.detach()
            out[f"{stem}.alpha"] = layer.alpha.detach()
        return out


def stem_of(key: str) -> tuple[str, str]:
    """``lora_unet_x.lora_down.weight`` → (``lora_unet_x``, ``lora_down.weight``)."""
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return key, ""


__all__ = ["FORMAT_VERSION", "Membrane", "MembraneInfo", "MembraneLayer", "file_key", "stem_of"]
