"""Small builders shared by tests."""

from __future__ import annotations

import torch

from spm.membrane import Membrane, MembraneInfo
from spm.naming import context_dim, describe_architecture, find_targets


def random_membrane(unet, name="m", concepts=("cat",), seed=0, rank=1, std=0.2) -> Membrane:
    """A membrane with non-zero ``lora_up`` so that it visibly changes outputs."""
    torch.manual_seed(seed)
    ctx = context_dim(unet)
    info = MembraneInfo(concepts=list(concepts), architecture=describe_architecture(ctx), context_dim=ctx)
    m = Membrane.for_targets(find_targets(unet), rank=rank, info=info, name=name)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_up.weight.normal_(0, std)
    return m
