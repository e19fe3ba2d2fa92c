"""``python -m spm``: ``info``, ``train``, ``generate``, ``demo`` and ``eval``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


# --- shared -----------------------------------------------------------------------------------------
def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _load_pipe(args):
    import torch

    from .hosts.diffusers import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_pipeline(args.model, config=args.config, device=device, dtype=_dtype(args.model_dtype))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a diffusers folder or a single .safetensors checkpoint")
    p.add_argument("--config", help="for single-file checkpoints: a diffusers folder with the matching configs")
    p.add_argument("--device", help="cuda, cpu, mps … (default: cuda when available)")
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype the model is loaded in")
    p.add_argument("--threads", type=int, help="torch CPU threads")


# --- train ------------------------------------------------------------------------------------------
_TRAIN_FLAGS = {  # flag → (TrainConfig field, type, help)
    "--surrogate": ("surrogate", str, "what the target becomes (default '': the unconditional prediction)"),
    "--iterations": ("iterations", int, "training steps"),
    "--lr": ("lr", float, "learning rate"),
    "--guidance-scale": ("guidance_scale", float, "erase guidance g in ε_neu − g·(ε_pos − ε_neu)"),
    "--la-mode": ("la_mode", str, "Latent Anchoring weight: adaptive (default), fixed (the reference) or off"),
    "--la-strength": ("la_strength", float, "fixed mode: the anchor weight (reference 1000); adaptive: its ceiling"),
    "--la-budget": ("la_budget", float, "adaptive mode: allowed anchor drift relative to the concept's own signal"),
    "--anchors": ("anchors", int, "anchor conditionings per step (the reference's sampling_batch_size)"),
    "--optimizer": ("optimizer", str, "auto, adamw or adamw8bit"),
    "--lr-scheduler": ("lr_scheduler", str, "cosine_with_restarts, cosine, constant or linear"),
    "--lr-warmup-steps": ("lr_warmup_steps", int, "warm-up steps (capped at a sixth of the run)"),
    "--precision": ("precision", str, "fp32, fp16 or bf16 (autocast)"),
    "--resolution": ("resolution", int, "training resolution in pixels (default: the model's)"),
    "--rank": ("rank", int, "membrane rank (SPM: 1)"),
    "--alpha": ("alpha", float, "membrane alpha"),
    "--seed": ("seed", int, "random seed"),
    "--save-every": ("save_every", int, "checkpoint every N steps (membrane + .trainstate for --resume)"),
    "--sample-every": ("sample_every", int, "preview grid (PNG) every N steps"),
    "--pool-size": ("pool_size", int, "latent pool size (fast schedule)"),
    "--max-denoising-steps": ("max_denoising_steps", int, "DDIM steps of the x_t trajectories"),
}


def config_from_args(args):
    from .train.config import PRESETS, TrainConfig, preset

    targets = [t.strip() for raw in args.target for t in raw.split(",") if t.strip()]
    over: dict = {"targets": targets}
    for flag, (name, _, _) in _TRAIN_FLAGS.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None:
            over[name] = v
    if args.control:
        over["control_prompts"] = list(args.control)
    if args.dynamic_resolution:
        over["dynamic_resolution"] = True
    if args.reference_schedule:
        over["schedule"] = "reference"
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    cfg = preset(args.preset, **over) if args.preset else TrainConfig(**over)
    cfg.validate()
    return cfg


def _cmd_train(args) -> int:
    from .train import Trainer

    _threads(args.threads)
    try:
        cfg = config_from_args(args)
        out = Path(args.output)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"-o {out}: membranes are saved as .safetensors")
        if out.exists() and not (args.resume or args.overwrite):
            raise ValueError(f"{out} exists; pass --resume to continue it or --overwrite to replace it")
        pipe = _load_pipe(args)
        from .hosts.diffusers import DiffusersBackend

        backend = DiffusersBackend(pipe)
        trainer = Trainer(backend, cfg, out, resume=args.resume)
    except (ValueError, FileNotFoundError, MembraneFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = trainer.train()
    c = res.cost
    print(json.dumps({"output": str(out), "steps": res.steps, "interrupted": res.interrupted,
                      "seconds": round(res.seconds, 1), "final_loss": res.history[-1]["loss"] if res.history else None,
                      "cost": {k: c[k] for k in ("schedule", "ufe_per_iteration_steady", "seconds_per_iteration")}},
                     indent=2))
    if res.interrupted:
        print(f"interrupted: the membrane trained so far is saved in {out}; continue with --resume", file=sys.stderr)
        return 130
    return 0


# --- generate ---------------------------------------------------------------------------------------
def parse_membrane_arg(spec: str) -> tuple[str, float]:
    """``FILE[:weight]`` → (file, weight). A Windows drive colon is not a weight separator."""
    path, sep, w = spec.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):
        try:
            return path, float(w)
        except ValueError:
            pass
    return spec, 1.0


def _cmd_generate(args) -> int:
    import torch

    from .checkpoint import load_membrane
    from .hosts.diffusers import PipelineMembranes
    from .train.sampling import image_grid

    _threads(args.threads)
    try:
        items = []
        for spec in args.membrane or []:
            f, w = parse_membrane_arg(spec)
            items.append((load_membrane(f), w))
        pipe = _load_pipe(args)
    except (ValueError, FileNotFoundError, MembraneFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = list(args.prompt)
    seeds = [args.seed + i for i in range(args.n)]
    images = []
    try:
        with PipelineMembranes(pipe, items, metric=args.metric, factor=args.factor, transport=not args.no_transport):
            for p in prompts:
                gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                out = pipe(prompt=[p] * len(seeds), negative_prompt=[args.negative] * len(seeds),
                           num_inference_steps=args.steps, guidance_scale=args.cfg, generator=gens,
                           height=args.height, width=args.width, output_type="pt")
                images.append(out.images.float().cpu())
    except (ValueError, MembraneFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid = image_grid(torch.cat(images), len(prompts))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    print(args.output)
    return 0


# --- demo -------------------------------------------------------------------------------------------
DEMO_CONTROLS = ["a red square on a white background", "a blue star", "a green heart on a gray background", "a triangle"]


def _cmd_demo(args) -> int:
    """Train a membrane on the shipped toy model, write a before/after grid, print erasure and preservation."""
    import torch

    _threads(args.threads)
    from .toy import harness
    from .toy.model import load_toy_pipeline

    try:
        pipe = load_toy_pipeline("base")
    except FileNotFoundError as e:
        print(f"error: the demo needs the shipped toy model: {e}", file=sys.stderr)
        return 2
    from .checkpoint import load_membrane
    from .hosts.diffusers import DiffusersBackend, PipelineMembranes
    from .train import TrainConfig, Trainer

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = args.target
    membrane_file = out_dir / f"{target}.safetensors"
    t0 = time.time()
    cfg = TrainConfig(targets=[target], iterations=args.iterations, seed=args.seed)
    if not args.skip_training or not membrane_file.exists():
        print(f"training a membrane that erases {target!r} on the toy model ({cfg.iterations} steps)…", file=sys.stderr)
        res = Trainer(DiffusersBackend(pipe), cfg, membrane_file, progress_bar=not args.quiet).train()
        if res.interrupted:
            print(f"interrupted; partial membrane in {membrane_file}", file=sys.stderr)
            return 130
    membrane = load_membrane(membrane_file)
    literal = [target, f"a red {target}", f"a blue {target} on a white background", f"a green {target} on a black background"]
    prompts = literal + DEMO_CONTROLS
    seeds = list(range(args.seeds))
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    before = harness.generate(pipe, ps, ss)
    with torch.no_grad():
        after = harness.generate(pipe, ps, ss, context=PipelineMembranes(pipe, [(membrane, 1.0)]))
    cols = []
    for i in range(len(prompts)):
        cols.extend(before[i * len(seeds):(i + 1) * len(seeds)] + after[i * len(seeds):(i + 1) * len(seeds)])
    grid_path = out_dir / f"{target}_before_after.png"
    harness.image_grid(cols, 2 * len(seeds), scale=3).save(grid_path)
    n_lit = len(literal) * len(seeds)
    psnr = harness.psnr(before[n_lit:], after[n_lit:])
    report: dict = {"membrane": str(membrane_file), "grid": str(grid_path),
                    "grid_layout": "rows: prompts (4 with the target, then 4 controls); columns: seeds without | with the membrane",
                    "control_psnr_db_median": float(torch.tensor(psnr).clamp(max=100).median())}
    try:
        from .toy.scorer import load_scorer

        scorer = load_scorer()
        sb, sa = harness.score_images(scorer, before[:n_lit]), harness.score_images(scorer, after[:n_lit])
        found_b, found_a = harness.target_found_rate(sb, [target]), harness.target_found_rate(sa, [target])
        report["target_found_before"] = found_b
        report["target_found_after"] = found_a
        report["erasure"] = 1.0 - found_a / found_b if found_b > 0 else float("nan")
        cases = [harness.PromptCase(p, s, [o]) for p, o in zip(DEMO_CONTROLS, ["square", "star", "heart", "triangle"])
                 for s in seeds]
        cb, ca = harness.score_images(scorer, before[n_lit:]), harness.score_images(scorer, after[n_lit:])
        report["control_found_before"] = harness.found_rate(cb, cases)
        report["control_found_after"] = harness.found_rate(ca, cases)
    except (FileNotFoundError, OSError) as e:
        report["scorer"] = f"not available ({e}); only PSNR is reported"
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    return 0


# --- eval -------------------------------------------------------------------------------------------
def _eval_pipeline(spec: str, config: str | None):
    """``base``/``finetune`` (the shipped toy models), a toy asset folder (``unet/`` …) or a diffusers model."""
    from .toy import MODELS, load
    from .toy.model import load_toy_pipeline

    if spec in ("base", "finetune"):
        return load_toy_pipeline(spec)
    if spec in MODELS:
        return load(spec)
    p = Path(spec)
    if p.is_dir() and not (p / "model_index.json").exists() and (p / "unet").is_dir():
        from .toy.evaluate import load_asset_folder

        return load_asset_folder(p)
    from .hosts.diffusers import load_pipeline

    return load_pipeline(spec, config=config, device="cpu")


def _cmd_eval(args) -> int:
    """Erasure and preservation of membranes in the toy world (``spm/toy/evaluate.py``), as JSON."""
    from .checkpoint import load_membrane

    _threads(args.threads)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    from .toy import evaluate as ev
    if args.transfer and args.model == "finetune":
        return fail("--transfer evaluates on the shipped fine-tune as well; --model finetune already is it")
    try:
        items, names = [], []
        for spec in args.membrane:
            f, w = parse_membrane_arg(spec)
            m = load_membrane(f)
            items.append((m, w))
            names.append(m.name)
        if args.target:
            if len(args.target) != len(items):
                return fail(f"{len(args.target)} --target for {len(items)} --membrane: give one --target per --membrane, "
                            "in the same order (comma-separate several objects)")
            targets = [ev.normalise_targets([t for t in raw.split(",") if t.strip()])
                       for raw in args.target]
        else:
            targets = []
            for (m, _), spec in zip(items, args.membrane):
                try:
                    targets.append(ev.normalise_targets(m.concepts, f"the metadata of {parse_membrane_arg(spec)[0]}"))
                except ValueError as e:
                    raise ValueError(f"{e}; pass --target to name the toy object the membrane erases") from None
    except (ValueError, FileNotFoundError, MembraneFileError) as e:
        return fail(str(e))
    suite = {k: getattr(args, k) for k in ("n_literal", "n_paraphrase", "n_per_other", "n_pairs", "n_mixed")
             if getattr(args, k) is not None}
    if args.suite_seed is not None:
        suite["seed"] = args.suite_seed
    say = None if args.quiet else (lambda msg: print(f"[eval] {msg}", file=sys.stderr))
    try:
        base = _eval_pipeline(args.model, args.config)
        world = ev.check_toy_pipeline(base, f"--model {args.model}")
        from .toy.model import load_toy_pipeline
        from .toy.scorer import load_scorer

        finetune = load_toy_pipeline("finetune", world=world) if args.transfer else None
        scorer = load_scorer(world=world)
    except FileNotFoundError as e:
        return fail(f"the toy world's assets are missing ({e}); rebuild them with `python -m bench.toyworld build`")
    except (ValueError, OSError) as e:
        return fail(str(e))
    from .toy import harness

    try:
        report = ev.evaluate(base, scorer, items, targets, finetune=finetune, metric=args.metric,
                             transport=not args.no_transport,
                             steps=harness.DEFAULT_STEPS if args.steps is None else args.steps,
                             cfg=harness.DEFAULT_CFG if args.cfg is None else args.cfg,
                             suite=suite, names=names, progress=say)
    except (ValueError, MembraneFileError) as e:  # NotToyModel, IncompatibleMembrane, bad settings
        return fail(str(e))
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(out)
    else:
        print(text)
    return 0


# --- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spm", description="SPM concept-erasing membranes")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="print a membrane file's concepts, architecture, rank and modules as JSON")
    i.add_argument("files", nargs="+")
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser("train", help="train a membrane that erases --target (diffusers host)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(t)
    t.add_argument("--target", action="append", required=True, help="concept to erase (repeat or comma-separate)")
    t.add_argument("-o", "--output", required=True, help="membrane file to write (.safetensors)")
    t.add_argument("--preset", default="object", help="object, style or nudity")
    for flag, (_, typ, hlp) in _TRAIN_FLAGS.items():
        t.add_argument(flag, type=typ, default=None, help=hlp)
    t.add_argument("--control", action="append", help="control prompt for the preview grids (repeatable)")
    t.add_argument("--dynamic-resolution", action="store_true", help="vary the training resolution")
    t.add_argument("--reference-schedule", action="store_true",
                   help="make x_t like the reference (re-denoise from noise every step; about 3x slower)")
    t.add_argument("--resume", action="store_true", help="continue from --output and its .trainstate")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate images with membranes and Facilitated Transport (diffusers host)")
    _add_model_args(g)
    g.add_argument("--membrane", action="append", help="FILE[:weight] (repeatable)")
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one grid row each)")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-n", type=int, default=1, help="images per prompt (seeds seed, seed+1, …)")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--cfg", type=float, default=7.5)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--metric", default=None, help="transport metric (default: the library default)")
    g.add_argument("--factor", type=float, default=1.0, help="facilitate factor")
    g.add_argument("--no-transport", action="store_true", help="apply membranes at their weight to every prompt")
    g.add_argument("-o", "--output", required=True, help="PNG grid to write")
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("demo", help="erase an object from the shipped toy model; before/after grid and numbers")
    d.add_argument("--target", default="circle")
    d.add_argument("--iterations", type=int, default=None)
    d.add_argument("--seeds", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="demo_out")
    d.add_argument("--threads", type=int)
    d.add_argument("--skip-training", action="store_true", help="reuse the membrane in --out if present")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)

    e = sub.add_parser("eval", help="toy world: erasure and preservation of membranes, scored by the toy scorer (JSON)")
    e.add_argument("--model", default="base",
                   help="base or finetune (the shipped toy models), a toy asset folder, or a diffusers folder of a toy model")
    e.add_argument("--config", help="for a single-file checkpoint: a diffusers folder with its configs")
    e.add_argument("--transfer", action="store_true", help="also evaluate the membranes on the shipped fine-tune")
    e.add_argument("--membrane", action="append", required=True, help="FILE[:weight] (repeatable: all act together)")
    e.add_argument("--target", action="append",
                   help="the toy objects a membrane erases (comma-separated), one --target per --membrane in the same "
                        "order (default: each file's concepts metadata)")
    e.add_argument("--metric", help="transport metric (default: the library default)")
    e.add_argument("--no-transport", action="store_true", help="apply membranes at their weight to every prompt")
    e.add_argument("--steps", type=int, help="DDIM steps (default 25, the toy harness's)")
    e.add_argument("--cfg", type=float, help="guidance scale (default 7.5, the toy harness's)")
    e.add_argument("--n-literal", type=int, help="literal target prompts (default 16)")
    e.add_argument("--n-paraphrase", type=int, help="paraphrase prompts (default 8)")
    e.add_argument("--n-per-other", type=int, help="single-object prompts per non-target object (default 3)")
    e.add_argument("--n-pairs", type=int, help="two-object non-target prompts (default 8)")
    e.add_argument("--n-mixed", type=int, help="target + non-target prompts (default 8)")
    e.add_argument("--suite-seed", type=int, help="seed of the prompt suite (default 1234)")
    e.add_argument("-o", "--out", help="write the JSON here (default: print it)")
    e.add_argument("--threads", type=int, help="torch CPU threads")
    e.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cmd", None) == "generate" and args.metric is None:
        from .transport import DEFAULT_METRIC

        args.metric = DEFAULT_METRIC
    if getattr(args, "cmd", None) == "demo" and args.iterations is None:
        from .train.config import TrainConfig

        args.iterations = TrainConfig().iterations
    return args.func(args)
