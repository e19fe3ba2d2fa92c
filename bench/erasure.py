"""``python -m bench.erasure --json``: erasure and preservation at the CLI defaults, for every object of every toy world.

For each toy world (``--world toy`` and ``--world toy2``, default: every shipped base model, ``spm.toy.MODELS``) and
each of its object concepts (``spm.toy.concepts(world)``; ``--objects a,b`` restricts), it trains one membrane with
exactly the CLI defaults, ``TrainConfig(targets=[obj])`` (what ``python -m spm train --model toy --target obj``
trains: nothing else set; ``--set key=value`` departs from them for experiments and says so in the JSON), then
measures it with ``spm.toy.evaluate.evaluate`` (what ``python -m spm eval --model toy --membrane F`` prints:
default transport, the harness's fixed suite and seeds, the world's scorer) and records, per object:

* ``erasure`` / ``paraphrase_erasure`` = 1 − (target found after) / (target found before) on the literal and the
  paraphrase prompts (``null`` where the base model never drew the target);
* ``nontarget_identical``: the share of non-target images bit-identical with and without the membrane (1.0: all),
  with ``psnr_unrelated_db`` (median, identical = 100 dB) and ``nontarget_drop_pt`` (prompt-fidelity drop, points);
* ``training``: the trainer's own verdict (``erased`` and the measured ``signal``, :mod:`spm.train.signal`), the steps
  it used of its budget, seconds, and the adaptive anchor weight (median / max over the steps);

then ``summary`` (min / mean over the objects, and whether the issue's numbers hold: literal ≥ 0.95, paraphrase
≥ 0.90, non-target images bit-identical) and ``multi``: three of the sweep's membranes (each trained alone; by default
the world's first three objects, ``--multi a,b,c``) applied together, each target's erasure (goal ≥ 0.90).

The JSON is ``{"settings": ..., "worlds": {"toy": {...}, "toy2": {...}}}``, printed and written to
``bench/results/erasure.json``; each world's finished objects are also on disk as they complete
(``<out>/<world>/partial.json``).  ``--reuse`` reuses membranes trained by an earlier run with the same settings
(``<out>/<world>/<obj>.safetensors`` and its ``.train.json``); ``--parallel`` runs the worlds in parallel processes
(``--threads`` torch threads each).

``--metric M`` evaluates with another transport metric than the default (an experiment: the JSON's settings say
so); with ``--reuse`` it measures the same membranes under another metric.

``--transport-only`` trains and generates nothing: for the membranes of an earlier sweep in ``--out`` it reports what
Facilitated Transport gives each object's suite prompts (literal or paraphrase prompts below strength 1, non-target
prompts above 0, the calibration; ``bench/results/erasure_transport.json``), which explains the bit-identity and
paraphrase numbers without the scorer.

``--ablations`` also runs world 1's slower ablations (no Facilitated Transport, no Latent Anchoring, transfer to the
fine-tune, each transport metric, training cost against the reference schedule, the erasure-vs-iterations curve)
and writes them to ``bench/results/erasure_ablations.json`` (definitions below).

Ablation definitions (fractions in 0..1, drops in percentage points):

* ``erasure`` = 1 − (target found after) / (target found before), on the literal target prompts;
  ``paraphrase_erasure`` the same on prompts that name the target only through a paraphrase;
* ``nontarget_drop_pt`` = 100 × (prompt fidelity before − after) on the non-target prompts (the scorer finds
  every object the prompt asks for);
* ``psnr_unrelated_db`` = median same-seed PSNR between images with and without membranes on non-target prompts
  (identical images count as 100 dB);
* ``single``: one membrane (target ``circle``) with transport on (the library's default metric);
  ``no_la``: the same trained without Latent Anchoring; ``no_ft``: the single membrane with transport off;
  ``no_la_no_ft``: the no-LA membrane with transport off (compare with ``no_ft``: LA's effect where the
  membrane acts on everything); ``mixed_other_*``: the non-target object of prompts that also name the target
  (``a red circle and a blue square``), found before/after;
  ``multi``: three membranes at once; ``transfer``: the single membrane on the community fine-tune;
  ``transport.<metric>``: the single membrane with each transport metric;
  ``cost``: UNet-forward-equivalents and wall time per iteration of the default (pool) schedule and the
  reference schedule, measured in this run on the same model; ``ratio_to_reference`` is the UFE ratio.
* ``erasure_vs_iterations``: literal and paraphrase erasure of copies of the single membrane kept every
  ``--curve-every`` iterations;
* ``cost.equal_erasure``: a reference-schedule membrane trained ``--ref-iterations`` iterations, and the default
  schedule's erasure after as many (from the curve): the per-iteration cost ratio holds at equal erasure when the
  default's erasure there is at least the reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spm.train.config import PREDATING

RESULTS = Path(__file__).resolve().parent / "results"
SINGLE = "circle"
MULTI = ("circle", "heart", "arrow")  # the ablations' multi row (world 1: objects the base model draws reliably)
GOALS = {"erasure": 0.95, "paraphrase_erasure": 0.90, "nontarget_identical": 1.0, "multi_each": 0.90}  # issue #12


def base_worlds() -> list[str]:
    """The shipped toy models that are a world's base model (``toy``, ``toy2`` …), in registry order."""
    from spm import toy

    return [n for n, m in toy.MODELS.items() if m.which == "base"]


