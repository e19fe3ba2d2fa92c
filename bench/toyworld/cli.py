"""Command line of the toy world."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench.toyworld")
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="rebuild all assets from a seed")
    from spm.toy.worlds import WORLDS

    worlds = tuple(WORLDS)
    b.add_argument("--world", choices=worlds, default="shapes", help="the toy world to build (default: shapes, world 1)")
    b.add_argument("--quick", action="store_true", help="tiny run that only exercises the code paths")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, default=None)
    b.add_argument("--cpu-schedule", action="store_true", help="the smaller 2-core schedule instead of the shipped one")
    b.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda (the shipped assets: cuda)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--render-workers", type=int, default=1)
    b.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a BuildConfig field")
    bs = sub.add_parser("build-scorer", help="train only the scorer on the shipped VAE")
    bs.add_argument("--world", choices=worlds, default="shapes")
    bs.add_argument("--steps", type=int, default=1200)
    bs.add_argument("--n", type=int, default=8000)
    bs.add_argument("--batch", type=int, default=128)
    bs.add_argument("--device", default="cpu")
    bs.add_argument("--pair-prob", type=float, default=0.5, help="share of two-object images in its training data")
    bs.add_argument("--width", type=int, default=32)
    bs.add_argument("--threads", type=int, default=2)
    bs.add_argument("--out", type=Path, default=None, help="scorer folder (default: the shipped assets' scorer/)")
    fd = sub.add_parser("finetune-decoder", help="fine-tune only the VAE decoder of DIR/base/vae (the latent space stays)")
    fd.add_argument("assets", type=Path, help="an asset folder with base/vae")
    fd.add_argument("--world", choices=worlds, default="shapes")
    fd.add_argument("--steps", type=int, default=600)
    fd.add_argument("--batch", type=int, default=32)
    fd.add_argument("--lr", type=float, default=2e-3)
    fd.add_argument("--n", type=int, default=12000, help="renders to train on (4/5 base, 1/5 shifted)")
    fd.add_argument("--threads", type=int, default=2)
    gr = sub.add_parser("grid", help="write a grid PNG of base generations")
    gr.add_argument("--world", choices=worlds, default="shapes")
    gr.add_argument("--out", type=Path, default=None)
    gr.add_argument("--which", default="base")
    e = sub.add_parser("export-ldm", help="write the base model as one LDM-keyed safetensors + yaml")
    e.add_argument("out", type=Path)
    p.add_argument("--json", action="store_true", help="check the shipped assets, print one JSON object")
    p.add_argument("--n-per-object", type=int, default=12)
    p.add_argument("--world", dest="check_world", choices=worlds, default="shapes", help="the world whose assets to check")
    args = p.parse_args(argv)

    if args.cmd != "build" or args.threads == 2:
        torch.set_num_threads(2)
    if args.cmd == "build":
        from .train import BuildConfig, build

        if args.quick:
            cfg = BuildConfig.quick()
            cfg.decoder_steps = 0 if args.world == "shapes" else 2
        elif args.world == "icons":  # world 2 has one schedule: the one its assets were made with
            cfg = BuildConfig.icons()
        else:
            cfg = BuildConfig.cpu() if args.cpu_schedule else BuildConfig()
        cfg.seed = args.seed
        cfg.world = args.world
        cfg.device = args.device
        cfg.threads = args.threads
        cfg.render_workers = args.render_workers
        for kv in args.set:
            k, v = kv.split("=", 1)
            setattr(cfg, k, type(getattr(cfg, k))(v))
        out = args.out
        if args.quick and out is None:
            out = Path("/tmp/toyworld_quick" + ("" if args.world == "shapes" else f"_{args.world}"))
        build(out, cfg)
        return 0
    if args.cmd == "build-scorer":
        from .train import BuildConfig, build_scorer_only

        cfg = BuildConfig(n_scorer=args.n, scorer_steps=args.steps, scorer_batch=args.batch, device=args.device,
                          scorer_pair_prob=args.pair_prob, scorer_width=args.width, threads=args.threads, world=args.world)
        print(json.dumps(build_scorer_only(None, cfg, args.out)["scorer"]))
        return 0
    if args.cmd == "finetune-decoder":
        from .vae_decoder import finetune_decoder

        print(json.dumps(finetune_decoder(args.assets, args.world, args.steps, args.batch, args.lr, args.n,
                                          threads=args.threads)))
        return 0
    if args.cmd == "grid":
        from .check import make_grid

        path = make_grid(args.out, which=args.which, world=args.world)
        print(path)
        return 0
    if args.cmd == "export-ldm":
        from .ldm import export_ldm

        try:
            yaml_path = export_ldm(args.out)
        except ModuleNotFoundError as e:
            if e.name != "ldm":
                raise
            print("error: export-ldm derives the LDM key names from CompVis ldm (stable-diffusion-sdkit), which is not "
                  "installed: run `bash tools/setup.sh --dev` first", file=sys.stderr)
            return 2
        print(json.dumps({"checkpoint": str(args.out), "config": str(yaml_path)}))
        return 0
    from .check import check_assets

    w = args.check_world
    res = check_assets(n_per_object=args.n_per_object, world=w)
    out = Path(__file__).resolve().parents[1] / "results" / ("toyworld.json" if w == "shapes" else f"toyworld_{w}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    if args.json:
        print(json.dumps(res))
    else:
        json.dump(res, sys.stdout, indent=1)
        print()
    return 0
