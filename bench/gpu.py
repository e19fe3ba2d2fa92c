"""Membranes on a GPU: step-time ratios, VRAM and trainer speed on full-size SD1.5 and SDXL UNets.

Run (one prepared run, about 6-8 minutes on one H200)::

    python -m bench.gpu --device cuda --json           # writes bench/results/gpu.json
    python -m bench.gpu --device cpu --smoke --json    # the same code paths at tiny sizes, seconds (tests)

What it measures, all in one process, random weights of the published architectures (diffusers
``UNet2DConditionModel`` with the SD1.5 and SDXL-base configs; SDXL with its pooled text embeds and time ids):

* **Step time** with 0/1/5/10 rank-1 membranes on every target, Facilitated Transport on (every row a
  non-zero strength: the worst case), batch 2+2 and 8+8 (cond + uncond), 512 px (SD1.5) and 1024 px (SDXL),
  fp16.  The timing is :func:`bench.overhead.time_steps`: interleaved rounds with the order rotated, a
  priming call after each switch, ``torch.cuda.synchronize()`` around each timed step after two warm-up
  steps, ratio = median over rounds of (median step with k membranes / median step with 0) in the same
  round.  ``row_scaling`` is the stack's default off the CPU (``lowrank``); with time left the ``cached``
  variant is timed as well (``ratio_cached_*``), so the choice is measured on the device it is made for.
* **Steady state without host sync**: three UNet calls with ``torch.cuda.set_sync_debug_mode("error")``.
* **VRAM**: ``torch.cuda.max_memory_allocated`` of one step without and with 10 membranes, the bytes the
  stack keeps (fused tensors, strength columns; and what the ``cached`` row scaling would keep at 8+8), and
  that as a share of the UNet's weights (goal ≤ 2 %).
* **Trainer**: iterations per second (steady, after the latent pool is filled) and peak VRAM at 512 px
  (SD1.5) and 1024 px (SDXL), fp16 and bf16 weights with autocast, the default schedule (``pool``) against
  ``schedule="reference"`` (``--reference-schedule``).  A few iterations each.

``--max-seconds`` bounds the whole run: parts that no longer fit are skipped and listed under ``skipped``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import overhead  # noqa: E402
from spm.attach import MembraneStack  # noqa: E402
from spm.naming import find_targets  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu.json"
COUNTS = overhead.COUNTS

# small SD1- and SDXL-shaped UNets for --smoke (the full ones are tests.archs.SD15 / SDXL)
SMOKE_UNETS = {
    "sd15": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
    "sdxl": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32),
}
RESOLUTION = {"sd15": 512, "sdxl": 1024}  # px: the models' native sizes


# --- environment ---------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {overhead.machine()['cpu']}" if device.type == "cpu" else str(device)


def machine(device: torch.device) -> dict:
    import diffusers

    out = {"device": device_name(device), "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(cuda=torch.version.cuda, gpu_memory_bytes=p.total_memory, sm=f"{p.major}.{p.minor}")
    else:
        out["torch_threads"] = torch.get_num_threads()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Budget:
    """``--max-seconds``: a part runs only if it is expected to fit; skipped parts are recorded."""

    def __init__(self, seconds: float):
        self.seconds, self.t0, self.skipped = seconds, time.perf_counter(), []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allow(self, name: str, need_s: float = 0.0) -> bool:
        if self.left() > need_s:
            return True
        self.skipped.append(name)
        return False


# --- models ----------------------------------------------------------------------------------------
def unet_config(arch: str, smoke: bool) -> dict:
    from tests.archs import SD15, SDXL

    return dict(SMOKE_UNETS[arch]) if smoke else dict({"sd15": SD15, "sdxl": SDXL}[arch])


def build_unet(arch: str, smoke: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights, initialised directly on ``device`` (seconds for SDXL's 2.6 B parameters on a GPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(arch, smoke))
    return unet.to(dtype).eval().requires_grad_(False)


def added_kwargs(unet: torch.nn.Module, px: int) -> Callable[[int, torch.device, torch.dtype], dict] | None:
    """SDXL's ``added_cond_kwargs`` for ``b`` rows (pooled text embeds and time ids at ``px``), else None."""
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) != "text_time":
        return None
    pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)

    def make(b: int, device: torch.device, dtype: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(3)
        ids = torch.tensor([px, px, 0, 0, px, px], dtype=dtype)[None].expand(b, -1)
        return {"added_cond_kwargs": {"text_embeds": torch.randn(b, pooled, generator=g).to(device, dtype),
                                      "time_ids": ids.to(device)}}

    return make


def clip_config(width: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu" if width == 768 else "gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=projection or width)


def build_pipeline(arch: str, unet: torch.nn.Module, smoke: bool, device: torch.device, dtype: torch.dtype):
    """A diffusers pipeline around ``unet`` for the trainer: random CLIP text encoder(s) of the published
    sizes (CLIP-L; for SDXL also OpenCLIP-bigG with projection), a small VAE with SD's 8× downscale (the
    trainer never decodes), DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlog
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from spm.tokenizer import clip_tokenizer

    torch.manual_seed(1)
    blocks = 2 if smoke else 4
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                            up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * blocks,
                            layers_per_block=1, latent_channels=4, norm_num_groups=8)
        if arch == "sdxl":
            te1 = CLIPTextModel(clip_config(32, 2, 4) if smoke else clip_config(768, 12, 12))
            te2 = CLIPTextModelWithProjection(clip_config(32, 2, 4) if smoke else clip_config(1280, 32, 20, 1280))
        else:
            te1 = CLIPTextModel(clip_config(32, 2, 4) if smoke else clip_config(768, 12, 12))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    verb = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        if arch == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                             tokenizer_2=clip_tokenizer(), unet=unet, scheduler=sched)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te1, tokenizer=clip_tokenizer(), unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    finally:
        dlog.set_verbosity(verb)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return pipe


# --- sections ---------------------------------------------------------------------------------------
def steady_state_sync_free(unet, encode, membranes, latent: int, kwargs) -> dict | None:
    """Whether three UNet calls after the first, with the same conditioning, run with no host sync
    (``torch.cuda.set_sync_debug_mode("error")``), for the bare UNet and with the membranes; None off CUDA."""
    p = next(unet.parameters())
    if p.device.type != "cuda":
        return None
    from spm.attach import Transport

    ctx, toks = encode(overhead.cfg_rows(2))
    b = ctx.shape[0]
    ctx = ctx.to(p.device, p.dtype)
    x = torch.randn(b, unet.config.in_channels, latent, latent).to(p.device, p.dtype)
    t = torch.full((b,), 500, device=p.device)
    extra = kwargs(b, p.device, p.dtype) if kwargs else {}
    tr = Transport(encode, encoder_key="bench", metric=overhead.STEP_METRIC)
    tr.registry.record(ctx, toks)
    stack = MembraneStack(unet)

    def sync_free() -> bool:
        with torch.inference_mode():
            unet(x, t, encoder_hidden_states=ctx, **extra)
            sync(p.device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    unet(x, t, encoder_hidden_states=ctx, **extra)
                return True
            except RuntimeError:
                return False
            finally:
                torch.cuda.set_sync_debug_mode("default")

    out = {"bare_unet": sync_free()}
    try:
        stack.set_membranes([(m, 1.0) for m in membranes])
        stack.set_transport(tr)
        out["with_membranes"] = sync_free()
    finally:
        stack.detach()
    return out


def vram(unet, encode, membranes, latent: int, kwargs, per_branch: int = 2) -> dict:
    """Peak memory of one step without and with the membranes; what the stack keeps, vs the UNet's weights."""
    from spm.attach import Transport

    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    weights = nbytes(list(unet.parameters()) + list(unet.buffers()))
    ctx, toks = encode(overhead.cfg_rows(per_branch))
    b = ctx.shape[0]
    ctx = ctx.to(device, dtype)
    x = torch.randn(b, unet.config.in_channels, latent, latent).to(device, dtype)
    t = torch.full((b,), 500, device=device)
    extra = kwargs(b, device, dtype) if kwargs else {}
    out: dict[str, Any] = {"unet_weights_bytes": weights, "batch": b, "membranes": len(membranes)}
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=ctx, **extra)
        reset_peak(device)
        unet(x, t, encoder_hidden_states=ctx, **extra)
        out["peak_bytes_0"] = peak(device)
        for mode in ("auto", "cached"):
            tr = Transport(encode, encoder_key="bench", metric=overhead.STEP_METRIC)
            tr.registry.record(ctx, toks)
            stack = MembraneStack(unet)
            stack.row_scaling = mode
            stack.set_membranes([(m, 1.0) for m in membranes])
            stack.set_transport(tr)
            unet(x, t, encoder_hidden_states=ctx, **extra)
            reset_peak(device)
            unet(x, t, encoder_hidden_states=ctx, **extra)
            name = stack._scaling_mode(device)
            kept = nbytes(overhead.cached_tensors(stack))
            out[f"peak_bytes_{len(membranes)}_{name}"] = peak(device)
            out[f"stack_bytes_{name}"] = kept
            out[f"stack_share_of_unet_{name}"] = round(kept / weights, 6)
            stack.detach()
            del stack, tr
            gc.collect()
    mode = MembraneStack(unet)._scaling_mode(device)
    out["row_scaling_default"] = mode
    out["membrane_share_of_unet"] = out[f"stack_share_of_unet_{mode}"]
    if out["peak_bytes_0"] is not None:
        out[f"peak_delta_bytes_{len(membranes)}"] = out[f"peak_bytes_{len(membranes)}_{mode}"] - out["peak_bytes_0"]
    out["goal_membrane_share<=0.02"] = out["membrane_share_of_unet"] <= 0.02
    return out


