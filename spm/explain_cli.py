"""``python -m spm explain``: why a prompt gets its Facilitated Transport strength (see :mod:`spm.explain`).

Kept apart from :mod:`spm.explain` so that ``python -m spm --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_explain(args: argparse.Namespace) -> int:
    """Print each membrane's concepts, scores, windows and calibrations for every ``--prompt``."""
    from .checkpoint import MembraneFileError, load_membrane
    from .cli import CliError, _distinct_membranes, _prompt_membranes, load_model
    from .transport import check_metric

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        check_metric(args.metric)
    except ValueError as e:
        return fail(f"--metric: {e}")
    args.prompt = args.prompt or []
    if not args.prompt and not args.vocabulary:
        return fail("give at least one --prompt, or --vocabulary")
    if args.limit < 0:
        return fail(f"--limit {args.limit}: give 0 or more words per concept")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        membranes = [load_membrane(f) for f in args.membrane]
    except (MembraneFileError, FileNotFoundError) as e:
        return fail(str(e))
    try:  # the prompts' <spm:NAME> tags, as in generate: stripped, their membranes explained too
        plans = _prompt_membranes(args.prompt, [(m, 1.0) for m in membranes], args.spm_dir)
    except CliError as e:
        return fail(str(e))
    # the files, then the tags' membranes from --spm-dir (--vocabulary without a prompt: the files)
    membranes = _distinct_membranes(plans) or membranes
    model = {"base": "toy", "finetune": "toy-finetune"}.get(args.model, args.model)
    try:
        pipe = load_model(model, args.config, "cpu")
    except (OSError, ValueError) as e:
        return fail(f"cannot load the model {args.model!r}: {e}")
    from .explain import explain, format_explanation
    from .hosts.diffusers import pipeline_transport
    from .naming import context_dim

    ctx = context_dim(pipe.unet)
    for m in membranes:
        if m.info.context_dim and ctx and m.info.context_dim != ctx:
            return fail(f"{m.name}.safetensors is for context width {m.info.context_dim}; the model {args.model!r} has {ctx} "
                        "(pass the model the membrane was made for with --model)")
    transport = pipeline_transport(pipe, metric=args.metric, factor=args.factor)
    from .transport import uses_response

    if uses_response(args.metric):  # no membrane is attached here: the UNet is the original model's
        from .hosts.diffusers import pipeline_responder

        transport.responder = pipeline_responder(pipe)
    if args.vocabulary:
        from .explain import format_vocabulary, vocabulary

        try:
            voc = vocabulary(transport, membranes, limit=args.limit)
        except ValueError as e:
            return fail(str(e))
        if args.json:
            print(json.dumps(voc, indent=2, ensure_ascii=False))
        else:
            print(format_vocabulary(voc))
        if not args.prompt:
            return 0
        print()
    results = [explain(transport, [m for m, _ in chosen], p) for p, chosen in plans]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_explanation(r) for r in results))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``explain`` on the CLI's subparsers."""
    from .cli import DEFAULT_METRIC

    p = sub.add_parser("explain", help="why a prompt gets its Facilitated Transport strength from each membrane")
    p.add_argument("--membrane", action="append", required=True, help="membrane file (repeatable)")
    p.add_argument("--prompt", action="append",
                   help="prompt (repeatable); its <spm:NAME[:WEIGHT]> tags are removed and their membranes explained too, "
                        "as in generate")
    p.add_argument("--spm-dir", help="membrane folder the prompts' <spm:NAME> tags are looked up in")
    p.add_argument("--vocabulary", action="store_true",
                   help="list the single vocabulary words that open each membrane (calibrated metrics; encodes ~32 000 words)")
    p.add_argument("--limit", type=int, default=50, help="--vocabulary: words listed per concept (default 50; the count is full)")
    p.add_argument("--model", default="toy", help="a shipped toy model's name (toy, toy-finetune; base/finetune also work), "
                                                  "a diffusers folder or a .safetensors checkpoint (default: toy)")
    p.add_argument("--config", default=None, help="for single-file checkpoints: a diffusers folder with the configs")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"transport metric (default {DEFAULT_METRIC})")
    p.add_argument("--factor", type=float, default=1.0, help="facilitate factor (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_explain)
    return p
