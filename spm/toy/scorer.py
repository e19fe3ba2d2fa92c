"""The toy world's scorer: a small CNN that reads toy-world images (objects, colours, background, style).

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

HEADS = {"objects": len(captions.OBJECTS), "colours": len(captions.COLOURS), "background": len(captions.BACKGROUNDS),
         "style": len(captions.STYLES)}


class Scorer(nn.Module):
    """Input: N x 3 x 32 x 32 in [-1, 1]. Output: dict of logits per head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(
            block(3, w), nn.MaxPool2d(2),                      # 16
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
            block(2 * w, 4 * w), nn.MaxPool2d(2),              # 4
            block(4 * w, 4 * w),
        )
        self.head = nn.Linear(8 * w, sum(HEADS.values()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        out = self.head(f)
        res, i = {}, 0
        for k, n in HEADS.items():
            res[k] = out[:, i:i + n]
            i += n
        return res


@torch.no_grad()
def predict(scorer: Scorer, x: torch.Tensor, bs: int = 512) -> dict[str, np.ndarray]:
    """Probabilities (objects, colours: sigmoid; background, style: softmax) for images in [-1, 1]."""
    outs: dict[str, list] = {k: [] for k in HEADS}
    for i in range(0, x.shape[0], bs):
        o = scorer(x[i:i + bs])
        for k in HEADS:
            outs[k].append(torch.sigmoid(o[k]) if k in ("objects", "colours") else torch.softmax(o[k], 1))
    return {k: torch.cat(v).numpy() for k, v in outs.items()}




def accuracy(pred: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, float]:
    """Exact-set accuracy for objects and colours, top-1 for background and style."""
    return {
        "objects": float(((pred["objects"] > 0.5) == (y["objects"] > 0.5)).all(1).mean()),
        "colours": float(((pred["colours"] > 0.5) == (y["colours"] > 0.5)).all(1).mean()),
        "background": float((pred["background"].argmax(1) == y["background"]).mean()),
        "style": float((pred["style"].argmax(1) == y["style"]).mean()),
    }


def load_scorer(path: Path | None = None) -> Scorer:
    d = Path(path) if path else asset_dir("scorer")
    cfgd = json.loads((d / "config.json").read_text())
    s = Scorer(cfgd["width"])
    s.load_state_dict({k: v.float() for k, v in load_file(str(d / "scorer.safetensors")).items()})
    return s.eval().requires_grad_(False)


def pil_to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
