"""``python -m spm``: ``info``, ``train``, ``generate``, ``demo``, ``eval`` and ``bake``.

Building the parser and ``--help`` import nothing heavy (no torch, diffusers or transformers): every command
imports what it needs when it runs.  The defaults shown come from :mod:`spm.train.config` and the shipped toy
models from :mod:`spm.toy`, both importable without torch.  A bad argument ends in one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from . import attack_cli, explain_cli

DEFAULT_METRIC = "ngram_tokenuni"  # spm.transport.DEFAULT_METRIC (kept equal by tests/test_cli_help.py)
GENERATE_STEPS = 25
GENERATE_CFG = 7.5


class CliError(Exception):
    """A bad argument or input found while a command runs: printed as one ``error:`` line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``prog: error: …``), exit 2, not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(msg: object) -> int:
    text = str(msg).strip().splitlines()
    print(f"error: {text[0] if text else type(msg).__name__}", file=sys.stderr)
    return 2


# --- argument types (argparse calls them; their errors become one line) ---------------------------
def _whole(text: str, least: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"{v} is {what} (give {least} or more)")
    return v


def positive_int(text: str) -> int:
    return _whole(text, 1, "not positive")


def non_negative_int(text: str) -> int:
    return _whole(text, 0, "negative")


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return v


# --- membranes and models ------------------------------------------------------------------------
def parse_membrane_arg(spec: str) -> tuple[str, float]:
    """``FILE[:weight]`` → (file, weight). A Windows drive colon is not a weight separator.

    A non-numeric or non-finite weight after the last colon is a ``ValueError``, unless the whole ``spec``
    names an existing file (a file name that contains a colon).
    """
    path, sep, w = spec.rpartition(":")
    if not sep or not path or (len(path) == 1 and path.isalpha()) or w.startswith(("/", "\\")):
        return spec, 1.0
    if Path(spec).is_file():
        return spec, 1.0
    try:
        weight = float(w)
    except ValueError:
        raise ValueError(f"--membrane {spec}: the weight {w!r} after ':' is not a number (FILE[:weight], e.g. "
                         f"{Path(path).name}:0.8)") from None
    if not math.isfinite(weight):
        raise ValueError(f"--membrane {spec}: the weight {w!r} is not a finite number")
    return path, weight


def _load_membranes(specs) -> list:
    """``[(Membrane, weight)]`` for ``FILE[:weight]`` specs, with a command-line hint for a missing file."""
    from .checkpoint import load_membrane

    items = []
    for spec in specs or []:
        f, w = parse_membrane_arg(spec)
        p = Path(f)
        if not p.exists():
            raise CliError(f"--membrane {f}: no such file (give a path to a .safetensors membrane)")
        items.append((load_membrane(p), w))
    return items


def _toy_help() -> str:
    """The shipped toy models by name and the concepts each world knows (no torch)."""
    from . import toy

    lines = ["shipped toy models (--model NAME):"]
    width = max(len(n) for n in toy.MODELS)
    for name, m in toy.MODELS.items():
        lines.append(f"  {name:<{width}}  {m.summary}")
    for world in dict.fromkeys(m.world for m in toy.MODELS.values()):
        names = ", ".join(n for n, m in toy.MODELS.items() if m.world == world)
        lines.append(f"concepts the {world} models ({names}) know: {', '.join(toy.concepts(world))}")
    return "\n".join(lines)


MODEL_HELP = "a shipped toy model by name (see below), a diffusers folder, or a single .safetensors checkpoint"


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_model(spec: str, config: str | None = None, device: str | None = None, dtype_name: str = "fp32"):
    """A diffusers pipeline for ``--model``: a shipped toy model's name, or a path for :func:`load_pipeline`."""
    import torch

    from . import toy

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(dtype_name)
    if toy.toy_model(spec) is not None:
        pipe = toy.load(spec, dtype)
        pipe.to(device)
        return pipe
    from .hosts.diffusers import load_pipeline

    return load_pipeline(spec, config=config, device=device, dtype=dtype)


def _load_pipe(args):
    return load_model(args.model, args.config, args.device, args.model_dtype)


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--config", help="for single-file checkpoints: a diffusers folder with the matching configs")
    p.add_argument("--device", help="cuda, cpu, mps … (default: cuda when available)")
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype the model is loaded in (default: fp32)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")


