"""Images of the trainer's own context prompts: is the target gone there, as the signal's "inside other words" part
claims or denies?

``python -m bench.context_images --world toy2 --json`` prints one JSON object and writes
``bench/results/context_images_<world>.json``.

The trainer measures its erasure signal on two parts, the target alone and the target inside other words (the
context prompts it drew, recorded in the file as ``context_prompts``); the verdict takes the lesser.  The sweep's
suites (``bench.erasure``) hold captions, not the trainer's context prompts, so they cannot say whether a "not erased"
that comes from the context part is right.  This does: for every membrane in ``--membranes`` (default: the
sweep's, ``bench/results/erasure_membranes/<world>``) it generates each recorded context prompt of each concept
with ``--seeds`` seeds, without and with the membrane (default transport, as in generation), and judges the
images with the world's scorer.  Per concept: how many images the base model drew the target in (``base_drew``),
how many of those keep it (``kept``), how many get it only with the membrane (``new``), ``erasure`` =
1 − (kept + new) / base_drew, beside the trainer's verdict and its two parts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"  # context_images_<world>.json
SEED0 = 424242  # image seeds: SEED0 + 97·prompt + seed (none of the suites' or the trainer's)


def measure(pipe, scorer, world, membrane, seeds: int) -> dict:
    """Per concept of ``membrane``: its context prompts' images without and with it (see the module docstring)."""
    from spm.checkpoint import resolve_targets
    from spm.hosts.diffusers import PipelineMembranes
    from spm.naming import KeyMap, context_dim, describe_architecture
    from spm.toy import harness

    ctx = context_dim(pipe.unet)  # a membrane for another model: IncompatibleMembrane before any image
    resolve_targets(membrane, KeyMap.for_model(pipe.unet), describe_architecture(ctx), ctx)
    tr = membrane.info.training or {}
    er = tr.get("erasure") or {}
    out: dict = {}
    for concept in membrane.concepts:
        pairs = (tr.get("context_prompts") or {}).get(concept) or []
        prompts = [p[0] if isinstance(p, (list, tuple)) else str(p) for p in pairs]
        row: dict = {"verdict": "erased" if er.get("erased") else "not erased", "signal": er.get("signal"),
                     "signal_parts": er.get("signal_parts"), "context_prompts": len(prompts)}
        if concept not in harness.labels_of(world).OBJECTS:
            out[concept] = {**row, "skipped": "not an object of this toy world's scorer"}
            continue
        if not prompts:
            out[concept] = {**row, "skipped": "the file records no context prompts for it (trained with --contexts 0 "
                                              "or before they existed)"}
            continue
        ps = [p for p in prompts for _ in range(seeds)]
        ss = [SEED0 + 97 * i + s for i in range(len(prompts)) for s in range(seeds)]
        before = harness.generate(pipe, ps, ss)
        after = harness.generate(pipe, ps, ss, context=PipelineMembranes(pipe, [(membrane, 1.0)]))
        judge = harness.target_judge(scorer, concept, world)
        jb, ja = judge(before), judge(after)
        drew = int(sum(bool(b) for b in jb))
        kept = int(sum(bool(a) and bool(b) for a, b in zip(ja, jb)))
        new = int(sum(bool(a) and not bool(b) for a, b in zip(ja, jb)))
        kept_prompts = sorted({p for p, a, b in zip(ps, ja, jb) if a and b})
        out[concept] = {**row, "images": len(ps), "base_drew": drew, "kept": kept, "new": new,
                        "erasure": round(1 - (kept + new) / drew, 4) if drew else None, "kept_in": kept_prompts}
    return out


def summarise(objects: dict) -> dict:
    """How the verdict compares with the context images: ``context_all_erased`` is erasure 1.0 there."""
    rows = [r for per in objects.values() for r in per.values() if r.get("erasure") is not None]
    both = {"erased": {"all_erased": 0, "some_kept": 0}, "not erased": {"all_erased": 0, "some_kept": 0}}
    for r in rows:
        both[r["verdict"]]["all_erased" if r["erasure"] >= 1 else "some_kept"] += 1
    return {"concepts": len(rows), "verdict_vs_context_images": both}


def main(argv=None) -> None:
    from spm import toy
    from spm.checkpoint import MembraneFileError, load_membrane
    from spm.toy.evaluate import world_of
    from spm.toy.scorer import load_scorer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--world", default="toy2", help="the toy model the membranes were trained on (default: toy2)")
    p.add_argument("--membranes", help="folder of OBJECT.safetensors (default: bench/results/erasure_membranes/WORLD)")
    p.add_argument("--objects", help="comma-separated file stems (default: every .safetensors in the folder)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per context prompt (default: 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="the JSON (default: bench/results/context_images_WORLD.json)")
    args = p.parse_args(argv)
    if toy.toy_model(args.world) is None:
        p.error(f"--world {args.world}: not a shipped toy model; choose one of {', '.join(toy.MODELS)}")
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: give at least 1")
    folder = Path(args.membranes) if args.membranes else ROOT / "bench" / "results" / "erasure_membranes" / args.world
    if not folder.is_dir():
        p.error(f"--membranes {folder}: no such folder (train them with python -m bench.erasure --world {args.world})")
    stems = [s.strip() for s in args.objects.split(",") if s.strip()] if args.objects else sorted(
        f.stem for f in folder.glob("*.safetensors") if ".step" not in f.stem)
    missing = [s for s in stems if not (folder / f"{s}.safetensors").exists()]
    if missing or not stems:
        p.error(f"--membranes {folder}: no {', '.join(missing) or 'membrane'} .safetensors there")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = toy.load(args.world)
    world = world_of(pipe)
    scorer = load_scorer(world=world)
    objects = {}
    for stem in stems:
        try:  # an unreadable file, or one for another model (IncompatibleMembrane, raised on attaching it)
            objects[stem] = measure(pipe, scorer, world, load_membrane(folder / f"{stem}.safetensors"), args.seeds)
        except MembraneFileError as e:
            p.error(f"{stem}: {e}")
        print(f"[context] {stem}: {json.dumps({c: {k: r.get(k) for k in ('verdict', 'base_drew', 'kept', 'new', 'erasure')} for c, r in objects[stem].items()})}",
              file=sys.stderr, flush=True)
    res = {"what": "images of the trainer's recorded context prompts without and with each membrane (bench.context_images)",
           "world": args.world, "membranes": str(folder), "seeds": args.seeds, "objects": objects,
           "summary": summarise(objects), "seconds": round(time.time() - t0, 1)}
    Path(args.out or RESULTS / f"context_images_{args.world}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res if args.json else res["summary"]))


if __name__ == "__main__":
    main()
