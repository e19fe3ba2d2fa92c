"""Fine-tune only a toy VAE's decoder (``python -m bench.toyworld finetune-decoder``).

The encoder (and so the latent space, and every UNet trained on it) stays fixed; the decoder trains on the
world's renders and latents drawn from the frozen encoder's posterior, as in SD's "ft-MSE" VAE decoders.  The
result replaces ``DIR/base/vae``'s weights (same config, same scaling factor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import log, lr_lambda, roundtrip, to_tensor


def finetune_decoder(assets: Path, world: str, steps: int, batch: int = 32, lr: float = 2e-3, n: int = 12000,
                     seed: int = 0, threads: int = 2) -> dict:
    from diffusers import AutoencoderKL

    from .train import BuildConfig, save_fp16, world_data

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(seed + 7)
    cfg = BuildConfig(world=world)
    data = world_data(cfg)
    a, _ = data.dataset_arrays(n * 4 // 5, seed * 10 + 11)
    b, _ = data.dataset_arrays(n // 5, seed * 10 + 12, shifted=True)
    x = torch.cat([to_tensor(a), to_tensor(b)])
    held, _ = data.dataset_arrays(512, seed * 10 + 13)
    xh = to_tensor(held)
    vdir = Path(assets) / "base" / "vae"
    vae = AutoencoderKL.from_pretrained(str(vdir), torch_dtype=torch.float32)
    vae.eval().requires_grad_(False)

    def psnr() -> float:
        return float(10 * torch.log10(4.0 / F.mse_loss(roundtrip(vae, xh), xh)))

    before = psnr()
    log(f"decoder: round-trip PSNR before {before:.2f} dB")
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, steps // 5 + 1), steps))
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = x[idx]
        with torch.no_grad():
            post = vae.encode(xb).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, xb) + 0.5 * F.l1_loss(rec, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder {step}/{steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    after = psnr()
    log(f"decoder: round-trip PSNR after {after:.2f} dB")
    save_fp16(vae, vdir)
    rep = {"decoder_steps": steps, "batch": batch, "lr": lr, "n": n, "seed": seed, "psnr_before_db": before,
           "psnr_after_db": after, "seconds": time.time() - t0}
    (Path(assets) / "decoder_report.json").write_text(json.dumps(rep, indent=1) + "\n")
    return rep
