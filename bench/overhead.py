"""What membranes cost at generation time: UNet step time with 0/1/5/10 membranes, transport, memory.

Run::

    python -m bench.overhead --json            # full run (SD1.5 architecture + toy model), writes bench/results/overhead.json
    python -m bench.overhead --json --quick    # smoke run: toy model, SD1.5 skipped

Method
------
* **Step time.** One UNet call = one sampling step with classifier-free guidance: batch 2 cond + 2 uncond
  rows, timestep 500, conditioning from a real text encoder (CLIP tokenizer; random weights of the right
  width) so that the :class:`~spm.attach.Transport` pre-hook computes per-row strengths that differ between
  rows (all non-zero, so every hook really computes).  The membrane set is switched between 0, 1, 5 and 10
  membranes *within one run*, in interleaved rounds (order rotated every round: ABCD, BCDA, …), and each
  switch is followed by a cheap priming call on an 8×8 latent (fills the transport and fused-tensor caches,
  as the first step of a real generation does) before the timed steps.  Ratios are medians of the per-round
  ratios to the round's 0-membrane time, so slow drifts of a shared machine cancel.  Wall time and process
  CPU time are both recorded; on an oversubscribed machine CPU time is the less noisy of the two.
* **Transport.** Time to score freshly encoded rows against the membranes' concepts (the text encoder's
  output given; concept embeddings cached as in a real session), per prompt, plus the per-call cost of the
  pre-hook when the conditioning is unchanged (every step after the first).
* **Memory.** Bytes per membrane, bytes of the fused tensors the stack caches, and a check that no base
  weight is copied: every parameter/buffer keeps its storage, no cached tensor shares or is as large as a
  base weight, and the process RSS grows by about the membranes' size only.

Nothing here assumes a GPU; everything is fp32 on CPU with ``torch.set_num_threads(threads)``.
* **Metric.** Step times use the reference's ``clipcos_tokenuni`` (``STEP_METRIC``): it gives every row a
  non-zero strength, the worst case (the default ``ngram_tokenuni`` gives unrelated rows strength 0, and a
  module whose rows are all 0 is skipped).  The transport cost is measured for the default metric.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spm.attach import MembraneStack, Transport  # noqa: E402
from spm.membrane import Membrane, MembraneInfo  # noqa: E402
from spm.naming import context_dim, describe_architecture, find_targets  # noqa: E402
from spm.transport import DEFAULT_METRIC, causal_phrase_encoder, needs_phrases  # noqa: E402

STEP_METRIC = "clipcos_tokenuni"  # every row non-zero: the worst case for the hooks (see the docstring)

RESULTS = ROOT / "bench" / "results" / "overhead.json"
COUNTS = (0, 1, 5, 10)
CONCEPTS = [
    ["nudity", "naked person"], ["van gogh", "starry night", "impressionist painting"], ["snoopy", "cartoon beagle"],
    ["mickey mouse"], ["spiderman", "superhero in red suit"], ["cat", "kitten", "feline"], ["car", "automobile"],
    ["church", "cathedral"], ["parachute"], ["golf ball", "golf course"],
]
PROMPTS = ["a photo of a cat sitting on a red car", "an oil painting of a church by van gogh"]
NEGATIVES = ["", "blurry, low quality"]


# --- environment -----------------------------------------------------------------------------
# glibc tunables for a caching allocator (the WebUI preloads TCMalloc on Linux for the same reason): freed
# tensors stay in the heap instead of being unmapped, so each step does not page-fault gigabytes of fresh
# memory (1.6 M minor faults and 6-7 s of system time per 35 s SD1.5 step with the defaults here), which was
# the largest source of step-to-step noise.  The benchmark re-executes itself with them (--system-malloc: not).
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _caching_malloc_active() -> bool:
    return all(os.environ.get(k) == v for k, v in CACHING_MALLOC.items())


def _reexec_with_caching_malloc(argv: list[str]) -> None:
    if sys.platform != "linux" or "--system-malloc" in argv or _caching_malloc_active() or not sys.executable:
        return
    env = dict(os.environ, **CACHING_MALLOC)
    # as a module, not as the script: run as bench/overhead.py, bench/ would come first on sys.path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "bench.overhead", *argv], env)
    except OSError as e:  # measure with the system allocator rather than not at all (machine() records which)
        print(f"bench.overhead: could not re-run with a caching malloc ({e}); using the system allocator",
              file=sys.stderr)


def machine() -> dict:
    """CPU model (from lscpu), cores, threads used, load, versions."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    import diffusers

    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "allocator": ("glibc malloc, caching: " + " ".join(f"{k}={os.environ[k]}" for k in CACHING_MALLOC)
                      if _caching_malloc_active() else "system default"),
    }


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# --- models and encoders ---------------------------------------------------------------------
def sd15_unet() -> torch.nn.Module:
    """Full-size SD1.5 ``UNet2DConditionModel`` (published config, random weights), fp32 CPU, ~3.4 GB."""
    from diffusers import UNet2DConditionModel

    from tests.archs import SD15

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15).eval().requires_grad_(False)


