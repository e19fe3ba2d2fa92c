"""``python -m spm``: info, and the trainer/generator/eval commands as they land."""

from __future__ import annotations

import argparse
import json
import sys

from .checkpoint import MembraneFileError, info_dict


def _cmd_info(args) -> int:
    out = []
    for f in args.files:
        try:
            out.append(info_dict(f))
        except MembraneFileError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spm", description="SPM concept-erasing membranes")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="print a membrane file's concepts, architecture, rank and modules as JSON")
    i.add_argument("files", nargs="+")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