def train_speed(pipe, arch: str, precision: str, schedule: str, iterations: int, smoke: bool, pool_size: int) -> dict:
    """A few trainer iterations: steady iterations per second and peak memory."""
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer

    be = DiffusersBackend(pipe)
    device = torch.device(be.device)
    cfg = TrainConfig(targets=["a red circle"], iterations=iterations, precision=precision, schedule=schedule,
                      resolution=None if smoke else RESOLUTION[arch], pool_size=pool_size,
                      max_denoising_steps=4 if smoke else TrainConfig().max_denoising_steps,
                      anchors=1 if smoke else TrainConfig().anchors)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    resident = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    t0 = time.perf_counter()
    res = Trainer(be, cfg, None, progress_bar=False).train()
    wall = time.perf_counter() - t0
    spi = float(res.cost.get("seconds_per_iteration") or float("nan"))
    out = {"precision": precision, "schedule": schedule, "resolution": cfg.resolution or be.latent.resolution,
           "iterations": res.steps, "pool_size": pool_size if schedule == "pool" else None,
           "seconds_per_iteration": round(spi, 5), "iterations_per_s": round(1.0 / spi, 4) if spi > 0 else None,
           "wall_s": round(wall, 2), "ufe_per_iteration_steady": res.cost.get("ufe_per_iteration_steady"),
           "final_loss": res.history[-1]["loss"] if res.history else None,
           "peak_bytes": peak(device), "resident_before_bytes": resident}
    out["loss_finite"] = out["final_loss"] is not None and math.isfinite(out["final_loss"])
    return out


