"""The toy worlds' scorer: a small CNN that reads toy-world images (world 1: objects, colours, background, style).

Its heads follow the world's label space (``HEADS`` of the world's captions module, stored in the scorer's
``config.json``); a scorer file without them is world 1's.

It is how the toy world judges erasure and preservation (``spm eval``, the demo, the benchmarks). It is trained
by ``python -m bench.toyworld build-scorer`` (``bench/toyworld/scorer.py``) on renders, their VAE round-trips and
soft augmentation, so that it reads *generated* images, which are softer than renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from . import captions
from .model import IMAGE_SIZE, asset_dir
from .worlds import World, get_world

HEADS = {"objects": len(captions.OBJECTS), "colours": len(captions.COLOURS), "background": len(captions.BACKGROUNDS),
         "style": len(captions.STYLES)}  # world 1's heads
MULTI = ("objects", "colours")  # multi-label heads (a set: sigmoid); the others are one class each (softmax)


def world_heads(world: str | World | None = None) -> dict[str, int]:
    """The scorer heads of a world: name -> number of classes."""
    return {k: n for k, (n, _) in get_world(world).captions_module().HEADS.items()}


class Scorer(nn.Module):
    """Input: N x 3 x 32 x 32 in [-1, 1]. Output: dict of logits per head."""

    def __init__(self, width: int = 32, heads: dict[str, int] | None = None):
        super().__init__()
        self.width = w = width
        self.heads = dict(heads or HEADS)

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(
            block(3, w), nn.MaxPool2d(2),                      # 16
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
            block(2 * w, 4 * w), nn.MaxPool2d(2),              # 4
            block(4 * w, 4 * w),
        )
        self.head = nn.Linear(8 * w, sum(self.heads.values()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        out = self.head(f)
        res, i = {}, 0
        for k, n in self.heads.items():
            res[k] = out[:, i:i + n]
            i += n
        return res


@torch.no_grad()
def predict(scorer: Scorer, x: torch.Tensor, bs: int = 512) -> dict[str, np.ndarray]:
    """Probabilities (objects, colours: sigmoid; background, style ...: softmax) for images in [-1, 1]."""
    heads = getattr(scorer, "heads", HEADS)
    outs: dict[str, list] = {k: [] for k in heads}
    for i in range(0, x.shape[0], bs):
        o = scorer(x[i:i + bs])
        for k in heads:
            outs[k].append(torch.sigmoid(o[k]) if k in MULTI else torch.softmax(o[k], 1))
    return {k: torch.cat(v).numpy() for k, v in outs.items()}




def accuracy(pred: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, float]:
    """Exact-set accuracy for objects and colours, top-1 for the one-class heads (background, style ...)."""
    return {k: float(((pred[k] > 0.5) == (y[k] > 0.5)).all(1).mean()) if k in MULTI
            else float((pred[k].argmax(1) == y[k]).mean()) for k in pred if k in y}


def load_scorer(path: Path | None = None, world: str | World | None = None) -> Scorer:
    """The scorer in ``path`` (default: the world's shipped ``scorer/``)."""
    d = Path(path) if path else asset_dir("scorer", world)
    cfgd = json.loads((d / "config.json").read_text())
    heads = cfgd.get("heads") or (world_heads(world) if world is not None else HEADS)
    s = Scorer(cfgd["width"], {k: int(v) for k, v in heads.items()})
    s.load_state_dict({k: v.float() for k, v in load_file(str(d / "scorer.safetensors")).items()})
    return s.eval().requires_grad_(False)


def pil_to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
