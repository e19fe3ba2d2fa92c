"""Command line of the toy world."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(2)
    p = argparse.ArgumentParser(prog="python -m bench.toyworld")
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="rebuild all assets from a seed")
    b.add_argument("--quick", action="store_true", help="tiny run that only exercises the code paths")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, default=None)
    gr = sub.add_parser("grid", help="write a grid PNG of base generations")
    gr.add_argument("--out", type=Path, default=None)
    gr.add_argument("--which", default="base")
    e = sub.add_parser("export-ldm", help="write the base model as one LDM-keyed safetensors + yaml")
    e.add_argument("out", type=Path)
    p.add_argument("--json", action="store_true", help="check the shipped assets, print one JSON object")
    p.add_argument("--n-per-object", type=int, default=12)
    args = p.parse_args(argv)

    if args.cmd == "build":
        from .train import BuildConfig, build

        cfg = BuildConfig.quick() if args.quick else BuildConfig()
        cfg.seed = args.seed
        out = args.out
        if args.quick and out is None:
            out = Path("/tmp/toyworld_quick")
        build(out, cfg)
        return 0
    if args.cmd == "grid":
        from .harness import make_grid

        path = make_grid(args.out, which=args.which)
        print(path)
        return 0
    if args.cmd == "export-ldm":
        from .ldm import export_ldm

        yaml_path = export_ldm(args.out)
        print(json.dumps({"checkpoint": str(args.out), "config": str(yaml_path)}))
        return 0
    from .harness import check_assets

    res = check_assets(n_per_object=args.n_per_object)
    out = Path(__file__).resolve().parents[1] / "results" / "toyworld.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    if args.json:
        print(json.dumps(res))
    else:
        json.dump(res, sys.stdout, indent=1)
        print()
    return 0
