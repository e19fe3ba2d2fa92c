"""Rebuild every toy-world asset from a seed: VAE -> text encoder + UNet -> fine-tune -> scorer.

``python -m bench.toyworld build [--world NAME] [--quick] [--seed N] [--out DIR]``

The world (:mod:`spm.toy.worlds`: ``shapes``, world 1, or ``icons``, world 2) gives the renderer, the captions,
the model configs and the prediction type (epsilon or v-prediction); the procedure is the same for every world.

Determinism: fixed thread count (2), ``torch.use_deterministic_algorithms(True)``, every random draw from a
seeded generator; on the same machine type the same seed gives the same files.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spm.toy import model as M

from .common import log, lr_lambda, roundtrip, to_tensor, to_uint8  # noqa: F401  (to_tensor, to_uint8: used by tests)


def _fresh_dir(path: Path) -> None:
    """An empty folder at ``path`` (an earlier build's files removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


@dataclass
class BuildConfig:
    seed: int = 0
    n_base: int = 30000
    n_shift: int = 8000
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 2e-3
    unet_steps: int = 4000
    unet_batch: int = 128
    unet_lr: float = 5e-4
    warmup: int = 200
    cfg_drop: float = 0.1
    ft_steps: int = 500
    ft_batch: int = 128
    ft_lr: float = 1e-4
    n_scorer: int = 16000
    scorer_steps: int = 3000
    scorer_batch: int = 256
    scorer_lr: float = 3e-3
    scorer_pair_prob: float = 0.5  # share of two-object images in the scorer's training data (the model's: 0.2)
    scorer_width: int = 32
    threads: int = 2
    device: str = "cpu"
    render_workers: int = 1
    ema_decay: float = 0.999     # the saved UNet/text encoder are an exponential moving average of the weights (0: off)
    min_snr_gamma: float = 5.0   # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE
    init_from: str = ""          # an asset folder (with base/) to continue from: its VAE is kept, TE + UNet go on training
    world: str = "shapes"        # the toy world to build (spm.toy.worlds)
    ckpt_every: int = 0          # > 0: write the (averaged) text encoder + UNet to out/base every so many UNet steps
    decoder_steps: int = 0       # > 0: then fine-tune only the VAE decoder this many steps (vae_decoder.py; latents stay)

    @classmethod
    def icons(cls) -> "BuildConfig":
        """World 2's schedule, the one its shipped assets were made with on 2 shared CPU cores (see PROVENANCE.md)."""
        return cls(world="icons", n_base=16000, n_shift=4000, vae_steps=300, vae_batch=32, vae_lr=3e-3, unet_steps=2000,
                   unet_batch=32, unet_lr=1e-3, warmup=100, ft_steps=200, ft_batch=32, ft_lr=1e-4, n_scorer=8000,
                   scorer_steps=1500, scorer_batch=64, ckpt_every=200, decoder_steps=600)

    @classmethod
    def cpu(cls) -> "BuildConfig":
        """A smaller schedule that fits about an hour on 2 CPU cores (not the shipped assets' schedule)."""
        return cls(n_base=16000, n_shift=4000, vae_steps=300, vae_batch=32, unet_steps=1200, unet_batch=64,
                   unet_lr=8e-4, warmup=100, ft_steps=200, ft_batch=64, ft_lr=2e-4, n_scorer=8000, scorer_steps=1200,
                   scorer_batch=128)

    @classmethod
    def quick(cls) -> "BuildConfig":
        return cls(n_base=256, n_shift=128, vae_steps=5, unet_steps=5, ft_steps=3, n_scorer=256, scorer_steps=10, unet_batch=16, ft_batch=16, scorer_batch=32, vae_batch=16,
                   warmup=5)


def world_data(cfg: BuildConfig):
    """The renderer module of ``cfg.world`` (it re-exports the world's captions: ``caption``, ``label_arrays`` ...)."""
    from spm.toy.worlds import get_world

    return importlib.import_module(f"bench.toyworld.{get_world(cfg.world).renderer}")


def save_fp16(module, path: Path) -> None:
    import copy

    m = copy.deepcopy(module).to("cpu").half()
    m.save_pretrained(str(path), safe_serialization=True)
    f = Path(path) / "model.safetensors"
    if f.is_file():  # transformers 5 drops the `text_model.` prefix; SD1 files (and transformers 4) use it
        from safetensors.torch import load_file, save_file

        sd = load_file(str(f))
        if not all(k.startswith("text_model.") for k in sd):
            save_file({("text_model." + k if not k.startswith("text_model.") else k): v.contiguous() for k, v in sd.items()},
                      str(f), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------- VAE
def train_vae(imgs: torch.Tensor, cfg: BuildConfig, g: torch.Generator):
    dev = torch.device(cfg.device)
    vae = M.build_vae(cfg.world).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, cfg.vae_steps // 5 + 1), cfg.vae_steps))
    vae.train()
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, imgs.shape[0], (cfg.vae_batch,), generator=g)
        x = imgs[idx].to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"vae {step}/{cfg.vae_steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_all(vae, imgs: torch.Tensor, bs: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    dev = next(vae.parameters()).device
    for i in range(0, imgs.shape[0], bs):
        post = vae.encode(imgs[i:i + bs].to(dev)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------------------------- UNet + text
def tokenize(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_diffusion(unet, te, mean: torch.Tensor, std: torch.Tensor, labels: list, scale: float, steps: int,
                    lr: float, cfg: BuildConfig, g: torch.Generator, rng: np.random.Generator, train_text: bool,
                    tag: str, batch: int, on_checkpoint=None):
    """Train ``unet`` (and ``te`` when ``train_text``) on ``labels``' latents; the target follows the world's
    prediction type (epsilon or v).  ``on_checkpoint(step)`` is called every ``cfg.ckpt_every`` steps with the
    averaged weights in the modules (they go back to the live weights afterwards)."""
    from spm.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    dev = torch.device(cfg.device)
    noise_sched = M.train_scheduler(cfg.world)
    vpred = noise_sched.config.prediction_type == "v_prediction"
    caption = world_data(cfg).caption
    acp = noise_sched.alphas_cumprod.float()
    params = list(unet.parameters()) + (list(te.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(cfg.warmup, steps // 5 + 1), steps))
    unet.train().requires_grad_(True)
    te.train(train_text)
    te.requires_grad_(train_text)
    ema = None
    decay = float(getattr(cfg, "ema_decay", 0.0))
    avg = [p.detach().clone() for p in params] if decay > 0 else None
    gamma = float(getattr(cfg, "min_snr_gamma", 0.0))
    for step in range(steps):
        idx = torch.randint(0, mean.shape[0], (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        caps = ["" if rng.random() < cfg.cfg_drop else caption(labels[i], rng) for i in idx.tolist()]
        ids = tokenize(tok, caps)
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with torch.set_grad_enabled(train_text):
            h = te(ids.to(dev))[0]
        pred = unet(zt.to(dev), t.to(dev), h).sample
        target = (a.sqrt() * eps - (1 - a).sqrt() * z0) if vpred else eps
        per = (pred - target.to(dev)).pow(2).mean((1, 2, 3))
        if gamma > 0:  # Min-SNR-gamma weights: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v
            snr = (a / (1 - a)).view(-1).to(dev)
            loss = (per * snr.clamp(max=gamma) / (snr + 1 if vpred else snr)).mean()
        else:
            loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if avg is not None:
            d = min(decay, (1 + step) / (10 + step))  # warm-up of the average, as in common EMA implementations
            with torch.no_grad():
                torch._foreach_lerp_(avg, [p.detach() for p in params], 1 - d)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"{tag} {step}/{steps} loss {loss.item():.4f} ema {ema:.4f}")
        every = int(getattr(cfg, "ckpt_every", 0))
        if on_checkpoint is not None and every > 0 and (step + 1) % every == 0 and step + 1 < steps:
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, q in zip(params, avg if avg is not None else live):
                    p.copy_(q)
            on_checkpoint(step + 1)
            with torch.no_grad():
                for p, q in zip(params, live):
                    p.copy_(q)
            log(f"{tag} checkpoint at step {step + 1}")
    if avg is not None:
        with torch.no_grad():
            for p, q in zip(params, avg):
                p.copy_(q)
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    return ema


# ----------------------------------------------------------------------------------------------- build
def _load_init(cfg: BuildConfig) -> dict:
    """fp32 copies of the base model in ``cfg.init_from`` (loaded into memory first: ``out`` may be the same folder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = Path(cfg.init_from) / "base"
    if not (base / "unet").is_dir():
        raise FileNotFoundError(f"--set init_from={cfg.init_from}: no base/unet under it")
    te = CLIPTextModel.from_pretrained(str(base / "text_encoder"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(str(base / "vae"), torch_dtype=torch.float32).to(cfg.device)
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"), torch_dtype=torch.float32)
    vae.eval().requires_grad_(False)
    return {"text_encoder": te, "vae": vae, "unet": unet}


def build(out: Path | None = None, cfg: BuildConfig | None = None) -> dict:
    from .scorer import train_scorer

    cfg = cfg or BuildConfig()
    out = Path(out) if out else M.asset_root(cfg.world)
    wdata = world_data(cfg)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed for deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t_all = time.time()
    report: dict = {"config": asdict(cfg)}

    log("rendering data")
    base_np, base_labels = wdata.dataset_arrays(cfg.n_base, cfg.seed * 10 + 1, workers=cfg.render_workers)
    shift_np, shift_labels = wdata.dataset_arrays(cfg.n_shift, cfg.seed * 10 + 2, shifted=True, workers=cfg.render_workers)
    base_x, shift_x = to_tensor(base_np), to_tensor(shift_np)

    t0 = time.time()
    # stage cache: the VAE is a pure function of (seed, data sizes, VAE settings), so a rerun may reuse it
    key = (("" if cfg.world == "shapes" else f"{cfg.world}_")
           + f"vae_s{cfg.seed}_n{cfg.n_base}_{cfg.n_shift}_k{cfg.vae_steps}_b{cfg.vae_batch}_lr{cfg.vae_lr}")
    cache = out / "_stages" / f"{key}.pt"
    init = _load_init(cfg) if cfg.init_from else None
    if init is not None:
        vae = init["vae"]
        log(f"continuing from {cfg.init_from}: its VAE is kept, text encoder and UNet train on")
    elif cache.is_file():
        vae = M.build_vae(cfg.world).to(cfg.device)
        state = torch.load(cache)
        vae.load_state_dict(state["vae"])
        g.set_state(state["g"])
        vae.eval().requires_grad_(False)
        log(f"reusing cached VAE stage {cache}")
    else:
        vae = train_vae(torch.cat([base_x, shift_x[: len(shift_x) // 2]]), cfg, g)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"vae": {k: v.cpu() for k, v in vae.state_dict().items()}, "g": g.get_state()}, cache)
    report["vae_seconds"] = time.time() - t0
    mean, std = encode_all(vae, base_x)
    scale = float(vae.config.scaling_factor) if init is not None else float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    rec = roundtrip(vae, base_x[:512])
    report["vae_psnr"] = float(10 * torch.log10(4.0 / F.mse_loss(rec, base_x[:512])))
    report["vae_scaling_factor"] = scale
    log(f"vae psnr {report['vae_psnr']:.2f} dB, scaling factor {scale:.4f}")
    # the VAE and the scheduler are final now: written first, so that a scorer can train on them meanwhile
    base_dir = out / "base"
    _fresh_dir(base_dir)
    save_fp16(vae, base_dir / "vae")
    M.build_scheduler(cfg.world).save_pretrained(str(base_dir / "scheduler"))

    t0 = time.time()
    torch.manual_seed(cfg.seed + 1)
    if init is not None:
        te, unet = init["text_encoder"].to(cfg.device), init["unet"].to(cfg.device)
    else:
        te, unet = M.build_text_encoder(cfg.world).to(cfg.device), M.build_unet(cfg.world).to(cfg.device)

    def checkpoint(step: int) -> None:
        save_fp16(te, base_dir / "text_encoder")
        save_fp16(unet, base_dir / "unet")
        (base_dir / "checkpoint.json").write_text(json.dumps({"unet_step": step, "of": cfg.unet_steps}) + "\n")

    report["unet_final_loss"] = train_diffusion(unet, te, mean, std, base_labels, scale, cfg.unet_steps, cfg.unet_lr,
                                                cfg, g, rng, True, "unet", cfg.unet_batch, checkpoint)
    report["unet_seconds"] = time.time() - t0

    save_fp16(te, base_dir / "text_encoder")
    save_fp16(unet, base_dir / "unet")
    (base_dir / "checkpoint.json").unlink(missing_ok=True)
    (out / "build_report.json").write_text(json.dumps(report, indent=1))  # the base's numbers, if a later stage stops
    if cfg.decoder_steps > 0:  # the encoder, so the latents the UNet learnt, stay; the saved decoder improves
        from diffusers import AutoencoderKL

        from .vae_decoder import finetune_decoder

        report["decoder"] = finetune_decoder(out, cfg.world, cfg.decoder_steps, cfg.vae_batch, n=min(12000, cfg.n_base),
                                             seed=cfg.seed, threads=cfg.threads)
        vae = AutoencoderKL.from_pretrained(str(base_dir / "vae"), torch_dtype=torch.float32).to(cfg.device)
        vae.eval().requires_grad_(False)

    # community fine-tune: UNet only, on the shifted data; it shares text encoder and VAE with the base
    t0 = time.time()
    smean, sstd = encode_all(vae, shift_x)
    report["finetune_final_loss"] = train_diffusion(unet, te, smean, sstd, shift_labels, scale, cfg.ft_steps, cfg.ft_lr,
                                                    cfg, g, rng, False, "finetune", cfg.ft_batch)
    report["finetune_seconds"] = time.time() - t0
    ft_dir = out / "finetune"
    _fresh_dir(ft_dir)
    save_fp16(unet, ft_dir / "unet")
    (ft_dir / "README.txt").write_text("Community fine-tune: only the UNet is stored; text_encoder, vae and scheduler "
                                       "are the base's (see spm/toy/model.py load_components).\n")

    if cfg.n_scorer > 0:
        t0 = time.time()
        report["scorer"] = train_scorer(vae, out / "scorer", cfg, g)
        report["scorer_seconds"] = time.time() - t0
    report["total_seconds"] = time.time() - t_all
    (out / "build_report.json").write_text(json.dumps(report, indent=1))
    log(f"build done in {report['total_seconds']:.0f}s")
    return report


def build_scorer_only(out: Path | None = None, cfg: BuildConfig | None = None, scorer_dir: Path | None = None) -> dict:
    """Train only the scorer, on the VAE already in ``out/base`` (same data and procedure as in :func:`build`).

    It is written to ``scorer_dir`` (default ``out/scorer``).
    """
    from .scorer import train_scorer

    cfg = cfg or BuildConfig()
    out = Path(out) if out else M.asset_root(cfg.world)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed + 2)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(out / "base" / "vae"), torch_dtype=torch.float32).to(cfg.device)
    vae.eval().requires_grad_(False)
    t0 = time.time()
    sdir = Path(scorer_dir) if scorer_dir else out / "scorer"
    rep = {"config": asdict(cfg), "scorer": train_scorer(vae, sdir, cfg, g)}
    rep["scorer_seconds"] = time.time() - t0
    (sdir / "train_report.json").write_text(json.dumps(rep, indent=1))
    return rep