# --- driver -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace, log: Callable[[str], None], save: Callable[[dict], None]) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: --device cuda but torch sees no CUDA device (use --device cpu --smoke)")
    if device.type == "cpu" and not args.smoke:
        log("bench.gpu: full-size models on the CPU take hours; pass --smoke for the tiny code-path check")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.max_seconds)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    result: dict[str, Any] = {
        "device": device_name(device), "machine": machine(device), "smoke": bool(args.smoke),
        "dtype": str(dtype).replace("torch.", ""), "max_seconds": args.max_seconds,
        "method": "bench.overhead.time_steps on the device: interleaved rounds, order rotated, synchronize around "
                  "each step, ratio = median over rounds of (median step with k / with 0) in the same round; "
                  "transport on (clipcos_tokenuni); random weights of the published architectures",
        "skipped": budget.skipped,
    }
    if device.type == "cpu":
        result["note"] = "CPU: the code paths of the GPU run at tiny sizes (--smoke), fp32; not GPU numbers"
    rounds, steps_per_round = (2, 1) if args.smoke else (args.rounds, args.steps)
    models: dict[str, tuple] = {}
    for arch in ("sd15", "sdxl"):
        if not budget.allow(f"{arch}: build"):
            continue
        t0 = time.perf_counter()
        unet = build_unet(arch, args.smoke, device, dtype)
        width = int(unet.config.cross_attention_dim)
        encode = overhead.make_encoder(overhead.clip_text_encoder(width))
        ms = overhead.make_membranes(unet, max(COUNTS))
        px = RESOLUTION[arch]
        latent = int(unet.config.sample_size) if args.smoke else px // 8
        kwargs = added_kwargs(unet, px)
        models[arch] = (unet, encode, ms, latent, kwargs)
        result[arch] = {"model": f"diffusers UNet2DConditionModel, {'tiny ' + arch + '-shaped' if args.smoke else arch} config, "
                                 f"random weights, {result['dtype']}", "targets": len(find_targets(unet)),
                        "latent": latent, "build_s": round(time.perf_counter() - t0, 1)}
        log(f"{arch}: built in {result[arch]['build_s']}s, {result[arch]['targets']} targets")
        save(result)

    def steps(pb: int, share: float) -> None:
        for arch, (unet, encode, ms, latent, kwargs) in models.items():
            name = f"{arch}: steps {pb}+{pb}"
            if not budget.allow(name, 10):
                continue
            log(f"{name} …")
            r = overhead.time_steps(unet, encode, ms, latent, rounds=rounds, steps=steps_per_round, log=log,
                                    budget_s=None if args.smoke else min(budget.left() - 5, share * args.max_seconds),
                                    per_branch=pb, unet_kwargs=kwargs)
            sec = result[arch]
            if pb == 2:
                sec.update({k: v for k, v in r.items() if k.startswith("ratio_") or k.startswith("overhead_ms_")})
            sec[f"batch_{pb}+{pb}"] = r
            save(result)

    # 1. step-time ratios at batch 2+2 (the headline numbers)
    steps(2, 0.1)
    # 2. no host sync in the steady state; VRAM and the stack's memory
    for arch, (unet, encode, ms, latent, kwargs) in models.items():
        if budget.allow(f"{arch}: sync check"):
            result[arch]["steady_state_sync_free"] = steady_state_sync_free(unet, encode, ms, latent, kwargs)
        if budget.allow(f"{arch}: memory", 5):
            log(f"{arch}: memory …")
            result[arch]["memory"] = vram(unet, encode, ms, latent, kwargs, per_branch=2)
            result[arch]["memory_8+8"] = vram(unet, encode, ms, latent, kwargs, per_branch=8)
            result[arch]["membrane_share_of_unet"] = result[arch]["memory"]["membrane_share_of_unet"]
        save(result)
    # 3. the trainer
    iters = {"pool": 2 if args.smoke else args.train_iterations, "reference": 2 if args.smoke else max(2, args.train_iterations // 2)}
    for arch in list(models):
        unet = models[arch][0]
        rows = []
        for precision in ("fp16", "bf16"):
            wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision] if device.type == "cuda" else torch.float32
            if not budget.allow(f"{arch}: train {precision}", 20):
                continue
            unet.to(wdt)
            pipe = build_pipeline(arch, unet, args.smoke, device, wdt)
            for schedule in ("pool", "reference"):
                name = f"{arch}: train {precision} {schedule}"
                if not budget.allow(name, 15):
                    continue
                log(f"{name} …")
                try:
                    rows.append(train_speed(pipe, arch, precision, schedule, iters[schedule], args.smoke,
                                            2 if args.smoke else args.pool_size))
                except torch.cuda.OutOfMemoryError as e:  # recorded, the run goes on
                    rows.append({"precision": precision, "schedule": schedule, "error": f"out of memory: {e}".split("\n")[0]})
                    torch.cuda.empty_cache()
                result[arch]["train"] = rows
                save(result)
            del pipe
            gc.collect()
        unet.to(dtype)
        peaks = [r["peak_bytes"] for r in rows if r.get("peak_bytes") is not None]
        if peaks:
            limit = {"sd15": 8, "sdxl": 20}[arch] * 10**9
            result[arch][f"goal_train_peak<={limit // 10**9}GB"] = max(peaks) <= limit
    # 4. batch 8+8
    steps(8, 0.08)
    # 5. with time left: the other row scaling on the device, for the choice
    for arch, (unet, encode, ms, latent, kwargs) in models.items():
        other = "cached" if MembraneStack(unet)._scaling_mode(device) == "lowrank" else "lowrank"
        name = f"{arch}: steps 2+2 row_scaling={other}"
        if not budget.allow(name, 30 if not args.smoke else 0):
            continue
        log(f"{name} …")
        r = overhead.time_steps(unet, encode, ms, latent, rounds=rounds, steps=steps_per_round, log=log, counts=(0, 5, 10),
                                budget_s=None if args.smoke else min(budget.left() - 10, 0.08 * args.max_seconds),
                                per_branch=2, unet_kwargs=kwargs, row_scaling=other)
        result[arch][f"ratio_{other}_5"], result[arch][f"ratio_{other}_10"] = r["ratio_5"], r["ratio_10"]
        result[arch][f"batch_2+2_{other}"] = r
        save(result)
    if "sd15" in result and "ratio_5" in result["sd15"]:
        result["goals"] = {"sd15_ratio_5<=1.03": result["sd15"]["ratio_5"] <= 1.03,
                           "sd15_ratio_10<=1.10": result["sd15"]["ratio_10"] <= 1.10}
    result["runtime_s"] = round(time.perf_counter() - budget.t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--smoke", "--tiny", dest="smoke", action="store_true",
                    help="tiny SD1.5/SDXL-shaped models: the same code paths in seconds (does not write the results file)")
    ap.add_argument("--json", action="store_true", help="print only the JSON object on stdout (progress on stderr)")
    ap.add_argument("--max-seconds", type=float, default=450.0,
                    help="budget for the whole run; parts that no longer fit are skipped and listed (default 450)")
    ap.add_argument("--rounds", type=int, default=20, help="at most this many interleaved rounds per step timing")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    ap.add_argument("--train-iterations", type=int, default=8, help="trainer iterations per pool run (reference: half)")
    ap.add_argument("--pool-size", type=int, default=16, help="latent pool of the trainer runs (TrainConfig default 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where to write the JSON (default {RESULTS.relative_to(ROOT)}; --smoke writes nothing unless given)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    out = args.out or (None if args.smoke else RESULTS)

    def save(result: dict) -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")

    result = run(args, log, save)
    save(result)
    if out is not None:
        log(f"wrote {out}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for arch in ("sd15", "sdxl"):
            if arch in result:
                r = result[arch]
                log(f"{arch}: " + ", ".join(f"ratio_{k}={r.get(f'ratio_{k}')}" for k in COUNTS if k)
                    + f", membrane share {r.get('membrane_share_of_unet')}")
        if result["skipped"]:
            log(f"skipped (--max-seconds): {', '.join(result['skipped'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