def _model_errors():
    from .checkpoint import MembraneFileError

    return (CliError, ValueError, FileNotFoundError, NotADirectoryError, OSError, MembraneFileError)


def _info_cmd(args) -> int:
    from .checkpoint import MembraneFileError, info_dict

    out = []
    for f in args.files:
        if not Path(f).exists():
            return _fail(f"{f}: no such file (give a path to a .safetensors membrane)")
        try:
            out.append(info_dict(f))
        except MembraneFileError as e:
            return _fail(e)
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2, ensure_ascii=False))
    return 0


# --- train ------------------------------------------------------------------------------------------
_TRAIN_FLAGS = {  # flag → (TrainConfig field, type, help)
    "--surrogate": ("surrogate", str, "what the target becomes ('': the unconditional prediction)"),
    "--iterations": ("iterations", positive_int, "training steps"),
    "--lr": ("lr", positive_float, "learning rate"),
    "--guidance-scale": ("guidance_scale", finite_float, "erase guidance g in ε_neu − g·(ε_pos − ε_neu)"),
    "--la-mode": ("la_mode", str, "Latent Anchoring weight: adaptive, fixed (the reference) or off"),
    "--la-strength": ("la_strength", finite_float, "fixed mode: the anchor weight (reference 1000); adaptive: its ceiling"),
    "--la-budget": ("la_budget", finite_float, "adaptive mode: allowed anchor drift relative to the concept's own signal"),
    "--anchors": ("anchors", non_negative_int, "anchor conditionings per step (the reference's sampling_batch_size)"),
    "--optimizer": ("optimizer", str, "auto, adamw or adamw8bit"),
    "--lr-layers": ("lr_layers", str, "gain: each layer's lora_up steps at lr × the gain rms(W)·√in of the layer it "
                                      "sits on, so the model's weight scale does not set the speed; fixed: all at lr"),
    "--context-words": ("context_words", str, "the words around the target in the context prompts (--contexts): mixed "
                                              "(English function words and random whole words of the CLIP vocabulary) "
                                              "or function (function words only)"),
    "--lr-scheduler": ("lr_scheduler", str, "cosine_with_restarts, cosine, constant or linear"),
    "--lr-warmup-steps": ("lr_warmup_steps", non_negative_int, "warm-up steps (capped at a sixth of the run)"),
    "--precision": ("precision", str, "fp32, fp16 or bf16 (autocast)"),
    "--resolution": ("resolution", positive_int, "training resolution in pixels"),
    "--rank": ("rank", positive_int, "membrane rank (SPM: 1)"),
    "--alpha": ("alpha", positive_float, "membrane alpha"),
    "--seed": ("seed", int, "random seed"),
    "--save-every": ("save_every", non_negative_int, "checkpoint every N steps (membrane + .trainstate for --resume)"),
    "--sample-every": ("sample_every", non_negative_int, "preview grid (PNG) every N steps"),
    "--pool-size": ("pool_size", positive_int, "latent pool size (fast schedule)"),
    "--max-denoising-steps": ("max_denoising_steps", positive_int, "DDIM steps of the x_t trajectories"),
    "--robust": ("robust", str, "robust to adversarial prompts: 'embedding' also erases adversarial text embeddings "
                                "searched against the membrane while it trains (slower) and marks the file for the "
                                "response metric's ramp from the empty prompt; use it with --metric response at "
                                "generation; 'off' does not"),
}
_NONE_DEFAULT = {"resolution": "the model's"}


def _default_text(field: str) -> str:
    """``(default: 600; style 1000, nudity 1000)``: TrainConfig's default and the presets that change it."""
    from dataclasses import MISSING, fields

    from .train.config import PRESETS, TrainConfig

    f = {x.name: x for x in fields(TrainConfig)}[field]
    base = f.default
    if base is MISSING:
        return ""
    shown = _NONE_DEFAULT.get(field, "none") if base is None else ("''" if base == "" else f"{base:g}" if isinstance(
        base, float) else str(base))
    by = [f"{name} {over[field]:g}" if isinstance(over[field], float) else f"{name} {over[field]}"
          for name, over in PRESETS.items() if field in over]
    return f"(default: {shown}{'; preset ' + ', '.join(by) if by else ''})"


