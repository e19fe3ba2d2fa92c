"""Per-layer learning rates from the model in hand (``TrainConfig.lr_layers``).

Adam steps every parameter by about ``lr`` whatever its gradient's scale, so at a fixed rate how fast a membrane
changes a layer's output, relative to that output, depends on how the model's weights happen to be scaled.  Two
models that compute the same function can train at different speeds: on the toy UNet rescaled so that every
attention block computes the same thing bit for bit (``to_q``, ``to_v`` × 4; ``to_k``, ``to_out`` ÷ 4), the erasure
signal after 360 steps was 0.80 against 0.65 on the shipped one (``bench/results/lr_layer_scale.json``).

A rank-1 membrane adds ``up·(down·x)`` to a layer ``W·x``.  ``down·x`` scales with the layer's input as ``W·x``
does, so ``lora_down`` needs no factor.  ``lora_up`` must grow with the layer's *gain*, ``rms(W)·√(in features)``
(how much the layer amplifies a unit input), for the membrane to keep its share of the output.  So with
``lr_layers="gain"`` each layer's ``lora_up`` steps at ``lr × gain / (1/√3)``: ``1/√3`` is the gain of PyTorch's
default Linear/Conv initialisation, so a layer at its initial scale keeps ``lr``.  Measured: the rescaled and the
shipped toy model then give the same signal at every check (0.6535 against 0.6537 after 360 steps), and on the
shipped model the signal stays within 0.012 of the fixed rate (its gains are 0.98–1.41).  Scaling ``lora_down``
too did not (0.84 against 0.66).

Guards, not fitted values: a layer whose weight is zero or not finite (``proj_out`` is zero-initialised in LDM
code, so an untrained checkpoint has it) takes the median gain of the model's layers, and every gain is kept
within ``SPREAD`` of that median, so that one degenerate layer cannot freeze or blow up its ``lora_up``.  Gains are
rounded to ``1/BUCKETS`` of an octave (at most 2.2 % off) and layers with the same rounded gain share one
optimiser group: a few tens of groups instead of one per layer (an SDXL membrane has 722 layers).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import torch
from torch import nn

INIT_GAIN = 1 / math.sqrt(3)  # rms(W)·√in of nn.Linear's / nn.Conv2d's default (kaiming-uniform, a = √5) init
SPREAD = 10.0  # a gain is kept within [median / SPREAD, median × SPREAD]
BUCKETS = 16  # gains are rounded to 1/BUCKETS of an octave


def weight_gain(module: nn.Module) -> float:
    """``rms(W)·√(in features) / INIT_GAIN`` of a Linear or 1×1 Conv module (nan where it has no float weight)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.device.type == "meta" or w.ndim < 2:
        return float("nan")
    with torch.no_grad():
        w2 = w.detach().flatten(1)
        rms = float(w2.float().pow(2).mean().sqrt())
    return rms * math.sqrt(w2.shape[1]) / INIT_GAIN


def layer_gains(unet: nn.Module, names: dict[str, str | None]) -> dict[str, float]:
    """``{membrane key: gain}`` for ``names`` (``{membrane key: module path in unet}``; a path that is None or not
    in ``unet`` counts as degenerate), guarded (module docstring)."""
    mods = dict(unet.named_modules())
    raw = {k: weight_gain(mods[path]) if path and path in mods else float("nan") for k, path in names.items()}
    good = [g for g in raw.values() if math.isfinite(g) and g > 0]
    if not good:
        return dict.fromkeys(raw, 1.0)
    med = statistics.median(good)
    return {k: min(max(g if math.isfinite(g) and g > 0 else med, med / SPREAD), med * SPREAD) for k, g in raw.items()}


def rounded(gain: float) -> float:
    return 2.0 ** (round(math.log2(gain) * BUCKETS) / BUCKETS)


def param_groups(layers: dict[str, nn.Module], gains: dict[str, float] | None) -> list[dict]:
    """Optimiser groups for a membrane's ``layers`` (``{key: layer with lora_down and lora_up}``).

    ``gains`` None: one group (every parameter at ``lr``).  Else the ``lora_down`` weights in one group at ``lr``
    and the ``lora_up`` weights grouped by rounded gain; each group's ``lr_gain`` is the factor the trainer applies
    to the scheduled rate (``lr × lr_factor × lr_gain``)."""
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    if gains is None:
        return [{"params": params, "lr_gain": 1.0}]
    up = {id(layer.lora_up.weight) for layer in layers.values()}
    rest = [p for p in params if id(p) not in up]
    by: dict[float, list] = defaultdict(list)
    for key, layer in layers.items():
        if layer.lora_up.weight.requires_grad:
            by[rounded(gains[key])].append(layer.lora_up.weight)
    groups = [{"params": rest, "lr_gain": 1.0}] if rest else []
    groups += [{"params": ps, "lr_gain": k} for k, ps in sorted(by.items())]
    return groups


def gains_summary(gains: dict[str, float]) -> dict:
    """What the file records: the gains' range and median, rounded."""
    vs = sorted(gains.values())
    return {"min": round(vs[0], 3), "median": round(statistics.median(vs), 3), "max": round(vs[-1], 3),
            "layers": len(vs)}


__all__ = ["BUCKETS", "INIT_GAIN", "SPREAD", "gains_summary", "layer_gains", "param_groups", "rounded", "weight_gain"]
