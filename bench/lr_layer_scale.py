"""Does the trainer's learning rate depend on how a model's layers are scaled, and does its per-layer rate undo it?

``python -m bench.lr_layer_scale --json`` prints one JSON object and writes ``bench/results/lr_layer_scale.json``.

The same function, other layer scales: in every attention block of the toy UNet, ``to_q`` and ``to_v`` are
multiplied by ``c`` and ``to_k`` and ``to_out`` divided by it. Attention logits (q·k) and outputs (softmax·v
through to_out) are unchanged, so the model computes exactly the same function (``c`` a power of two: bit for bit,
checked on random inputs). Then one membrane is trained for ``--iterations`` at the trainer's defaults (model
synonyms off, no early stop, a check every 60 steps) on:

* ``original, fixed lr`` / ``rescaled, fixed lr``: every parameter at the rate (``TrainConfig.lr_layers="fixed"``);
* ``rescaled, per-layer lr`` / ``original, per-layer lr``: a rejected variant, each membrane layer's rate
  (``lora_down`` and ``lora_up``) multiplied by the gain rms(W)·√(in features) of the layer it sits on, relative to
  PyTorch's default initialisation (1/√3) (:func:`_both_sides`);
* ``rescaled, per-side lr`` / ``original, per-side lr``: the trainer's default, ``lr_layers="gain"``: only
  ``lora_up``'s rate multiplied by that gain (``lora_down`` acts on the layer's input, ``down·x``, and needs no
  factor; see :mod:`spm.train.lr`).

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
import spm.train.lr as lr  # noqa: E402
from spm import toy  # noqa: E402
from spm.hosts.diffusers import DiffusersBackend  # noqa: E402
from spm.train import TrainConfig, Trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "lr_layer_scale.json"


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


def _both_sides(layers: dict, gains: dict | None) -> list[dict]:
    """The rejected variant: ``lora_down`` at rate × the layer's gain too (each layer's two weights in one group)."""
    if gains is None:
        return lr.param_groups(layers, None)
    return [{"params": [layer.lora_down.weight, layer.lora_up.weight], "lr_gain": gains[k]} for k, layer in layers.items()]


def _gain_stats(res) -> dict:
    g = res.membrane.info.training.get("lr_gains") or {}
    return {"k_min": g.get("min"), "k_median": g.get("median"), "k_max": g.get("max")} if g else {}


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
    mode = "fixed" if per_layer is False else "gain"
    cfg = TrainConfig(targets=[target], iterations=iterations, stop_when_erased=False,
                      signal_checks=max(1, iterations // 60), synonyms="off", lr_layers=mode)
    trainer = Trainer(DiffusersBackend(pipe), cfg, None, progress_bar=False)
    groups = loop.param_groups
    if per_layer is True:
        loop.param_groups = _both_sides
    t0 = time.time()
    try:
        res = trainer.train()
    finally:
        loop.param_groups = groups
    out.update(_gain_stats(res))
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
    if toy.toy_model(args.model) is None:
        p.error(f"--model {args.model}: not a shipped toy model; choose one of {', '.join(toy.MODELS)}")
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