def config_from_args(args):
    from .train.config import PRESETS, TrainConfig, preset

    targets = [t.strip() for raw in args.target for t in raw.split(",") if t.strip()]
    if not targets:
        raise ValueError(f"--target {', '.join(map(repr, args.target))}: name the concept to erase, e.g. --target "
                         "'Van Gogh' (commas separate several)")
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
    if getattr(args, "neighbours", None) is not None:
        over["neighbours"] = bool(args.neighbours)
    if getattr(args, "synonyms", None) is not None:
        over["synonyms"] = args.synonyms
    if getattr(args, "contexts", None) is not None:
        over["contexts"] = args.contexts
    if getattr(args, "no_early_stop", False):
        over["stop_when_erased"] = False
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    cfg = preset(args.preset, **over) if args.preset else TrainConfig(**over)
    cfg.validate()
    return cfg


def _cmd_train(args) -> int:
    if args.jobs:  # many membranes: spm/train/multi.py
        from .train.multi import main as train_jobs

        return train_jobs(args)
    if not args.target or not args.output:
        print("error: train needs --target and -o/--output (or --jobs FILE)", file=sys.stderr)
        return 2
    _threads(args.threads)
    try:
        cfg = config_from_args(args)
        out = Path(args.output)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"-o {out}: membranes are saved as .safetensors")
        if out.exists() and not (args.resume or args.overwrite):
            raise ValueError(f"{out} exists; pass --resume to continue it or --overwrite to replace it")
        if args.resume and not out.exists():
            raise ValueError(f"--resume: {out} does not exist yet (train without --resume first)")
        from .hosts.diffusers import DiffusersBackend
        from .train import Trainer

        pipe = _load_pipe(args)
        backend = DiffusersBackend(pipe)
        trainer = Trainer(backend, cfg, out, resume=args.resume, keep_state=args.keep_state)
    except _model_errors() as e:
        return _fail(e)
    from .checkpoint import MembraneFileError

    try:
        res = trainer.train()
    except (ValueError, MembraneFileError) as e:  # a --resume file of another model, settings the model cannot run
        return _fail(e)
    c = res.cost
    print(json.dumps({"output": str(out), "steps": res.steps, "interrupted": res.interrupted,
                      "seconds": round(res.seconds, 1), "final_loss": res.history[-1]["loss"] if res.history else None,
                      "cost": {k: c[k] for k in ("schedule", "ufe_per_iteration_steady", "seconds_per_iteration")},
                      "erasure": {k: res.erasure.get(k) for k in ("erased", "signal", "threshold", "message")}},
                     indent=2))
    print(res.erasure.get("message", ""), file=sys.stderr)  # "erased: …" or "not erased: … try …"
    if res.interrupted:
        print(f"interrupted: the membrane trained so far is saved in {out}; continue with --resume", file=sys.stderr)
        return 130
    return 0