def toy_unet() -> tuple[torch.nn.Module, torch.nn.Module | None, str]:
    """The toy world's model (trained assets if built, else its architecture with random weights), or the
    tiny test UNet when the toy world is not available.  Returns (unet, text encoder or None, description)."""
    try:
        from spm.toy import model as toy

        try:
            c = toy.load_components("base")
            return c["unet"], c["text_encoder"], "bench.toyworld base (trained assets)"
        except (FileNotFoundError, OSError):
            torch.manual_seed(0)
            return (toy.build_unet().eval().requires_grad_(False), toy.build_text_encoder().eval(),
                    "bench.toyworld architecture, random weights (assets not built)")
    except ImportError:
        from tests.archs import tiny_diffusers_unet

        return tiny_diffusers_unet().requires_grad_(False), None, "tests.archs.tiny_diffusers_unet (toy world unavailable)"


def clip_text_encoder(width: int) -> torch.nn.Module:
    """A CLIP text encoder of the given width with random weights (for 768: the CLIP ViT-L/14 text tower)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if width == 768:
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    else:
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                             pad_token_id=49407)
    torch.manual_seed(1)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def make_encoder(text_encoder: torch.nn.Module) -> Callable:
    """``encode(texts) -> (hidden [n, 77, d], token ids)``, the way a host feeds :class:`Transport`."""
    from spm.tokenizer import clip_tokenizer

    tok = clip_tokenizer()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return text_encoder(ids).last_hidden_state.clone()

    def encode(texts: list[str]):
        ids = tok(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return run(ids), [tok(t).input_ids for t in texts]

    # phrase windows unpadded, as the diffusers host does (spm.hosts.diffusers.phrase_encoder)
    encode.fast_ids = causal_phrase_encoder(run)  # type: ignore[attr-defined]
    return encode


def make_membranes(unet: torch.nn.Module, n: int, rank: int = 1) -> list[Membrane]:
    """``n`` random rank-``rank`` membranes on every target of ``unet`` (non-zero ups, as after training)."""
    ctx = context_dim(unet)
    targets = find_targets(unet)
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        info = MembraneInfo(concepts=CONCEPTS[i % len(CONCEPTS)], architecture=describe_architecture(ctx), context_dim=ctx)
        m = Membrane.for_targets(targets, rank=rank, info=info, name=f"m{i}")
        with torch.no_grad():
            for layer in m.layers.values():
                layer.lora_up.weight.normal_(0, 0.01)
        out.append(m)
    return out


# --- step timing -----------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cfg_rows(per_branch: int = 2) -> list[str]:
    """``per_branch`` distinct prompts then as many negatives: one CFG batch of ``2 × per_branch`` rows."""
    pos = [PROMPTS[i % len(PROMPTS)] + (f", variant {i // len(PROMPTS)}" if i >= len(PROMPTS) else "")
           for i in range(per_branch)]
    neg = [NEGATIVES[i % len(NEGATIVES)] + (f" {i // len(NEGATIVES)}" if i >= len(NEGATIVES) else "")
           for i in range(per_branch)]
    return pos + neg


def time_steps(unet: torch.nn.Module, encode: Callable, membranes: list[Membrane], latent: int, rounds: int,
               steps: int, counts: tuple[int, ...] = COUNTS, log: Callable[[str], None] = print,
               budget_s: float | None = None, per_branch: int = 2,
               unet_kwargs: Callable[[int, torch.device, torch.dtype], dict] | None = None,
               row_scaling: str = "auto") -> dict:
    """Interleaved step timing (see module docstring). Returns per-count medians and per-round ratios.

    With ``budget_s``, the number of rounds is chosen from the warm-up step's time so that the timed
    part takes about that long (at least 2 rounds, at most ``rounds``).  Runs on the UNet's device/dtype.
    ``per_branch``: cond rows (and as many uncond rows) per step; ``unet_kwargs(batch, device, dtype)``: extra
    UNet arguments (SDXL's ``added_cond_kwargs``); ``row_scaling``: :attr:`MembraneStack.row_scaling`.
    """
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    ctx, toks = encode(cfg_rows(per_branch))  # rows: cond, then uncond
    b = ctx.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, unet.config.in_channels, latent, latent, generator=g).to(device, dtype)
    x_prime = torch.randn(b, unet.config.in_channels, 8, 8, generator=g).to(device, dtype)
    t = torch.full((b,), 500, device=device)
    ctx = ctx.to(device, dtype)
    extra = unet_kwargs(b, device, dtype) if unet_kwargs is not None else {}
    transport = Transport(encode, encoder_key="bench", metric=STEP_METRIC)
    transport.registry.record(ctx, toks)
    stack = MembraneStack(unet)
    stack.row_scaling = row_scaling
    stack.set_transport(transport)
    wall: dict[int, list[float]] = {k: [] for k in counts}
    cpu: dict[int, list[float]] = {k: [] for k in counts}
    strengths: dict[int, list[list[float]]] = {}
    with torch.inference_mode():
        for _ in range(2 if device.type == "cuda" else 1):  # warm-up: allocator, kernels
            _sync(device)
            w0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx, **extra)
            _sync(device)
            warm = time.perf_counter() - w0
        if budget_s is not None:
            rounds = max(2, min(rounds, int(budget_s / (1.1 * warm * steps * len(counts)))))
        log(f"  warm-up step {warm:.3f}s; {rounds} rounds × {len(counts)} configurations × {steps} steps")
        for r in range(rounds):
            order = counts[r % len(counts):] + counts[: r % len(counts)]
            for k in order:
                stack.set_membranes([(m, 1.0) for m in membranes[:k]])
                unet(x_prime, t, encoder_hidden_states=ctx, **extra)  # priming call: transport + fused caches
                for _ in range(steps):
                    _sync(device)
                    c0, w0 = time.process_time(), time.perf_counter()
                    unet(x, t, encoder_hidden_states=ctx, **extra)
                    _sync(device)
                    w1, c1 = time.perf_counter(), time.process_time()
                    wall[k].append(w1 - w0)
                    cpu[k].append(c1 - c0)
                if k and k not in strengths:
                    strengths[k] = stack.current_strengths.tolist()
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k}:{_median(wall[k][-steps:]):.4f}s" for k in counts))
    mode = stack._scaling_mode(device)
    stack.detach()

    def per_round(series: dict[int, list[float]], k: int) -> list[float]:
        # median within a round (steps per config), then ratio to the same round's baseline
        ks = [_median(series[k][i * steps:(i + 1) * steps]) for i in range(rounds)]
        bs = [_median(series[0][i * steps:(i + 1) * steps]) for i in range(rounds)]
        return [a / b for a, b in zip(ks, bs)]

    out: dict = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "latent": [b, unet.config.in_channels, latent, latent],
        "context": list(ctx.shape),
        "rounds": rounds,
        "steps_per_round": steps,
        "row_scaling": mode,
        "step_s_median": {str(k): round(_median(wall[k]), 6) for k in counts},
        "step_cpu_s_median": {str(k): round(_median(cpu[k]), 6) for k in counts},
        "strengths": {str(k): [[round(v, 4) for v in row] for row in s] for k, s in strengths.items()},
        "min_strength": min(min(row) for s in strengths.values() for row in s) if strengths else None,
    }
    for k in counts:
        if k == 0:
            continue
        rw, rc = per_round(wall, k), per_round(cpu, k)
        out[f"ratio_{k}"] = round(_median(rw), 4)
        out[f"ratio_cpu_{k}"] = round(_median(rc), 4)
        out[f"ratio_{k}_rounds"] = [round(v, 4) for v in rw]
        out[f"overhead_ms_{k}"] = round(1000 * (_median(wall[k]) - _median(wall[0])), 3)
    return out


def hook_share(unet: torch.nn.Module, encode: Callable, membranes: list[Membrane], latent: int,
               counts: tuple[int, ...] = (1, 5, 10), steps: int = 1, log: Callable[[str], None] = print) -> dict:
    """Time spent inside the membrane hooks during real steps, as a share of the same steps.

    Each hook (and the transport pre-hook) is wrapped with a wall-clock timer; the estimated ratio is
    ``step / (step - time in hooks)``.  Both terms come from the same step, so the machine's load, which
    swamps a 1–3 % difference between separate steps on a shared machine, largely cancels.
    """
    ctx, toks = encode(PROMPTS + NEGATIVES)
    b = ctx.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, unet.config.in_channels, latent, latent, generator=g)
    x_prime = torch.randn(b, unet.config.in_channels, 8, 8, generator=g)
    t = torch.full((b,), 500)
    out: dict = {"method": hook_share.__doc__.split("\n\n")[1].split("\n")[0].strip() + " …"}
    for k in counts:
        acc = [0.0]
        stack = MembraneStack(unet)
        make, pre = stack._make_hook, stack._unet_pre_hook

        def timed_make(name, make=make, acc=acc):
            hook = make(name)

            def timed(module, args, output):
                t0 = time.perf_counter()
                r = hook(module, args, output)
                acc[0] += time.perf_counter() - t0
                return r

            return timed

        def timed_pre(module, args, kwargs, pre=pre, acc=acc):
            t0 = time.perf_counter()
            r = pre(module, args, kwargs)
            acc[0] += time.perf_counter() - t0
            return r

        stack._make_hook, stack._unet_pre_hook = timed_make, timed_pre
        tr = Transport(encode, encoder_key="bench", metric=STEP_METRIC)
        tr.registry.record(ctx, toks)
        stack.set_transport(tr)
        stack.set_membranes([(m, 1.0) for m in membranes[:k]])
        shares, ratios, hook_s, step_s = [], [], [], []
        with torch.inference_mode():
            unet(x_prime, t, encoder_hidden_states=ctx)  # caches, as the first step of a generation
            for _ in range(steps):
                acc[0] = 0.0
                w0 = time.perf_counter()
                unet(x, t, encoder_hidden_states=ctx)
                w = time.perf_counter() - w0
                step_s.append(w)
                hook_s.append(acc[0])
                shares.append(acc[0] / w)
                ratios.append(w / (w - acc[0]))
        stack.detach()
        out[f"hook_s_{k}"] = [round(v, 4) for v in hook_s]
        out[f"step_s_{k}"] = [round(v, 3) for v in step_s]
        out[f"share_{k}"] = round(_median(shares), 5)
        out[f"ratio_est_{k}"] = round(_median(ratios), 4)
        log(f"  {k} membranes: {_median(hook_s):.3f}s in hooks of a {_median(step_s):.2f}s step → ratio ≈ {out[f'ratio_est_{k}']}")
    return out


# --- transport -------------------------------------------------------------------------------
def time_transport(encode: Callable, membranes: list[Membrane], repeats: int = 20, metric: str = DEFAULT_METRIC) -> dict:
    """Per-prompt scoring cost, given the text encoder's output, for 1, 5 and 10 membranes.

    ``ms_per_prompt_k`` is the steady cost (every UNet call); ``first_call_ms_per_prompt_k`` the first call for new
    prompts, which for the ``ngram`` metrics includes encoding the prompts' phrase windows once;
    ``calibration_ms_per_concept_k`` the calibrated metric's once-per-session cost per concept (the null).
    """
    prompts = [f"{p} number {i}" for i, p in enumerate(PROMPTS * 4)]  # 8 distinct prompts
    ctx, toks = encode(prompts)
    out: dict = {"prompts": len(prompts), "context": list(ctx.shape), "metric": metric}
    fast = getattr(encode, "fast_ids", None)

    def first_call(ms: list[Membrane], fast_ids) -> tuple[Transport, float]:
        """A fresh transport (concepts cached and, for the calibrated metrics, calibrated: both once per
        session) and its first call's ms per prompt: the first sight of these prompts, where the ngram
        metrics encode their phrase windows."""
        tr = Transport(encode, encoder_key="bench", metric=metric, fast_encode_ids=fast_ids)
        tr.registry.record(ctx, toks)
        tr.concepts.get([c for m in ms for c in m.gate_concepts], encode, "bench")
        t0 = time.perf_counter()
        tr.prepare_calibrations(ms)  # a membrane file calibrated on this encoder skips this (spm_transport)
        tr.calibration_ms = 1000 * (time.perf_counter() - t0)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        tr.scores(ctx, ms)
        return tr, round(1000 * (time.perf_counter() - t0) / len(prompts), 4)

    for k in (1, 5, 10):
        ms = membranes[:k]
        tr, out[f"first_call_ms_per_prompt_{k}"] = first_call(ms, fast)
        n_concepts = len({c for m in ms for c in m.gate_concepts})
        # per concept, once per session and encoder: the null and neutral-context windows (0 for other metrics)
        out[f"calibration_ms_per_concept_{k}"] = round(tr.calibration_ms / max(1, n_concepts), 2)
        times, cpu = [], []
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            tr.scores(ctx, ms)
            t1, c1 = time.perf_counter(), time.process_time()
            times.append(t1 - t0)
            cpu.append(c1 - c0)
        out[f"ms_per_prompt_{k}"] = round(1000 * _median(times) / len(prompts), 4)
        out[f"cpu_ms_per_prompt_{k}"] = round(1000 * _median(cpu) / len(prompts), 4)
        out[f"concepts_{k}"] = sum(len(m.gate_concepts) for m in ms)  # with their model synonyms
    if fast is not None and needs_phrases(metric):
        # the same first call with every window padded to 77 tokens (hosts without the unpadded path)
        ms = membranes[:10]
        out[f"first_call_padded_ms_per_prompt_{len(ms)}"] = first_call(ms, None)[1]
    return out


def with_synonyms(membranes: list[Membrane], n: int) -> list[Membrane]:
    """Copies of ``membranes`` whose first concept carries ``n`` model synonyms each (``spm_transport["synonyms"]``,
    as the trainer stores them): distinct whole vocabulary words, a different slice per membrane."""
    from spm.tokenizer import clip_tokenizer
    from spm.transport import _whole_words

    tok = clip_tokenizer()
    ids = _whole_words()
    words = [tok.decode([i]).strip() for i in ids[1000:1000 + n * len(membranes)]]
    out = []
    for i, m in enumerate(membranes):
        info = MembraneInfo(concepts=list(m.concepts),
                            transport={"synonyms": {m.concepts[0]: words[i * n:(i + 1) * n]}})
        out.append(Membrane({}, info, name=f"{m.name}_syn"))
    return out


def time_cached_prehook(unet: torch.nn.Module, encode: Callable, membranes: list[Membrane], repeats: int = 200) -> float:
    """ms per UNet call spent in the transport pre-hook when the conditioning did not change (steps 2…N)."""
    ctx, toks = encode(PROMPTS + NEGATIVES)
    tr = Transport(encode, encoder_key="bench", metric=STEP_METRIC)
    tr.registry.record(ctx, toks)
    stack = MembraneStack(unet)
    stack.set_membranes([(m, 1.0) for m in membranes])
    stack.set_transport(tr)
    kwargs = {"encoder_hidden_states": ctx}
    stack._unet_pre_hook(unet, (None, None), kwargs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stack._unet_pre_hook(unet, (None, None), kwargs)
        times.append(time.perf_counter() - t0)
    stack.detach()
    return round(1000 * _median(times), 4)


# --- memory ----------------------------------------------------------------------------------
def cached_tensors(stack: MembraneStack) -> list[torch.Tensor]:
    """Every tensor a stack keeps between UNet calls: fused downs/ups, padded rank-1 downs, strength columns,
    per-row scaled ups (``row_scaling="cached"``) and the device copies of the strengths."""
    cached = [tt for f in stack._fused.values() for pair in f.cache.values() for tt in pair]
    cached += [pair[0] for f in stack._fused.values() for pair in f.padded.values()]  # rank-1 downs, padded
    cached += [v for v in stack._col_cache.values() if isinstance(v, torch.Tensor)]
    cached += [v for d, v in stack._dev_strengths.items() if d.type != "cpu"]
    return cached


def memory(unet: torch.nn.Module, encode: Callable, membranes: list[Membrane], latent: int) -> dict:
    """Membrane bytes, fused-cache bytes and the no-copy-of-base-weights check (see module docstring)."""
    tensors = list(unet.parameters()) + list(unet.buffers())
    ptrs = {t.untyped_storage().data_ptr() for t in tensors}
    ids = [id(t) for t in tensors]
    base_bytes = sum(t.numel() * t.element_size() for t in tensors)
    ctx, toks = encode(PROMPTS + NEGATIVES)
    x = torch.randn(ctx.shape[0], unet.config.in_channels, latent, latent)
    t = torch.full((ctx.shape[0],), 500)
    tr = Transport(encode, encoder_key="bench", metric=STEP_METRIC)
    tr.registry.record(ctx, toks)
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=ctx)
        unet(x, t, encoder_hidden_states=ctx)
    gc.collect()
    rss0 = rss_bytes()
    stack = MembraneStack(unet)
    stack.set_transport(tr)
    stack.set_membranes([(m, 1.0) for m in membranes])
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=ctx)
        unet(x, t, encoder_hidden_states=ctx)
    gc.collect()
    rss1 = rss_bytes()
    cached = cached_tensors(stack)
    fused_bytes = sum(tt.numel() * tt.element_size() for tt in cached)
    shares = any(tt.untyped_storage().data_ptr() in ptrs for tt in cached)
    largest_cached = max((tt.numel() * tt.element_size() for tt in cached), default=0)
    modules = dict(unet.named_modules())
    # every cached tensor is smaller than the weight of the module it serves (rank × width, not width²)
    smaller_than_weights = all(tt.numel() < modules[name].weight.numel()
                               for name, f in stack._fused.items() for pair in f.cache.values() for tt in pair)
    after = list(unet.parameters()) + list(unet.buffers())
    same_storage = [id(t) for t in after] == ids and {t.untyped_storage().data_ptr() for t in after} == ptrs
    hooks = sum(len(m._forward_hooks) for m in unet.modules())
    stack.detach()
    per = [m.nbytes() for m in membranes]
    membranes_bytes = sum(per)
    rss_delta = rss1 - rss0
    # RSS can only reveal a copy of weights that are large against allocator noise (≥ 256 MiB)
    rss_ok = (rss_delta < 0.05 * base_bytes) if base_bytes >= 2**28 else None
    return {
        "base_weights_bytes": base_bytes,
        "bytes_per_membrane": per[0] if per else 0,
        "params_per_membrane": membranes[0].num_parameters() if membranes else 0,
        "membranes": len(membranes),
        "membranes_bytes": membranes_bytes,
        "fused_cache_bytes": fused_bytes,
        "fused_cache_largest_tensor_bytes": largest_cached,
        "cached_tensors_smaller_than_their_module_weight": smaller_than_weights,
        "hooks": hooks,
        "rss_delta_attach_bytes": rss_delta,
        "rss_delta_below_5pct_of_weights": rss_ok,
        "base_storage_unchanged": same_storage,
        "cache_shares_base_storage": shares,
        # no weight copy: storages unchanged, no cached tensor aliases a base weight or is as large as the
        # weight of its module, and RSS grew by far less than the base weights (allocator noise allowed: 5%)
        "no_weight_copy": bool(same_storage and not shares and smaller_than_weights and rss_ok is not False),
    }


# --- driver ----------------------------------------------------------------------------------
def run(args: argparse.Namespace, log: Callable[[str], None], save: Callable[[dict], None] = lambda r: None) -> dict:
    """All sections; ``save(result)`` is called after each one, so a run cut short keeps what it measured."""
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    result: dict = {"machine": machine(), "method": "interleaved rounds, order rotated; ratio = median over rounds of "
                    "(median step with k membranes / median step with 0) in the same round; transport on "
                    "(clipcos_tokenuni), per-row strengths from each row's conditioning; fp32 CPU"}
    log(f"machine: {result['machine']['cpu']}, {args.threads} threads")

    log("toy model …")
    unet, te, desc = toy_unet()
    te = te if te is not None else clip_text_encoder(context_dim(unet) or 32)
    encode = make_encoder(te)
    ms = make_membranes(unet, max(COUNTS))
    latent = int(unet.config.sample_size)
    toy = {"model": desc, "targets": len(find_targets(unet))}
    toy.update(time_steps(unet, encode, ms, latent, rounds=args.toy_rounds, steps=args.toy_steps, log=log))
    toy["transport"] = time_transport(encode, ms)
    toy["memory"] = memory(unet, encode, ms[:10], latent)
    result["toy"] = toy
    result["transport_ms_per_prompt"] = toy["transport"]["ms_per_prompt_10"]
    result["memory"] = toy["memory"]
    save(result)
    del unet, te, ms
    gc.collect()

    if not args.quick:
        log("SD1.5 architecture: building the UNet (3.4 GB) and a CLIP-L-sized text encoder …")
        t0 = time.perf_counter()
        unet = sd15_unet()
        encode = make_encoder(clip_text_encoder(768))
        ms = make_membranes(unet, max(COUNTS))
        log(f"  built in {time.perf_counter() - t0:.1f}s; {len(find_targets(unet))} targets")
        sd = {"model": "diffusers UNet2DConditionModel, SD1.5 config, random weights, fp32",
              "targets": len(find_targets(unet))}
        log("  memory …")
        sd["memory"] = memory(unet, encode, ms, 8)
        log("  transport …")
        sd["transport"] = time_transport(encode, ms)
        sd["transport_reference_metric"] = time_transport(encode, ms, metric=STEP_METRIC)
        sd["prehook_cached_ms_per_call"] = time_cached_prehook(unet, encode, ms)
        result["transport_ms_per_prompt"] = sd["transport"]["ms_per_prompt_10"]
        result["memory"] = sd["memory"]
        result["sd15"] = sd
        save(result)
        if args.cuda and torch.cuda.is_available():
            # before the long CPU timing, so that a run cut short keeps it; the CPU model stays as it is
            import copy

            log("SD1.5 architecture on CUDA, fp16 …")
            unet_cuda = copy.deepcopy(unet).to("cuda", torch.float16)
            cu = {"model": sd["model"].replace("fp32", "fp16"), "gpu": torch.cuda.get_device_name(0)}
            cu.update(time_steps(unet_cuda, encode, ms, args.sd15_latent, rounds=args.cuda_rounds,
                                 steps=args.cuda_steps, log=log))
            result["sd15_cuda"] = cu
            save(result)
            del unet_cuda
            torch.cuda.empty_cache()
        log("  step timing …")
        sd.update(time_steps(unet, encode, ms, args.sd15_latent, rounds=args.rounds, steps=args.steps, log=log,
                             budget_s=args.sd15_budget))
        save(result)
        log("  time inside the hooks …")
        sd["hook_share"] = hs = hook_share(unet, encode, ms, args.sd15_latent, log=log)
        result["goals"] = {
            "ratio_5<=1.03": sd["ratio_5"] <= 1.03,
            "ratio_10<=1.10": sd["ratio_10"] <= 1.10,
            "hook_share_ratio_est_5<=1.03": hs["ratio_est_5"] <= 1.03,
            "hook_share_ratio_est_10<=1.10": hs["ratio_est_10"] <= 1.10,
            "transport_ms_per_prompt<=1": result["transport_ms_per_prompt"] <= 1.0,
        }
        save(result)
        del unet, ms
        gc.collect()
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["runtime_s"] = round(time.perf_counter() - t_start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON object on stdout (progress on stderr)")
    ap.add_argument("--quick", action="store_true", help="toy model only (seconds); does not overwrite the results file")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds on SD1.5 (default 5)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep the system allocator settings (default: re-run with a caching glibc malloc, see CACHING_MALLOC)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round on SD1.5 (default 1)")
    ap.add_argument("--sd15-budget", type=float, default=None,
                    help="seconds for the SD1.5 timed rounds: rounds chosen from the warm-up step (2 … --rounds)")
    ap.add_argument("--sd15-latent", type=int, default=64, help=argparse.SUPPRESS)  # smoke tests only
    ap.add_argument("--cuda", action="store_true", help="also time SD1.5 in fp16 on the GPU, if there is one")
    ap.add_argument("--cuda-rounds", type=int, default=20)
    ap.add_argument("--cuda-steps", type=int, default=5)
    ap.add_argument("--transport-only", action="store_true",
                    help="measure only the transport cost (SD1.5 text-encoder width) and add it to the results file "
                         "as 'transport_remeasured'")
    ap.add_argument("--synonyms", type=int, default=0, metavar="N",
                    help="with --transport-only: also time membranes that each carry N model synonyms (whole vocabulary "
                         "words the transport scores as concepts; the trainer keeps at most 32), as 'transport_synonyms'")
    ap.add_argument("--hook-share-only", action="store_true",
                    help="measure only the in-step share of time spent in the hooks on SD1.5 (1, 5, 10 membranes) and "
                         "add it to the results file as 'hook_share'")
    ap.add_argument("--toy-rounds", type=int, default=20)
    ap.add_argument("--toy-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", type=Path, default=None, help=f"where to write the JSON (default {RESULTS.relative_to(ROOT)}; "
                                                            "--quick writes nothing unless given)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    out = args.out or (None if args.quick else RESULTS)

    def save(result: dict) -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")

    if args.hook_share_only:
        # in-step attribution on SD1.5 alone, merged into an existing results file as its own, dated section
        torch.set_num_threads(args.threads)
        unet = sd15_unet()
        encode = make_encoder(clip_text_encoder(768))
        ms = make_membranes(unet, max(COUNTS))
        section = {"machine": machine(), "sd15": hook_share(unet, encode, ms, args.sd15_latent, log=log)}
        target = args.out or RESULTS
        result = json.loads(target.read_text()) if target.is_file() else {}
        result["hook_share"] = section
        target.write_text(json.dumps(result, indent=2) + "\n")
        log(f"merged into {target}")
        return 0

    if args.transport_only:
        # transport alone (no UNet): merged into an existing results file as its own, dated section
        torch.set_num_threads(args.threads)
        encode = make_encoder(clip_text_encoder(768))
        ms = [Membrane({}, MembraneInfo(concepts=CONCEPTS[i]), name=f"m{i}") for i in range(max(COUNTS))]
        section = {"machine": machine(), "transport": time_transport(encode, ms, repeats=50),
                   "transport_reference_metric": time_transport(encode, ms, repeats=50, metric=STEP_METRIC)}
        if args.synonyms > 0:
            section["transport_synonyms"] = {"synonyms_per_membrane": args.synonyms,
                                             **time_transport(encode, with_synonyms(ms, args.synonyms), repeats=50)}
        target = args.out or RESULTS
        result = json.loads(target.read_text()) if target.is_file() else {}
        result["transport_remeasured"] = section
        target.write_text(json.dumps(result, indent=2) + "\n")
        log(f"transport: {section['transport']}; merged into {target}")
        if args.json:
            print(json.dumps(section, indent=2))
        return 0

    result = run(args, log, save)
    text = json.dumps(result, indent=2)
    if out is not None:
        save(result)
        log(f"wrote {out}")
    if args.json:
        print(text)
    else:
        for name in ("toy", "sd15"):
            if name in result:
                r = result[name]
                log(f"{name}: " + ", ".join(f"ratio_{k}={r[f'ratio_{k}']}" for k in COUNTS if k))
        log(f"transport: {result['transport_ms_per_prompt']} ms/prompt")
    return 0


if __name__ == "__main__":
    _reexec_with_caching_malloc(sys.argv[1:])
    raise SystemExit(main())
