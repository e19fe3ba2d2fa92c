"""A small CNN that reads toy-world images: objects (multi-label), colours (multi-label), background, style.

Trained on renders of the base and shifted data, their VAE round-trips, and soft augmentation (blur, noise,
colour jitter), so that it reads *generated* images, which are softer than renders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import data

HEADS = {"objects": len(data.OBJECTS), "colours": len(data.COLOURS), "background": len(data.BACKGROUNDS),
         "style": len(data.STYLES)}


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


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    # random blur (3x3 gaussian with random sigma) on half the batch
    sig = torch.rand(n, generator=g) * 1.0 + 0.3
    k1 = torch.exp(-(torch.arange(3).float() - 1).view(1, 3) ** 2 / (2 * sig.view(n, 1) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = k1.view(n, 3, 1) * k1.view(n, 1, 3)
    blurred = F.conv2d(F.pad(x.reshape(1, n * 3, 32, 32), (1, 1, 1, 1), mode="replicate"),
                       k2.repeat_interleave(3, 0).unsqueeze(1), groups=n * 3).view(n, 3, 32, 32)
    use = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    x = use * blurred + (1 - use) * x
    # colour jitter: brightness / contrast / per-channel gain
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5))
    x = x + torch.randn(x.shape, generator=g) * 0.04 * torch.rand(n, 1, 1, 1, generator=g)
    return x.clamp(-1, 1)


def _loss(out: dict, y: dict) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(out["objects"], y["objects"]) * 4
            + F.binary_cross_entropy_with_logits(out["colours"], y["colours"]) * 2
            + F.cross_entropy(out["background"], y["background"]) + F.cross_entropy(out["style"], y["style"]))


def _labels_t(labels: list) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in data.label_arrays(labels).items()}


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


def train_scorer(vae, out_dir: Path, cfg, g: torch.Generator) -> dict:
    from .train import _log, _lr_lambda, roundtrip, to_tensor

    n = cfg.n_scorer
    w = getattr(cfg, "render_workers", 1)
    # two-object images are the hard case (smaller objects), so the scorer sees more of them than the model did
    pairs = getattr(cfg, "scorer_pair_prob", 0.2)
    a, la = data.dataset_arrays(n * 3 // 4, cfg.seed * 10 + 5, workers=w, two_prob=pairs)
    b, lb = data.dataset_arrays(n // 4, cfg.seed * 10 + 6, shifted=True, workers=w, two_prob=pairs)
    x = torch.cat([to_tensor(a), to_tensor(b)])
    labels = la + lb
    y = _labels_t(labels)
    xr = roundtrip(vae, x, g)
    _log(f"scorer data: {x.shape[0]} renders + round-trips")
    dev = torch.device(getattr(cfg, "device", "cpu"))
    scorer = Scorer(getattr(cfg, "scorer_width", 32)).to(dev)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.scorer_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, cfg.scorer_steps // 5 + 1), cfg.scorer_steps))
    scorer.train()
    for step in range(cfg.scorer_steps):
        idx = torch.randint(0, x.shape[0], (cfg.scorer_batch,), generator=g)
        use_rt = (torch.rand(cfg.scorer_batch, 1, 1, 1, generator=g) < 0.5).float()
        xb = use_rt * xr[idx] + (1 - use_rt) * x[idx]
        xb = _augment(xb, g)
        loss = _loss(scorer(xb.to(dev)), {k: v[idx].to(dev) for k, v in y.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.scorer_steps - 1:
            _log(f"scorer {step}/{cfg.scorer_steps} loss {loss.item():.4f}")
    scorer.to("cpu").eval().requires_grad_(False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in scorer.state_dict().items()}, str(out_dir / "scorer.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"width": scorer.width, "heads": HEADS}))
    rep = evaluate_scorer(scorer, vae, seed=cfg.seed * 10 + 9, n=min(2000, n // 2), workers=w)
    _log(f"scorer held-out: {rep}")
    return rep


def evaluate_scorer(scorer: Scorer, vae, seed: int = 9, n: int = 2000, workers: int = 1) -> dict:
    """Held-out accuracy on fresh renders (base + shifted) and on their VAE round-trips."""
    from .train import roundtrip, to_tensor

    t0 = time.time()
    a, la = data.dataset_arrays(n, seed, workers=workers)
    b, lb = data.dataset_arrays(n // 4, seed + 1, shifted=True, workers=workers)
    res = {}
    for name, imgs, labs in (("renders", a, la), ("shifted_renders", b, lb)):
        x = to_tensor(imgs)
        y = data.label_arrays(labs)
        res[name] = accuracy(predict(scorer, x), y)
        res[name + "_vae"] = accuracy(predict(scorer, roundtrip(vae, x)), y)
    res["seconds"] = time.time() - t0
    return res


def load_scorer(path: Path | None = None) -> Scorer:
    from .model import asset_dir

    d = Path(path) if path else asset_dir("scorer")
    cfgd = json.loads((d / "config.json").read_text())
    s = Scorer(cfgd["width"])
    s.load_state_dict({k: v.float() for k, v in load_file(str(d / "scorer.safetensors")).items()})
    return s.eval().requires_grad_(False)


def pil_to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((data.SIZE, data.SIZE))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