# --- generate ---------------------------------------------------------------------------------------
def _check_size(pipe, width: int | None, height: int | None) -> None:
    factor = int(getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    for flag, v in (("--width", width), ("--height", height)):
        if v is not None and v % factor:
            raise CliError(f"{flag} {v}: not a multiple of {factor}, the model's latent factor "
                           f"(e.g. {max(factor, v // factor * factor)})")


def _prompt_membranes(prompts: list[str], items: list, folder: str | None) -> list[tuple[str, list]]:
    """Each prompt without its ``<spm:NAME[:WEIGHT]>`` tags, with the membranes it runs with: the ``--membrane``
    files at their weights, a tag's weight replacing a file's (its name is the file's stem) or adding a membrane
    from the ``--spm-dir`` folder (weight 1 without one), as in the WebUI.  :class:`CliError` for a malformed tag or
    a name found nowhere, before anything is generated."""
    from .library import Library, LibraryError
    from .tags import parse_tags, strip_tags

    names = [m.name for m, _ in items]
    if folder and not Path(folder).is_dir():
        raise CliError(f"--spm-dir {folder}: no such folder (give the folder the membranes are in, e.g. models/spm)")
    library = Library(folder, unknown_hint="") if folder else None  # scanned once, now: no "press refresh"
    if library is not None:
        library.refresh()
    plans = []
    for prompt in prompts:
        tags, problems = parse_tags(prompt)
        if problems:
            raise CliError(f"--prompt {prompt!r}: " + "; ".join(pr.message.replace(" ignored", "") for pr in problems))
        chosen = list(items)
        slot: dict[str, int] = {}  # a folder membrane's place in chosen (a later tag of the same name wins)
        for t in tags:
            weight = 1.0 if t.weight is None else t.weight
            hits = [i for i, n in enumerate(names) if n == t.name]
            if len(hits) > 1:
                raise CliError(f"{t.text}: {len(hits)} --membrane files are named {t.name!r}; rename one")
            if hits:
                chosen[hits[0]] = (items[hits[0]][0], weight)
            elif library is not None:
                try:
                    membrane = library.load(t.name)
                except LibraryError as e:
                    raise CliError(f"{t.text}: {e}") from None
                at = slot.setdefault(membrane.name, len(chosen))  # its listed name: "square" = "shapes/square"
                chosen[at:at + 1] = [(membrane, weight)]
            else:
                known = f" (given: {', '.join(sorted(set(names)))})" if names else ""
                raise CliError(f"{t.text}: no membrane of that name{known}; give its file with --membrane FILE or its "
                               "folder with --spm-dir DIR")
        # the tags' text never reaches the text encoder; a prompt without tags is passed on exactly as given
        plans.append((" ".join(strip_tags(prompt).split()) if tags else prompt, chosen))
    return plans


def _distinct_membranes(plans: list[tuple[str, list]]) -> list:
    """Every membrane the prompts of :func:`_prompt_membranes` use, once each, in order of first use."""
    return list({id(m): m for _, chosen in plans for m, _ in chosen}.values())


def _cmd_generate(args) -> int:
    _threads(args.threads)
    from .transport import check_metric

    try:
        check_metric(args.metric)  # before the model loads, with or without a membrane
    except ValueError as e:
        return _fail(f"--metric: {e}")
    try:
        items = _load_membranes(args.membrane)
        plans = _prompt_membranes(list(args.prompt), items, args.spm_dir)  # a bad tag fails before the model loads
        pipe = _load_pipe(args)
        _check_size(pipe, args.width, args.height)
    except _model_errors() as e:
        return _fail(e)
    import torch

    from .checkpoint import MembraneFileError
    from .hosts.diffusers import PipelineMembranes
    from .train.sampling import image_grid

    seeds = [args.seed + i for i in range(args.n)]
    images = []
    try:
        with PipelineMembranes(pipe, items, metric=args.metric, factor=args.factor, transport=not args.no_transport) as pm:
            # every prompt's membranes fit the model before any image is made (one check of each file)
            pm.stack.set_membranes([(m, 1.0) for m in _distinct_membranes(plans)])
            for p, chosen in plans:
                pm.stack.set_membranes(chosen)
                gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                out = pipe(prompt=[p] * len(seeds), negative_prompt=[args.negative] * len(seeds),
                           num_inference_steps=args.steps, guidance_scale=args.cfg, generator=gens,
                           height=args.height, width=args.width, output_type="pt")
                images.append(out.images.float().cpu())
    except (ValueError, MembraneFileError) as e:
        return _fail(e)
    grid = image_grid(torch.cat(images), len(plans))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    print(args.output)
    return 0


# --- demo -------------------------------------------------------------------------------------------
DEMO_CONTROLS = ["a red square on a white background", "a blue star", "a green heart on a gray background", "a triangle"]


class _Phases:
    """``[demo] phase…`` lines on stderr with each phase's time, and a total."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self.started = self.t0

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[demo] {msg}", file=sys.stderr, flush=True)

    def start(self, msg: str) -> None:
        self.started = time.perf_counter()
        self.say(f"{msg}…")

    def done(self, msg: str = "done") -> None:
        self.say(f"  {msg} ({time.perf_counter() - self.started:.1f} s)")

    def total(self) -> float:
        return time.perf_counter() - self.t0


def _generate_with_progress(harness, pipe, prompts, seeds, phases: _Phases, label: str) -> list:
    """Every (prompt, seed) in one batched call, as the toy harness batches; the pipeline's own bar shows step k/N."""
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    if not phases.quiet:
        pipe.set_progress_bar_config(disable=False, desc=f"[demo] {label}", file=sys.stderr, mininterval=1.0)
    try:
        return harness.generate(pipe, ps, ss)
    finally:
        pipe.set_progress_bar_config(disable=True)


def _cmd_demo(args) -> int:
    """Train a membrane on the shipped toy model, write a before/after grid, print erasure and preservation."""
    ph = _Phases(args.quiet)
    ph.start(f"loading the toy model {args.model!r} (torch, diffusers)")
    _threads(args.threads)
    import torch

    from . import toy
    from .toy import harness

    try:
        pipe = toy.load(args.model)
    except FileNotFoundError as e:
        return _fail(f"the demo needs the shipped toy model: {e}")
    ph.done()
    from .checkpoint import load_membrane
    from .hosts.diffusers import DiffusersBackend, PipelineMembranes
    from .train import TrainConfig, Trainer

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = args.target
    membrane_file = out_dir / f"{target}.safetensors"
    cfg = TrainConfig(targets=[target], iterations=args.iterations, seed=args.seed)
    if not args.skip_training or not membrane_file.exists():
        ph.start(f"training a membrane that erases {target!r} on the toy model ({cfg.iterations} steps)")
        res = Trainer(DiffusersBackend(pipe), cfg, membrane_file, progress_bar=not args.quiet).train()
        if res.interrupted:
            print(f"interrupted; partial membrane in {membrane_file}", file=sys.stderr)
            return 130
        ph.done(f"trained {res.steps} steps, saved {membrane_file}")
    else:
        ph.say(f"reusing {membrane_file} (--skip-training)")
    membrane = load_membrane(membrane_file)
    literal = [target, f"a red {target}", f"a blue {target} on a white background", f"a green {target} on a black background"]
    prompts = literal + DEMO_CONTROLS
    seeds = list(range(args.seeds))
    ph.start(f"generating before: {len(prompts)} prompts x {len(seeds)} seeds without the membrane")
    before = _generate_with_progress(harness, pipe, prompts, seeds, ph, "before")
    ph.done()
    ph.start(f"generating after: {len(prompts)} prompts x {len(seeds)} seeds with the membrane")
    with torch.no_grad(), PipelineMembranes(pipe, [(membrane, 1.0)]):
        after = _generate_with_progress(harness, pipe, prompts, seeds, ph, "after")
    ph.done()
    ph.start("writing the before/after grid")
    cols = []
    for i in range(len(prompts)):
        cols.extend(before[i * len(seeds):(i + 1) * len(seeds)] + after[i * len(seeds):(i + 1) * len(seeds)])
    grid_path = out_dir / f"{target}_before_after.png"
    harness.image_grid(cols, 2 * len(seeds), scale=3).save(grid_path)
    ph.done(str(grid_path))
    n_lit = len(literal) * len(seeds)
    psnr = harness.psnr(before[n_lit:], after[n_lit:])
    report: dict = {"membrane": str(membrane_file), "grid": str(grid_path),
                    "grid_layout": "rows: prompts (4 with the target, then 4 controls); columns: seeds without | with the membrane",
                    "control_psnr_db_median": float(torch.tensor(psnr).clamp(max=100).median())}
    ph.start(f"scoring {2 * len(before)} images with the toy scorer")
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
        ph.done()
    except (FileNotFoundError, OSError) as e:
        report["scorer"] = f"not available ({e}); only PSNR is reported"
        ph.done("scorer not available")
    report["seconds"] = round(ph.total(), 1)
    ph.say(f"finished in {report['seconds']} s")
    print(json.dumps(report, indent=2))
    return 0


# --- eval -------------------------------------------------------------------------------------------
_EVAL_ALIASES = {"base": "toy", "finetune": "toy-finetune"}  # the names `spm eval` accepted before the registry


def _toy_name(spec: str) -> str | None:
    from . import toy

    name = _EVAL_ALIASES.get(spec, spec)
    return name if toy.toy_model(name) is not None else None


def _eval_pipeline(spec: str, config: str | None):
    """A shipped toy model's name (``base``/``finetune`` too), a toy asset folder (``unet/`` …) or a diffusers model."""
    from . import toy

    name = _toy_name(spec)
    if name is not None:
        return toy.load(name)
    p = Path(spec)
    if p.is_dir() and not (p / "model_index.json").exists() and (p / "unet").is_dir():
        from .toy.evaluate import load_asset_folder

        return load_asset_folder(p)
    from .hosts.diffusers import load_pipeline

    return load_pipeline(spec, config=config, device="cpu")


def _finetune_of(spec: str) -> str | None:
    """The shipped fine-tune of ``spec``'s toy world (the world of the shapes models for a path)."""
    from . import toy

    name = _toy_name(spec)
    world = toy.MODELS[name].world if name else next(iter(toy.MODELS.values())).world
    return next((n for n, m in toy.MODELS.items() if m.world == world and m.which == "finetune"), None)


def _cmd_eval(args) -> int:
    """Erasure and preservation of membranes in the toy world (``spm/toy/evaluate.py``), as JSON."""
    _threads(args.threads)
    from .checkpoint import MembraneFileError
    from .toy import evaluate as ev

    finetune_name = _finetune_of(args.model) if args.transfer else None
    if args.transfer and finetune_name is None:
        return _fail(f"--transfer: the toy world of --model {args.model} ships no fine-tune")
    if args.transfer and _toy_name(args.model) == finetune_name:
        return _fail(f"--transfer evaluates on the shipped fine-tune as well; --model {args.model} already is it")
    try:
        items = _load_membranes(args.membrane)
        names = [m.name for m, _ in items]
        if args.target:
            if len(args.target) != len(items):
                return _fail(f"{len(args.target)} --target for {len(items)} --membrane: give one --target per --membrane, "
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
    except (CliError, ValueError, FileNotFoundError, MembraneFileError) as e:
        return _fail(e)
    suite = {k: getattr(args, k) for k in ("n_literal", "n_paraphrase", "n_per_other", "n_pairs", "n_mixed")
             if getattr(args, k) is not None}
    if args.suite_seed is not None:
        suite["seed"] = args.suite_seed
    say = None if args.quiet else (lambda msg: print(f"[eval] {msg}", file=sys.stderr))
    try:
        base = _eval_pipeline(args.model, args.config)
        world = ev.check_toy_pipeline(base, f"--model {args.model}")
        if args.transfer and _toy_name(args.model) is None:  # a path: the fine-tune of the world it belongs to
            from . import toy

            finetune_name = next((n for n, m in toy.MODELS.items() if m.world == world.name and m.which == "finetune"),
                                 finetune_name)
        finetune = _eval_pipeline(finetune_name, None) if finetune_name else None
        from .toy.scorer import load_scorer

        scorer = load_scorer(world=world)
    except FileNotFoundError as e:
        return _fail(f"the toy world's assets are missing ({e}); rebuild them with `python -m bench.toyworld build`")
    except (ValueError, OSError) as e:
        return _fail(e)
    from .toy import harness

    try:
        report = ev.evaluate(base, scorer, items, targets, finetune=finetune, metric=args.metric,
                             transport=not args.no_transport,
                             steps=harness.DEFAULT_STEPS if args.steps is None else args.steps,
                             cfg=harness.DEFAULT_CFG if args.cfg is None else args.cfg,
                             suite=suite, names=names, progress=say)
    except (ValueError, MembraneFileError) as e:  # NotToyModel, IncompatibleMembrane, bad settings
        return _fail(e)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(out)
    else:
        print(text)
    return 0


# --- bake -------------------------------------------------------------------------------------------
def _cmd_bake(args) -> int:
    from .bake import bake

    try:
        items = _load_membranes(args.membrane)
        if not items:
            raise CliError("--membrane: give at least one FILE[:weight] to bake in")
        out = bake(args.model, items, args.output, overwrite=args.overwrite,
                   progress=None if args.quiet else (lambda m: print(f"[bake] {m}", file=sys.stderr, flush=True)))
    except _model_errors() as e:
        return _fail(e)
    print(out)
    return 0


# --- parser -----------------------------------------------------------------------------------------
def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 100)


def build_parser() -> argparse.ArgumentParser:
    toy_help = _toy_help()
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="python -m spm", description="SPM concept-erasing membranes", epilog=toy_help, formatter_class=raw)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    explain_cli.add_parser(sub)
    i = sub.add_parser("info", help="print a membrane file's concepts, architecture, rank and modules as JSON")
    i.add_argument("files", nargs="+")
    i.set_defaults(func=_info_cmd)

    t = sub.add_parser("train", help="train a membrane that erases --target (diffusers host)", epilog=toy_help,
                       formatter_class=raw)
    _add_model_args(t)
    t.add_argument("--target", action="append",
                   help="concept to erase (repeat or comma-separate; for a toy model one of the concepts below); "
                        "required without --jobs")
    t.add_argument("-o", "--output", help="membrane file to write (.safetensors); required without --jobs")
    t.add_argument("--jobs", help="train many membranes from a YAML/JSON jobs file (see the README); under accelerate "
                                  "launch / torchrun the jobs are spread over the processes")
    t.add_argument("--summary", help="with --jobs: the status file to write (default: jobs.json beside the jobs file)")
    t.add_argument("--data-parallel", action="store_true",
                   help="with --jobs under several processes: train each membrane on all of them (gradients averaged)")
    t.add_argument("--preset", default="object", help="object, style or nudity (default: object)")
    from .train.config import CHOICES

    for flag, (field, typ, hlp) in _TRAIN_FLAGS.items():  # a wrong word is argparse's error, naming the flag
        t.add_argument(flag, type=typ, default=None, choices=CHOICES.get(field), help=f"{hlp} {_default_text(field)}")
    t.add_argument("--control", action="append", help="control prompt for the preview grids (repeatable)")
    t.add_argument("--dynamic-resolution", action="store_true", help="vary the training resolution")
    t.add_argument("--reference-schedule", action="store_true",
                   help="make x_t like the reference (re-denoise from noise every step; about 3x slower)")
    t.add_argument("--resume", action="store_true", help="continue from --output and its .trainstate")
    t.add_argument("--keep-state", action="store_true",
                   help="keep OUTPUT.trainstate after a finished run, to extend it later with --resume "
                        "(an interrupted run always keeps it)")
    t.add_argument("--neighbours", action=argparse.BooleanOptionalAction, default=None,
                   help="also erase (opt-in) the vocabulary words the membrane's transport opens for (trained synonyms; "
                        "`spm explain --vocabulary` lists them): one more UNet row pair per step "
                        f"{_default_text('neighbours')}")
    t.add_argument("--synonyms", choices=CHOICES["synonyms"], default=None,
                   help="model synonyms: the words the model itself draws as the target (measured on held-out noise "
                        "against random words). gate: the transport also opens the membrane for them; erase: that, "
                        f"and training erases them too; off: neither {_default_text('synonyms')}")
    t.add_argument("--contexts", type=int, default=None, metavar="N",
                   help="also erase the target inside N prompts of other words around it (--context-words) "
                        "(\"the car of\" against \"the of\"), and measure the erasure signal there too: two more "
                        "no-grad and one more grad UNet row per step; pairs whose words alone draw the target are "
                        "left out; a run draws at most --iterations of them; 0: off (the paper's objective) "
                        f"{_default_text('contexts')}")
    t.add_argument("--no-early-stop", action="store_true",
                   help="run all --iterations (default: stop once the erasure signal says erased; --iterations is the budget)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate images with membranes and Facilitated Transport (diffusers host)",
                       epilog=toy_help, formatter_class=raw)
    _add_model_args(g)
    g.add_argument("--membrane", action="append", help="FILE[:weight] (repeatable; weight default 1)")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt (repeatable: one grid row each); <spm:NAME> or <spm:NAME:WEIGHT> in it adds a membrane "
                        "for that prompt, or sets the weight of a --membrane file of that name (its file name without "
                        ".safetensors), as in the WebUI")
    g.add_argument("--spm-dir", help="membrane folder the prompts' <spm:NAME> tags are looked up in (as the WebUI's "
                                     "models/spm); --membrane files are found by name without it")
    g.add_argument("--negative", default="", help="negative prompt (default: none)")
    g.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    g.add_argument("-n", type=positive_int, default=1, help="images per prompt (seeds seed, seed+1, …; default: 1)")
    g.add_argument("--steps", type=positive_int, default=GENERATE_STEPS, help=f"sampling steps (default: {GENERATE_STEPS})")
    g.add_argument("--cfg", type=finite_float, default=GENERATE_CFG, help=f"guidance scale (default: {GENERATE_CFG})")
    g.add_argument("--width", type=positive_int, help="pixels, a multiple of the model's latent factor (default: the model's)")
    g.add_argument("--height", type=positive_int, help="pixels, a multiple of the model's latent factor (default: the model's)")
    g.add_argument("--metric", default=DEFAULT_METRIC, help=f"transport metric (default: {DEFAULT_METRIC})")
    g.add_argument("--factor", type=finite_float, default=1.0, help="facilitate factor (default: 1)")
    g.add_argument("--no-transport", action="store_true", help="apply membranes at their weight to every prompt")
    g.add_argument("-o", "--output", required=True, help="PNG grid to write")
    g.set_defaults(func=_cmd_generate)

    from . import toy

    d = sub.add_parser("demo", help="erase an object from the shipped toy model; before/after grid and numbers",
                       epilog=toy_help, formatter_class=raw)
    d.add_argument("--model", default="toy", choices=[n for n, m in toy.MODELS.items() if m.which == "base"],
                   help="the shipped toy model (default: toy)")
    d.add_argument("--target", default="circle", help="the concept to erase (default: circle)")
    d.add_argument("--iterations", type=positive_int, default=None,
                   help=f"training steps {_default_text('iterations').split(';')[0].rstrip(')')})")
    d.add_argument("--seeds", type=positive_int, default=4, help="seeds per prompt (default: 4)")
    d.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    d.add_argument("--skip-training", action="store_true", help="reuse the membrane in --out if present")
    d.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    d.set_defaults(func=_cmd_demo)

    e = sub.add_parser("eval", help="toy world: erasure and preservation of membranes, scored by the toy scorer (JSON)",
                       epilog=toy_help, formatter_class=raw)
    e.add_argument("--model", default="toy",
                   help="a shipped toy model by name (base and finetune are aliases of toy and toy-finetune), "
                        "a toy asset folder, or a diffusers folder of a toy model (default: toy)")
    e.add_argument("--config", help="for a single-file checkpoint: a diffusers folder with its configs")
    e.add_argument("--transfer", action="store_true", help="also evaluate the membranes on the shipped fine-tune")
    e.add_argument("--membrane", action="append", required=True, help="FILE[:weight] (repeatable: all act together)")
    e.add_argument("--target", action="append",
                   help="the toy objects a membrane erases (comma-separated), one --target per --membrane in the same "
                        "order (default: each file's concepts metadata)")
    e.add_argument("--metric", help=f"transport metric (default: {DEFAULT_METRIC})")
    e.add_argument("--no-transport", action="store_true", help="apply membranes at their weight to every prompt")
    e.add_argument("--steps", type=positive_int, help="DDIM steps (default: 25, the toy harness's)")
    e.add_argument("--cfg", type=finite_float, help="guidance scale (default: 7.5, the toy harness's)")
    e.add_argument("--n-literal", type=non_negative_int, help="literal prompts per target (default: 16)")
    e.add_argument("--n-paraphrase", type=non_negative_int, help="paraphrase prompts per target (default: 8)")
    e.add_argument("--n-per-other", type=non_negative_int, help="single-object prompts per non-target object (default: 3)")
    e.add_argument("--n-pairs", type=non_negative_int, help="two-object non-target prompts (default: 8)")
    e.add_argument("--n-mixed", type=non_negative_int, help="target + non-target prompts per target (default: 8)")
    e.add_argument("--suite-seed", type=int, help="seed of the prompt suite (default: 1234)")
    e.add_argument("-o", "--out", help="write the JSON here (default: print it)")
    e.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    e.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    e.set_defaults(func=_cmd_eval)

    b = sub.add_parser(
        "bake", formatter_class=raw, epilog=toy_help,
        help="merge membranes at fixed weights into a checkpoint (for deployments without the extension)",
        description=_wrap("Merge membranes into a copy of a checkpoint: W' = W + Σ weight·(alpha/rank)·up·down on every "
                    "membrane module, computed in fp32 and stored in the checkpoint's dtype. The input is never "
                    "modified. The baked model LOSES FACILITATED TRANSPORT: every prompt gets each membrane's full "
                    "weight, so unrelated prompts change too. Keep the membranes as files where the extension runs."))
    b.add_argument("--model", required=True,
                   help="a shipped toy model by name, a diffusers folder, or a single-file SD checkpoint in the WebUI's "
                        "(LDM) layout (.safetensors)")
    b.add_argument("--membrane", action="append", required=True, help="FILE[:weight] (repeatable; weight default 1)")
    b.add_argument("-o", "--output", required=True,
                   help="where to write: a folder for a diffusers or toy model, a .safetensors file for a single file")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=_cmd_bake)
    attack_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cmd", None) == "demo" and args.iterations is None:
        from .train.config import TrainConfig

        args.iterations = TrainConfig().iterations
    return args.func(args)
