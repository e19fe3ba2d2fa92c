"""Does the trainer's fixed learning rate depend on how a model's layers are scaled, and would a per-layer rate undo it?

``python -m bench.lr_layer_scale --json`` prints one JSON object and writes ``bench/results/lr_layer_scale.json``.

The same function, other layer scales: in every attention block of the toy UNet, ``to_q`` and ``to_v`` are
multiplied by ``c`` and ``to_k`` and ``to_out`` divided by it. Attention logits (q·k) and outputs (softmax·v
through to_out) are unchanged, so the model computes exactly the same function (``c`` a power of two: bit for bit,
checked on random inputs). Then one membrane is trained for ``--iterations`` at the trainer's defaults (model
synonyms off, no early stop, a check every 60 steps) on:

* ``original, fixed lr``: the shipped model, the shipped optimiser;
* ``rescaled, fixed lr``: the rescaled model, the shipped optimiser;
* ``rescaled, per-layer lr`` / ``original, per-layer lr``: each membrane layer's rate (``lora_down`` and
  ``lora_up``) multiplied by the gain rms(W)·√(in features) of the layer it sits on, relative to PyTorch's default
  initialisation (1/√3);
* ``rescaled, per-side lr`` / ``original, per-side lr``: only ``lora_up``'s rate multiplied by that gain
  (``lora_down`` acts on the layer's input, ``down·x``, and needs no factor; see :func:`_per_side`).

The erasure signal of each check (the trainer's own, ``signal_history``) is reported: if the rate did not depend on
the layer scale, the two fixed-lr runs would match; a rule that undoes the dependence makes its two runs match.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import spm.train.loop as loop  # noqa: E402
from spm import toy  # noqa: E402
from spm.hosts.diffusers import DiffusersBackend  # noqa: E402
from spm.naming import find_targets  # noqa: E402
from spm.train import TrainConfig, Trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "lr_layer_scale.json"
INIT = 1 / math.sqrt(3)  # rms(W)·√in of nn.Linear's default (kaiming-uniform, a = √5) initialisation


def rescale(unet: torch.nn.Module, c: float) -> int:
    """Scale q, v by ``c`` and k, out by ``1/c`` in every attention block (the same function); returns the count."""
    n = 0
    with torch.no_grad():
        for m in unet.modules():
            if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out")):
                m.to_q.weight.mul_(c)
                m.to_k.weight.div_(c)
                m.to_v.weight.mul_(c)
                m.to_out[0].weight.div_(c)
                n += 1
    return n


class _ScaledAdamW(torch.optim.AdamW):
    """AdamW whose groups step at ``lr × group["k"]`` (the trainer sets ``lr`` on every group each step)."""

    def step(self, closure=None):
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] *= g.get("k", 1.0)
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr


def _gains(trainer: Trainer) -> list[tuple[object, float]]:
    """``(membrane layer, rms(W)·√in / INIT of the module it sits on)`` for every layer of the run's membrane."""
    unet = trainer.backend.unet
    mods = dict(unet.named_modules())
    where = {t.file_key: t.name for t in find_targets(unet)}
    out = []
    for key, layer in trainer._spm_membrane.layers.items():
        w = mods[where[key]].weight.detach().float().flatten(1)
        out.append((layer, float(w.pow(2).mean().sqrt()) * math.sqrt(w.shape[1]) / INIT))
    return out


def _optimiser(trainer: Trainer, stats: dict, down_too: bool):
    """A ``make_optimizer`` whose ``lora_up`` steps at rate × the layer's gain (:func:`_gains`), and ``lora_down`` too
    with ``down_too`` (else at the rate)."""

    def make(cfg, params, device):
        groups = []
        for layer, gain in _gains(trainer):
            groups.append({"params": [layer.lora_down.weight], "k": gain if down_too else 1.0})
            groups.append({"params": [layer.lora_up.weight], "k": gain})
        ks = sorted(g["k"] for g in groups)
        stats.update({"k_min": round(ks[0], 3), "k_median": round(ks[len(ks) // 2], 3), "k_max": round(ks[-1], 3)})
        return _ScaledAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    return make


def _per_layer(trainer: Trainer, stats: dict):
    """Each membrane layer (``lora_down`` and ``lora_up``) at rate × the gain of its module."""
    return _optimiser(trainer, stats, down_too=True)


def _per_side(trainer: Trainer, stats: dict):
    """``lora_down`` at the rate, ``lora_up`` at rate × the layer's gain rms(W)·√in / INIT.  ``lora_down``'s effect is
    ``down·x``, which scales with the input as the layer's own output does, so it needs no factor; ``lora_up`` must
    grow with the layer's gain for ``up·down·x`` to keep its share of the output (on a layer rescaled by c on either
    side, exactly the c that keeps the function)."""
    return _optimiser(trainer, stats, down_too=False)


def run(model: str, target: str, c: float, per_layer: bool | str, iterations: int) -> dict:
    pipe = toy.load(model)
    out: dict = {"scale": c, "per_layer_lr": per_layer}
    if c != 1:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, pipe.unet.config.in_channels, 16, 16, generator=g)
        ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
        t = torch.tensor([500, 200])
        with torch.no_grad():
            before = pipe.unet(x, t, ctx).sample
            out["attention_blocks"] = rescale(pipe.unet, c)
            out["max_output_change"] = float((pipe.unet(x, t, ctx).sample - before).abs().max())
    cfg = TrainConfig(targets=[target], iterations=iterations, stop_when_erased=False,
                      signal_checks=max(1, iterations // 60), synonyms="off")
    trainer = Trainer(DiffusersBackend(pipe), cfg, None, progress_bar=False)
    new_membrane, make = trainer._new_membrane, loop.make_optimizer

    def keep():
        trainer._spm_membrane = new_membrane()
        return trainer._spm_membrane

    trainer._new_membrane = keep
    if per_layer == "side":
        loop.make_optimizer = _per_side(trainer, out)
    elif per_layer:
        loop.make_optimizer = _per_layer(trainer, out)
    t0 = time.time()
    try:
        res = trainer.train()
    finally:
        loop.make_optimizer = make
    out["signal"] = [[h["step"], round(h["signal"], 4)] for h in res.membrane.info.training["signal_history"]]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--model", default="toy")
    p.add_argument("--target", default="circle")
    p.add_argument("--scale", type=float, default=4.0, help="c: q, v × c and k, out ÷ c (default 4)")
    p.add_argument("--iterations", type=int, default=360)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if not (math.isfinite(args.scale) and args.scale > 0 and args.scale != 1):
        p.error(f"--scale {args.scale:g}: give a positive factor other than 1 (q, v × it, k, out ÷ it)")
    if args.iterations < 60:
        p.error(f"--iterations {args.iterations}: give at least 60 (the signal is checked every 60 steps)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs = {}
    for label, c, per_layer in (("original, fixed lr", 1.0, False), ("rescaled, fixed lr", args.scale, False),
                                ("rescaled, per-layer lr", args.scale, True), ("original, per-layer lr", 1.0, True),
                                ("rescaled, per-side lr", args.scale, "side"), ("original, per-side lr", 1.0, "side")):
        runs[label] = run(args.model, args.target, c, per_layer, args.iterations)
        print(f"[lr] {label}: {runs[label]['signal']}", file=sys.stderr, flush=True)
    res = {"what": "the trainer's signal on a function-identical model with rescaled layers (bench.lr_layer_scale)",
           "model": args.model, "target": args.target, "iterations": args.iterations, "runs": runs,
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res if args.json else {k: v["signal"][-1] for k, v in runs.items()}))


if __name__ == "__main__":
    main()
