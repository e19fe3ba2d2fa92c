"""Training of the toy world's scorer (the model itself is :mod:`spm.toy.scorer`).

Trained on renders of the base and shifted data, their VAE round-trips, and soft augmentation (blur, noise,
colour jitter), so that it reads *generated* images, which are softer than renders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from spm.toy.scorer import MULTI, Scorer, accuracy, predict, world_heads

from .common import log, lr_lambda, roundtrip, to_tensor


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


_WEIGHT = {"objects": 4.0, "colours": 2.0}  # loss weight per head (1 for the others)


def _loss(out: dict, y: dict) -> torch.Tensor:
    loss = 0.0
    for k in out:
        term = F.binary_cross_entropy_with_logits(out[k], y[k]) if k in MULTI else F.cross_entropy(out[k], y[k])
        loss = loss + (term * _WEIGHT[k] if k in _WEIGHT else term)
    return loss


def _data(cfg):
    from .train import world_data

    return world_data(cfg)


def train_scorer(vae, out_dir: Path, cfg, g: torch.Generator) -> dict:
    data = _data(cfg)
    n = cfg.n_scorer
    w = getattr(cfg, "render_workers", 1)
    # two-object images are the hard case (smaller objects), so the scorer sees more of them than the model did
    pairs = getattr(cfg, "scorer_pair_prob", 0.2)
    a, la = data.dataset_arrays(n * 3 // 4, cfg.seed * 10 + 5, workers=w, two_prob=pairs)
    b, lb = data.dataset_arrays(n // 4, cfg.seed * 10 + 6, shifted=True, workers=w, two_prob=pairs)
    x = torch.cat([to_tensor(a), to_tensor(b)])
    labels = la + lb
    y = {k: torch.from_numpy(v) for k, v in data.label_arrays(labels).items()}
    xr = roundtrip(vae, x, g)
    log(f"scorer data: {x.shape[0]} renders + round-trips")
    dev = torch.device(getattr(cfg, "device", "cpu"))
    heads = world_heads(getattr(cfg, "world", "shapes"))
    scorer = Scorer(getattr(cfg, "scorer_width", 32), heads).to(dev)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.scorer_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, cfg.scorer_steps // 5 + 1), cfg.scorer_steps))
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
            log(f"scorer {step}/{cfg.scorer_steps} loss {loss.item():.4f}")
    scorer.to("cpu").eval().requires_grad_(False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in scorer.state_dict().items()}, str(out_dir / "scorer.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"width": scorer.width, "heads": heads, "world": getattr(cfg, "world", "shapes")}))
    rep = evaluate_scorer(scorer, vae, seed=cfg.seed * 10 + 9, n=min(2000, n // 2), workers=w,
                          world=getattr(cfg, "world", "shapes"))
    log(f"scorer held-out: {rep}")
    return rep


def evaluate_scorer(scorer: Scorer, vae, seed: int = 9, n: int = 2000, workers: int = 1, world: str = "shapes") -> dict:
    """Held-out accuracy on fresh renders (base + shifted) of ``world`` and on their VAE round-trips."""
    from types import SimpleNamespace

    data = _data(SimpleNamespace(world=world))
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