def parse_set(items: list[str] | None) -> dict:
    """``--set key=value`` → TrainConfig overrides (values parsed as JSON where they can be, else strings)."""
    from dataclasses import fields

    from spm.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)} - {"targets"}
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of the training settings "
                             f"({', '.join(sorted(names))})")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    if out:
        TrainConfig(targets=["x"], **out).validate()
    return out


def training_config(obj: str, overrides: dict | None = None):
    """The config the sweep trains ``obj`` with: the CLI defaults (``TrainConfig(targets=[obj])``) unless overridden."""
    from spm.train import TrainConfig

    return TrainConfig(targets=[obj], **(overrides or {}))


def _train_record(res, seconds: float) -> dict:
    la = sorted(h["la_weight"] for h in res.history) or [float("nan")]
    e = res.erasure
    return {"erased": bool(e.get("erased")), "signal": e.get("signal"), "per_level": e.get("per_level"),
            "message": e.get("message"), "stopped_early": bool(e.get("stopped_early")), "steps": int(res.steps),
            "budget": int(res.membrane.info.training.get("iterations", res.steps)), "seconds": round(seconds, 1),
            "la_weight_median": la[len(la) // 2], "la_weight_max": la[-1],
            "signal_checks": [(c["step"], round(c["signal"], 4)) for c in res.membrane.info.training.get("signal_history", [])]}


def train_object(pipe, obj: str, folder: Path, overrides: dict, reuse: bool, say) -> tuple[object, dict]:
    """Train (or, with ``reuse``, load) the sweep's membrane for ``obj``; returns it and its training record."""
    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import Trainer

    path = folder / f"{obj}.safetensors"
    side = folder / f"{obj}.train.json"
    cfg = training_config(obj, overrides)
    if reuse and path.exists() and side.exists():
        rec = {k: v for k, v in json.loads(side.read_text()).items() if not k.startswith("history")}
        m = load_membrane(path)
        # a setting the file does not record is one added since: the file was trained with its value of that time
        default, saved = {**training_config(obj).to_dict(), **PREDATING}, m.info.training or {}
        if all(saved.get(k, default[k]) == v for k, v in cfg.to_dict().items()):
            say(f"{obj}: reusing {path}")
            return m, {**rec, "reused": True}
        say(f"{obj}: {path.name} was trained with other settings; training again")
    say(f"{obj}: training ({cfg.iterations}-step budget)")
    t0 = time.time()
    res = Trainer(DiffusersBackend(pipe), cfg, path, progress_bar=False).train()
    rec = _train_record(res, time.time() - t0)
    steps = [[h["step"], h["erase"], h["anchor"], h["signal"], h["la_weight"]] for h in res.history]
    side.write_text(json.dumps({**rec, "history_columns": ["step", "erase", "anchor", "concept_mse", "la_weight"],
                                "history": steps}))
    say(f"{obj}: {rec['steps']} steps, {rec['seconds']:.0f} s: {'erased' if rec['erased'] else 'NOT erased'} "
        f"(signal {rec['signal']:.3f})")
    return res.membrane.cpu(), rec


def transport_strengths(pipe, membrane, world: str) -> dict:
    """What Facilitated Transport gives the membrane's suite prompts (``spm.explain``, the default metric, the file's
    calibration): a literal or paraphrase prompt below strength 1 is not fully erased by construction, a non-target
    prompt above 0 cannot stay bit-identical.  Explains the erasure numbers without a scorer."""
    from spm.explain import explain
    from spm.hosts.diffusers import pipeline_transport
    from spm.toy import harness

    tr = pipeline_transport(pipe)
    suite = harness.prompt_suite(membrane.concepts[0], world=world)
    out: dict = {"metric": tr.metric}
    cal = None
    for part, want in (("literal", 1.0), ("paraphrase", 1.0), ("nontarget", 0.0)):
        misses = []
        for c in suite[part]:
            ex = explain(tr, [membrane], c.prompt)
            m = ex["membranes"][0]
            cc = (m["concepts"] or [{}])[0]
            cal = cc.get("calibration") or cal
            if m["strength"] != want:
                misses.append({"prompt": c.prompt, "strength": m["strength"], "window": cc.get("window"),
                               "similarity": cc.get("similarity")})
        key = {"literal": "literal_below_1", "paraphrase": "paraphrase_below_1", "nontarget": "nontarget_above_0"}[part]
        out[key] = len(misses)
        out[f"{part}_prompts"] = len(suite[part])
        out[f"{part}_examples"] = misses[:4]
    if cal:
        out["calibration"] = {k: cal.get(k) for k in ("lo", "hi", "weak", "max_length", "source")}
    return out


def object_row(r: dict, train: dict) -> dict:
    """One object's row of the sweep from an ``evaluate`` report of its membrane alone."""
    lit = (r.get("literal_per_target") or [{}])[0]
    par = (r.get("paraphrase_per_target") or [{}])[0]
    return {"erasure": r.get("erasure"), "paraphrase_erasure": r.get("paraphrase_erasure"),
            "literal_found": [lit.get("found_before"), lit.get("found_after")],
            "paraphrase_found": [par.get("found_before"), par.get("found_after")],
            # images found after: [kept (the base model drew the target too), new (it had not)]
            "literal_found_after": [lit.get("kept"), lit.get("new")],
            "paraphrase_found_after": [par.get("kept"), par.get("new")],
            "images": r.get("images"),
            "nontarget_identical": r.get("nontarget_identical"), "psnr_unrelated_db": r.get("psnr_unrelated_db"),
            "nontarget_drop_pt": r.get("nontarget_drop_pt"), "mixed_erasure": r.get("mixed_erasure"),
            "mixed_found": [r.get("mixed_found_before"), r.get("mixed_found_after")],
            "mixed_found_after": [r.get("mixed_kept"), r.get("mixed_new")],
            "mixed_other_found": [r.get("mixed_other_found_before"), r.get("mixed_other_found_after")],
            "training": train}


def _stats(vals: list) -> dict:
    v = [x for x in vals if x is not None]
    return {"min": min(v) if v else None, "mean": float(np.mean(v)) if v else None, "undefined": len(vals) - len(v)}


def summarise(objects: dict, multi: dict | None) -> dict:
    """min / mean over the objects and whether the issue's numbers hold (``GOALS``); undefined values fail."""
    lit = [o["erasure"] for o in objects.values()]
    par = [o["paraphrase_erasure"] for o in objects.values()]
    ident = [o["nontarget_identical"] for o in objects.values()]
    s = {"objects": len(objects), "erasure": _stats(lit), "paraphrase_erasure": _stats(par),
         "nontarget_identical": _stats(ident),
         "trainer_erased": sum(1 for o in objects.values() if o["training"]["erased"]),
         "steps": _stats([o["training"]["steps"] for o in objects.values()]),
         "train_seconds": _stats([o["training"]["seconds"] for o in objects.values()])}

    def ok(vals: list, goal: float) -> bool:
        return bool(vals) and all(v is not None and v >= goal for v in vals)

    s["failing"] = {k: [n for n, o in objects.items() if o[k] is None or o[k] < GOALS[k]]
                    for k in ("erasure", "paraphrase_erasure", "nontarget_identical")}
    s["goals"] = {"erasure_ge_0.95": ok(lit, GOALS["erasure"]), "paraphrase_ge_0.90": ok(par, GOALS["paraphrase_erasure"]),
                  "nontarget_bit_identical": ok(ident, GOALS["nontarget_identical"])}
    if multi is not None:
        s["goals"]["multi_each_ge_0.90"] = multi.get("each_ge_0.90")
    s["goals"]["all"] = all(bool(v) for v in s["goals"].values())
    return s


def multi_row(pipe, scorer, gen, objs: list[str], mems: dict, metric: str | None = None,
              suite: dict | None = None) -> dict:
    from spm.toy import evaluate as ev

    r = ev.evaluate(pipe, scorer, [(mems[o], 1.0) for o in objs], [[o] for o in objs], each=False, metric=metric,
                    generations=gen, suite=suite)
    lit = {p["target"]: p["erasure"] for p in r.get("literal_per_target", [])}
    par = {p["target"]: p["erasure"] for p in r.get("paraphrase_per_target", [])}
    vals = [lit.get(o) for o in objs]
    return {"targets": objs, "erasure": lit, "paraphrase_erasure": par,
            # per target, the images found after: [kept (the base model drew the target too), new (it had not)]
            "literal_found_after": {p["target"]: [p.get("kept"), p.get("new")] for p in r.get("literal_per_target", [])},
            "paraphrase_found_after": {p["target"]: [p.get("kept"), p.get("new")]
                                       for p in r.get("paraphrase_per_target", [])},
            "min_erasure": min((v for v in vals if v is not None), default=None),
            "each_ge_0.90": all(v is not None and v >= GOALS["multi_each"] for v in vals),
            "nontarget_identical": r.get("nontarget_identical"), "psnr_unrelated_db": r.get("psnr_unrelated_db"),
            "nontarget_drop_pt": r.get("nontarget_drop_pt")}


def sweep_world(name: str, objects: list[str] | None, multi: list[str] | None, out: str, overrides: dict, reuse: bool,
                threads: int, quiet: bool, metric: str | None = None, suite_seed: int | None = None) -> dict:
    """The per-object sweep of one toy world (its base model ``name``) and its multi row; ``suite_seed``: another
    sample of the evaluation's prompts and seeds (default: the harness's)."""
    from spm import toy
    from spm.toy import evaluate as ev
    from spm.toy.scorer import load_scorer

    t0 = time.time()
    model = toy.MODELS[name]
    known = toy.concepts(model.world)
    objs = list(objects or known)
    bad = [o for o in objs + list(multi or []) if o not in known]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not objects of {name} (the {model.world} world: {', '.join(known)})")

    torch.set_num_threads(threads)

    def say(msg: str) -> None:
        if not quiet:
            print(f"[erasure {name}] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    pipe, scorer = toy.load(name), load_scorer(world=model.world)
    gen = ev.Generations()
    suite = None if suite_seed is None else {"seed": int(suite_seed)}
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    rep: dict = {"model": name, "world": model.world, "objects": {}}
    mems: dict = {}
    for obj in objs:
        m, rec = train_object(pipe, obj, folder, overrides, reuse, say)
        mems[obj] = m
        r = ev.evaluate(pipe, scorer, [(m, 1.0)], [[obj]], metric=metric, generations=gen, suite=suite)
        rep["objects"][obj] = object_row(r, rec)
        row = rep["objects"][obj]
        say(f"{obj}: erasure {row['erasure']}, paraphrase {row['paraphrase_erasure']}, "
            f"non-target identical {row['nontarget_identical']}")
        rep["seconds"] = round(time.time() - t0, 1)
        (folder / "partial.json").write_text(json.dumps(rep, indent=2))
    trio = list(multi or objs[:3])
    rep["multi"] = None
    if len(trio) >= 2:
        for o in trio:
            if o not in mems:
                mems[o] = train_object(pipe, o, folder, overrides, True, say)[0]
        say(f"multi: {', '.join(trio)} together")
        rep["multi"] = multi_row(pipe, scorer, gen, trio, mems, metric, suite)
    rep["summary"] = summarise(rep["objects"], rep["multi"])
    rep["generated"] = dict(gen.generated)
    rep["seconds"] = round(time.time() - t0, 1)
    (folder / "partial.json").write_text(json.dumps(rep, indent=2))
    return rep


def transport_report(args) -> dict:
    """``--transport-only``: for the membranes of an earlier sweep in ``--out`` (nothing trained or generated), what
    Facilitated Transport gives each object's suite prompts (:func:`transport_strengths`)."""
    from spm import toy
    from spm.checkpoint import load_membrane

    torch.set_num_threads(args.threads)
    report: dict = {"what": "transport strengths of the sweep's suites (bench.erasure --transport-only)", "worlds": {}}
    for name in args.world or base_worlds():
        model = toy.MODELS[name]
        objs = [o.strip() for o in args.objects.split(",") if o.strip()] if args.objects else list(toy.concepts(model.world))
        pipe = toy.load(name)
        rows = {}
        for obj in objs:
            path = Path(args.out) / name / f"{obj}.safetensors"
            if not path.exists():
                raise FileNotFoundError(f"{path} (run the sweep first, or pass its --out)")
            rows[obj] = transport_strengths(pipe, load_membrane(path), model.world)
        report["worlds"][name] = {"world": model.world, "objects": rows,
                                  **{k: {n: r[k] for n, r in rows.items() if r[k]}
                                     for k in ("literal_below_1", "paraphrase_below_1", "nontarget_above_0")}}
    return report


def settings(args, overrides: dict) -> dict:
    from spm.toy import evaluate as ev
    from spm.toy import harness
    from spm.train import TrainConfig
    from spm.transport import DEFAULT_METRIC

    cfg = TrainConfig(targets=["<object>"], **overrides).to_dict()
    cfg.pop("targets")
    return {"training": cfg, "cli_defaults": not overrides and not args.metric, "overrides": overrides,
            "cli_equivalent": "python -m spm train --model WORLD --target OBJECT -o OBJECT.safetensors"
                              + "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
                              + "; python -m spm eval --model WORLD --membrane OBJECT.safetensors"
                              + (f" --metric {args.metric}" if args.metric else ""),
            "metric": args.metric or DEFAULT_METRIC, "default_metric": not args.metric, "steps": harness.DEFAULT_STEPS, "cfg": harness.DEFAULT_CFG,
            "suite": {**ev.SUITE_DEFAULTS, **({} if getattr(args, "suite_seed", None) is None
                                              else {"seed": args.suite_seed})},
            "goals": GOALS, "threads": args.threads, "parallel": bool(args.parallel)}


def run(args) -> dict:
    t0 = time.time()
    overrides = parse_set(args.set)
    worlds = args.world or base_worlds()
    objects = [o.strip() for o in args.objects.split(",") if o.strip()] if args.objects else None
    multi = [o.strip() for o in args.multi.split(",") if o.strip()] if args.multi else None
    report: dict = {"settings": settings(args, overrides), "worlds": {}}
    jobs = [(w, objects, multi, args.out, overrides, args.reuse, args.threads, args.quiet, args.metric, args.suite_seed)
            for w in worlds]
    if args.parallel and len(worlds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from bench.erasure import sweep_world as fn  # by its module's name: spawned workers import it

        with ProcessPoolExecutor(len(worlds), mp_context=mp.get_context("spawn")) as pool:
            futs = {w: pool.submit(fn, *job) for w, job in zip(worlds, jobs)}
            for w, f in futs.items():
                report["worlds"][w] = f.result()
    else:
        for w, job in zip(worlds, jobs):
            report["worlds"][w] = sweep_world(*job)
    report["goals_met_everywhere"] = all(r["summary"]["goals"]["all"] for r in report["worlds"].values())
    report["ablations"] = "bench/results/erasure_ablations.json (python -m bench.erasure --ablations)"
    report["seconds"] = round(time.time() - t0, 1)
    return report


# ----------------------------------------------------------------------------------------------- world-1 ablations
def _median_psnr(a, b) -> float:
    from spm.toy import harness

    p = np.minimum(harness.psnr(a, b), 100.0)
    return float(np.median(p))


class Bench:
    def __init__(self, iterations: int | None, lr: float | None, out: Path, reuse: bool, quiet: bool):
        from spm.toy.model import load_toy_pipeline
        from spm.toy.scorer import load_scorer

        self.base = load_toy_pipeline("base")
        self.ft = load_toy_pipeline("finetune")
        self.scorer = load_scorer()
        self.iterations, self.lr, self.out, self.reuse, self.quiet = iterations, lr, out, reuse, quiet
        self.cache: dict = {}
        out.mkdir(parents=True, exist_ok=True)

    def config(self, targets, **kw):
        from spm.train import TrainConfig

        over = dict(kw)
        if self.iterations is not None:
            over.setdefault("iterations", self.iterations)
        if self.lr is not None:
            over.setdefault("lr", self.lr)
        return TrainConfig(targets=list(targets), **over)

    def train(self, key: str, targets, keep_every: int = 0, **kw):
        """Train (or, with ``--reuse``, load) a membrane. ``keep_every`` > 0 also keeps a copy of the membrane
        every that many iterations as ``{key}.step{N}.safetensors`` (for the erasure-vs-iterations curve)."""
        import shutil

        from spm.checkpoint import load_membrane
        from spm.hosts.diffusers import DiffusersBackend
        from spm.train import Trainer

        path = self.out / f"{key}.safetensors"
        cfg = self.config(targets, **kw)
        steps = [k for k in range(keep_every, cfg.iterations, keep_every)] if keep_every else []
        kept = [self.out / f"{key}.step{k}.safetensors" for k in steps]
        if self.reuse and path.exists() and all(k.exists() for k in kept):
            return load_membrane(path)
        if keep_every:
            cfg.save_every = keep_every
        if not self.quiet:
            print(f"[bench] training {key}: {cfg.targets} ({cfg.iterations} steps, {cfg.schedule}, la {cfg.la_mode})",
                  file=sys.stderr)

        def keep(progress) -> None:
            if keep_every and progress.step % keep_every == 0 and progress.step < cfg.iterations:
                shutil.copyfile(path, self.out / f"{key}.step{progress.step}.safetensors")

        res = Trainer(DiffusersBackend(self.base), cfg, path, progress_bar=not self.quiet, callback=keep).train()
        return res.membrane.cpu()

    def checkpoints(self, key: str) -> list[tuple[int, object]]:
        """``(iterations, membrane)`` for the copies kept by :meth:`train` and the final membrane."""
        from spm.checkpoint import load_membrane

        out = []
        for f in self.out.glob(f"{key}.step*.safetensors"):
            out.append((int(f.name[len(key) + 5:-len(".safetensors")]), load_membrane(f)))
        final = load_membrane(self.out / f"{key}.safetensors")
        out.append((int(final.info.training.get("steps_done", self.config([SINGLE]).iterations)), final))
        return sorted(out, key=lambda t: t[0])

    def literal_erasure(self, targets, membranes, schedule_parts=("literal", "paraphrase")) -> dict:
        """Only the target-prompt numbers of :meth:`evaluate` (cheap: no non-target generations)."""
        from spm.toy import harness

        suite = harness.prompt_suite(list(targets) if len(targets) > 1 else targets[0])
        res = {}
        for part in schedule_parts:
            cases = suite[part]
            sb = harness.score_images(self.scorer, self.generate(self.base, cases))
            sa = harness.score_images(self.scorer, self.generate(self.base, cases, membranes))
            fb = harness.target_found_rate(sb, list(targets))
            fa = harness.target_found_rate(sa, list(targets))
            res["erasure" if part == "literal" else "paraphrase_erasure"] = (1 - fa / fb) if fb > 0 else None
        return res

    def generate(self, pipe, cases, membranes=(), metric=None, transport=True):
        from spm.hosts.diffusers import PipelineMembranes
        from spm.toy import harness

        key = (id(pipe), tuple(c.prompt for c in cases), tuple(c.seed for c in cases))
        if not membranes and key in self.cache:
            return self.cache[key]
        ctx = None
        if membranes:
            kw = {"metric": metric} if metric else {}
            ctx = PipelineMembranes(pipe, [(m, 1.0) for m in membranes], transport=transport, **kw)
        imgs = harness.generate(pipe, [c.prompt for c in cases], [c.seed for c in cases], context=ctx)
        if not membranes:
            self.cache[key] = imgs
        return imgs

    def evaluate(self, targets, membranes, pipe=None, metric=None, transport=True) -> dict:
        from spm.toy import harness

        pipe = pipe or self.base
        suite = harness.prompt_suite(list(targets) if len(targets) > 1 else targets[0])
        res: dict = {}
        for part in ("literal", "paraphrase", "nontarget", "mixed"):
            cases = suite[part]
            before = self.generate(pipe, cases)
            after = self.generate(pipe, cases, membranes, metric, transport)
            sb, sa = harness.score_images(self.scorer, before), harness.score_images(self.scorer, after)
            if part in ("literal", "paraphrase"):
                per = []
                for t in targets:
                    idx = [i for i, c in enumerate(cases) if t in c.objects]
                    if not idx:
                        continue
                    fb = harness.target_found_rate({k: v[idx] for k, v in sb.items()}, [t])
                    fa = harness.target_found_rate({k: v[idx] for k, v in sa.items()}, [t])
                    per.append({"target": t, "found_before": fb, "found_after": fa,
                                "erasure": (1 - fa / fb) if fb > 0 else float("nan")})
                name = "erasure" if part == "literal" else "paraphrase_erasure"
                vals = [p["erasure"] for p in per if p["erasure"] == p["erasure"]]
                res[name] = float(np.mean(vals)) if vals else None
                res[f"{part}_per_target"] = per
                if len(targets) > 1 and part == "literal":
                    res["min_erasure"] = float(min(p["erasure"] for p in per))
                res[f"{part}_images"] = len(cases)
            elif part == "mixed":  # a target and a non-target in one prompt: the non-target should survive
                oth = [next(o for o in c.objects if o not in targets) for c in cases]
                res["mixed_other_found_before"] = float(harness.found(sb, oth).mean())
                res["mixed_other_found_after"] = float(harness.found(sa, oth).mean())
                res["mixed_other_drop_pt"] = 100.0 * (res["mixed_other_found_before"] - res["mixed_other_found_after"])
            else:
                fb, fa = harness.found_rate(sb, cases), harness.found_rate(sa, cases)
                res["nontarget_fidelity_before"], res["nontarget_fidelity_after"] = fb, fa
                res["nontarget_drop_pt"] = 100.0 * (fb - fa)
                res["psnr_unrelated_db"] = _median_psnr(before, after)
        return res

    def cost(self, iterations: int = 20) -> dict:
        from spm.hosts.diffusers import DiffusersBackend
        from spm.train import Trainer

        out = {}
        for schedule in ("pool", "reference"):
            cfg = self.config([SINGLE], schedule=schedule, iterations=iterations)
            res = Trainer(DiffusersBackend(self.base), cfg, progress_bar=False).train()
            c = res.cost
            out[schedule] = {"ufe_per_iteration": c["ufe_per_iteration_steady"], "setup_ufe": c["setup_ufe"],
                             "seconds_per_iteration": c["seconds_per_iteration"], "unet_calls": c["calls"],
                             "iterations_measured": iterations}
        out["ratio_to_reference"] = out["pool"]["ufe_per_iteration"] / out["reference"]["ufe_per_iteration"]
        out["wall_ratio_to_reference"] = out["pool"]["seconds_per_iteration"] / out["reference"]["seconds_per_iteration"]
        out["definition"] = ("UFE: every UNet row evaluated counts 1, every back-propagated row 1 more; pool excludes its "
                             "one-time fill (setup_ufe); reference k is uniform in 1..S-1 so its mean is estimated")
        return out



def run_ablations(args) -> dict:
    """The world-1 ablations of the committed run (``--ablations``; bench/results/erasure_ablations.json)."""
    from spm.transport import DEFAULT_METRIC, METRICS

    t0 = time.time()
    torch.set_num_threads(args.threads)
    b = Bench(args.iterations, args.lr, Path(args.out) / "ablations", args.reuse, args.quiet)
    cfg = b.config([SINGLE])
    report: dict = {"settings": {"iterations": cfg.iterations, "lr": cfg.lr, "la_mode": cfg.la_mode,
                                 "la_budget": cfg.la_budget, "default_metric": DEFAULT_METRIC, "threads": args.threads}}

    def partial() -> None:  # every finished part is on disk, even if the run is cut short
        report["seconds"] = time.time() - t0
        RESULTS.mkdir(parents=True, exist_ok=True)
        (b.out / "partial.json").write_text(json.dumps(report, indent=2))

    single = b.train("single_circle", [SINGLE], keep_every=args.curve_every)
    report["single"] = b.evaluate([SINGLE], [single])
    partial()
    report["erasure_vs_iterations"] = [{"iterations": k, **b.literal_erasure([SINGLE], [m])}
                                       for k, m in b.checkpoints("single_circle")]
    partial()
    report["no_ft"] = b.evaluate([SINGLE], [single], transport=False)
    partial()
    report["cost"] = b.cost(args.cost_iterations)
    if args.ref_iterations:
        # "at equal erasure": the reference-faithful schedule trained as long as a point of the default's curve
        ref = b.train("reference_circle", [SINGLE], schedule="reference", iterations=args.ref_iterations)
        pool_at = {c["iterations"]: c for c in report["erasure_vs_iterations"]}.get(args.ref_iterations)
        report["cost"]["equal_erasure"] = {
            "iterations": args.ref_iterations,
            "reference": b.literal_erasure([SINGLE], [ref]),
            "pool": {k: v for k, v in (pool_at or {}).items() if k != "iterations"} or None,
        }
    partial()
    no_la = b.train("no_la_circle", [SINGLE], la_mode="off")
    report["no_la"] = b.evaluate([SINGLE], [no_la])
    # with transport on, an unrelated prompt never gets the membrane at all, so Latent Anchoring's effect shows
    # where the membrane is on: the mixed prompts, and every prompt with transport off
    report["no_la_no_ft"] = b.evaluate([SINGLE], [no_la], transport=False)
    partial()
    report["transfer"] = b.evaluate([SINGLE], [single], pipe=b.ft)
    partial()
    report["transport"] = {}
    for metric in METRICS:
        if metric == "off":
            continue
        r = b.evaluate([SINGLE], [single], metric=metric)
        report["transport"][metric] = {"erasure": r["erasure"], "paraphrase_erasure": r["paraphrase_erasure"],
                                       "psnr_unrelated_db": r["psnr_unrelated_db"], "nontarget_drop_pt": r["nontarget_drop_pt"]}
        partial()
    if not args.skip_multi:
        mems = [single] + [b.train(f"single_{t}", [t]) for t in MULTI if t != SINGLE]
        report["multi"] = b.evaluate(list(MULTI), mems)
    report["seconds"] = time.time() - t0
    return report


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_table(report: dict) -> str:
    """The README's side-by-side table of a sweep report: one row per object index, one column group per world."""
    worlds = list(report["worlds"].items())
    head = " | ".join(f"{w} object | literal | paraphrase | non-target identical | trainer (signal, steps)" for w, _ in worlds)
    lines = [f"| {head} |", "|" + " --- |" * (5 * len(worlds))]
    rows = max(len(r["objects"]) for _, r in worlds)
    for i in range(rows):
        cells = []
        for _, r in worlds:
            items = list(r["objects"].items())
            if i >= len(items):
                cells += [""] * 5
                continue
            name, o = items[i]
            t = o["training"]
            verdict = f"{'erased' if t['erased'] else 'not erased'} ({_f(t['signal'])}, {t['steps']}/{t['budget']})"
            cells += [name, _f(o["erasure"]), _f(o["paraphrase_erasure"]), _f(o["nontarget_identical"]), verdict]
        lines.append("| " + " | ".join(cells) + " |")
    cells = []
    for _, r in worlds:
        s = r["summary"]
        cells += ["**min** (mean)", f"**{_f(s['erasure']['min'])}** ({_f(s['erasure']['mean'])})",
                  f"**{_f(s['paraphrase_erasure']['min'])}** ({_f(s['paraphrase_erasure']['mean'])})",
                  f"**{_f(s['nontarget_identical']['min'])}**", f"{s['trainer_erased']} of {s['objects']} erased"]
    lines.append("| " + " | ".join(cells) + " |")
    cells = []
    for _, r in worlds:
        m = r.get("multi")
        if not m:
            cells += [""] * 5
            continue
        each = ", ".join(_f(m["erasure"].get(t)) for t in m["targets"])
        par = ", ".join(_f(m["paraphrase_erasure"].get(t)) for t in m["targets"])
        cells += [f"{len(m['targets'])} together: {', '.join(m['targets'])}", f"each {each}", f"each {par}",
                  _f(m["nontarget_identical"]), ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_worlds(names: list[str] | None) -> None:
    known = base_worlds()
    bad = [n for n in names or [] if n not in known]
    if bad:
        raise ValueError(f"--world {', '.join(bad)}: not a shipped base toy model; choose from {', '.join(known)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.erasure", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--world", action="append", help="a toy world by its base model's name (repeatable; default: all: "
                   "toy, toy2)")
    p.add_argument("--objects", help="comma-separated objects to sweep (default: every concept of each world)")
    p.add_argument("--multi", help="comma-separated objects for the multi row (default: the first three swept)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="depart from the CLI defaults (a TrainConfig field; repeatable; recorded in the JSON)")
    p.add_argument("--parallel", action="store_true", help="one process per world")
    p.add_argument("--threads", type=int, default=2, help="torch threads (per process with --parallel)")
    p.add_argument("--reuse", action="store_true", help="reuse membranes already trained in --out with the same settings")
    p.add_argument("--metric", default=None,
                   help="evaluate with this transport metric instead of the default (an experiment; the JSON says so)")
    p.add_argument("--suite-seed", type=int, default=None,
                   help="seed of the evaluation's prompt suite: another sample of prompts and seeds (default: the "
                        "harness's, 1234; recorded in the JSON)")
    p.add_argument("--out", default=str(RESULTS / "erasure_membranes"), help="where the trained membranes go")
    p.add_argument("--result", default=None, help="the JSON file (default: bench/results/erasure.json; "
                   "erasure_ablations.json with --ablations-only)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--transport-only", action="store_true",
                   help="only report what transport gives each object's suite prompts, for the membranes of an earlier "
                        "sweep in --out (bench/results/erasure_transport.json)")
    a = p.add_argument_group("world-1 ablations (--ablations: bench/results/erasure_ablations.json)")
    a.add_argument("--ablations", action="store_true", help="also run the world-1 ablations")
    a.add_argument("--ablations-only", action="store_true", help="run only the world-1 ablations")
    a.add_argument("--iterations", type=int, default=None, help="ablations: override the default training length")
    a.add_argument("--lr", type=float, default=None, help="ablations: override the default learning rate")
    a.add_argument("--cost-iterations", type=int, default=20)
    a.add_argument("--curve-every", type=int, default=100, help="ablations: keep the single membrane every N iterations")
    a.add_argument("--ref-iterations", type=int, default=200,
                   help="ablations: train a reference-schedule membrane this long and compare its erasure with the "
                        "default schedule's at the same iteration count (0: skip)")
    a.add_argument("--skip-multi", action="store_true", help="ablations: skip their multi row")
    p.add_argument("--table", nargs="?", const=str(RESULTS / "erasure.json"), metavar="JSON",
                   help="only print the README's markdown table of an earlier run (default: bench/results/erasure.json)")
    args = p.parse_args(argv)
    if args.table:
        try:
            print(markdown_table(json.loads(Path(args.table).read_text())))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: --table {args.table}: not a sweep report ({e})", file=sys.stderr)
            return 2
        return 0
    try:
        check_worlds(args.world)
        parse_set(args.set)
        if args.metric is not None:
            from spm.transport import METRICS

            if args.metric not in METRICS:
                raise ValueError(f"--metric {args.metric!r}: choose one of {', '.join(sorted(METRICS))}")
        if args.transport_only:
            report = transport_report(args)
            out = Path(args.result) if args.result else RESULTS / "erasure_transport.json"
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report, indent=None if args.json else 2))
            return 0
        report = None
        if not args.ablations_only:
            report = run(args)
            out = Path(args.result) if args.result else RESULTS / "erasure.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        if args.ablations or args.ablations_only:
            torch.set_num_threads(args.threads)
            abl = run_ablations(args)
            out = Path(args.result) if (args.result and args.ablations_only) else RESULTS / "erasure_ablations.json"
            out.write_text(json.dumps(abl, indent=2) + "\n")
            report = abl if report is None else report
    except FileNotFoundError as e:
        print(f"error: the toy world's assets are missing: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
