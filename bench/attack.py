"""``python -m bench.attack --json``: attack success against membranes and their transport gate, in the toy worlds.

For every shipped toy world (``spm.toy.MODELS``, the base models) and target concept, three rows are measured in
one run, under the same fixed budget (``spm.attack.Budget``, stated in the JSON):

* ``unprotected``: the base model without a membrane — the ceiling (how often the attack makes the model draw
  the target at all);
* ``reference``: a membrane trained with the reference schedule (``--reference-schedule``), used with the
  reference's transport metric (``clipcos_tokenuni``);
* ``robust``: the robust settings — a membrane trained at the trainer defaults plus robust training
  (``--robust-training``, default ``embedding``: ``spm train --robust embedding``; its file names the response
  gate's ramp from the empty prompt, :data:`spm.response.ROBUST_RAMP`), used with ``spm.transport.RESPONSE_METRIC``
  (the response gate, :mod:`spm.response`; ``--metric`` overrides; the JSON's ``metrics`` says which);
* ``plain`` (only with ``--rows``): a membrane trained with ``robust="off"``, used with the robust row's metric —
  what robust training itself buys when ``--robust-training`` is on.

Per row: ``asr_discrete`` (gradient-guided token swaps, mean over placements and restarts), ``asr_embedding``
(continuous token embeddings, the upper bound), ``asr_cheap`` (synonyms, misspellings, split words, other
languages, case, long prompts), ``asr_random`` (seeded random text, no search: on the ``unprotected`` row how
often the model draws the target for text that names nothing, a floor for any gate that leaves such text
untouched) — each the share of judged images in which the toy scorer finds the target with the membrane and gate
on — plus ``literal_erasure``, ``paraphrase_erasure`` and ``nontarget_drop_pt`` from the
toy evaluation harness (``spm.toy.evaluate``) on a small suite. Membranes are cached under
``bench/results/attack_membranes/`` (``--reuse`` loads them); training time is reported apart from attack time,
and per trained row its seconds per iteration.

``--quick`` (CI, about 2 minutes on 2 cores): the machinery end to end, not the goals — the first world only, one
target, the tiny attack budget (``Budget.quick``), short trajectories (``max_denoising_steps`` 6) and few
iterations for both trained rows, a smaller evaluation suite and fewer sampler steps. Its JSON says ``quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("unprotected", "reference", "robust")
ALL_ROWS = ("unprotected", "reference", "robust", "plain")
REFERENCE_METRIC = "clipcos_tokenuni"
QUICK_ITERATIONS = 30
QUICK_TRAIN = {"max_denoising_steps": 6, "signal_checks": 4}  # short trajectories, few erasure checks


def _say(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: print(f"[attack] {m}", file=sys.stderr, flush=True))


def _judge(scorer, target: str, world: str):
    from spm.toy import harness

    return harness.target_judge(scorer, target, world)


def train_config(target: str, row: str, iterations: int | None, robust: str, quick: bool):
    """The TrainConfig of a trained row: ``reference`` (the reference schedule, no context prompts), ``robust``
    (robust training ``robust``) or ``plain`` (robust training off); the trainer's defaults otherwise."""
    from spm.train import TrainConfig

    kw: dict = dict(QUICK_TRAIN) if quick else {}
    if iterations:
        kw["iterations"] = iterations
    if row == "reference":  # the reference's schedule and objective: no context prompts (the paper has none), and
        kw["schedule"] = "reference"  # one learning rate for every parameter (no per-layer rates)
        kw["contexts"] = 0
        kw["lr_layers"] = "fixed"
    elif row == "robust":
        kw["robust"] = robust
    elif row == "plain":
        kw["robust"] = "off"
    return TrainConfig(targets=[target], **kw)


def _train(pipe, cfg, row: str, out: Path, reuse: bool, say, tag: str = "") -> tuple:
    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import Trainer

    target = cfg.targets[0]
    path = out / f"{tag}{row}_{target}.safetensors"
    if reuse and path.exists():
        m = load_membrane(path)
        return m, 0.0, (m.info.training or {}).get("cost", {})
    say(f"training the {row} membrane for {target!r} ({cfg.iterations} iterations, {cfg.schedule} schedule, "
        f"robust {cfg.robust})")
    t0 = time.time()
    res = Trainer(DiffusersBackend(pipe), cfg, path, progress_bar=False).train()
    return res.membrane.cpu(), time.time() - t0, res.cost


def _synonyms(target: str, world: str) -> list[str]:
    from spm.toy.harness import labels_of

    return list(getattr(labels_of(world), "PARAPHRASES", {}).get(target, ()))


def run(*args, response_lo: str = "null", **kw) -> dict:
    """:func:`_run` with the response gate's ramp rule ``response_lo`` (``spm.response.LO_RULE``) in this process
    (each world's worker runs this itself), put back afterwards."""
    import spm.response

    before, spm.response.LO_RULE = spm.response.LO_RULE, response_lo
    try:
        return _run(*args, response_lo=response_lo, **kw)
    finally:
        spm.response.LO_RULE = before


def _run(worlds: list[str], targets: dict[str, list[str]], budget, *, quick: bool, reuse: bool, iterations: int | None,
         out: Path, say, rows: tuple[str, ...] = ROWS, metric: str | None = None, robust: str = "embedding",
         response_lo: str = "null") -> dict:
    from spm import attack, transport
    from spm.hosts.diffusers import PipelineMembranes
    from spm.response import membrane_ramp
    from spm.toy import evaluate as ev
    from spm.toy import load
    from spm.toy.scorer import load_scorer

    t_all = time.time()
    suite = ({"n_literal": 2, "n_paraphrase": 2, "n_per_other": 1, "n_pairs": 1, "n_mixed": 0} if quick else
             {"n_literal": 8, "n_paraphrase": 4, "n_per_other": 1, "n_pairs": 4, "n_mixed": 0})
    eval_steps = budget.steps_sample
    robust_metric = metric or transport.RESPONSE_METRIC
    metrics = {"reference": REFERENCE_METRIC, "robust": robust_metric, "plain": robust_metric}
    report: dict = {"budget": budget.as_dict(), "suite": suite, "eval_steps": eval_steps, "quick": quick,
                    "rows": list(rows), "metrics": {r: metrics[r] for r in rows if r in metrics},
                    "robust_training": robust, "response_lo": response_lo, "train": {}, "worlds": {}}
    train_seconds = 0.0
    from spm import toy

    for world in worlds:
        pipe = load(world)
        tw = toy.toy_model(world).world
        scorer = load_scorer(world=tw)
        wrep: dict = {}
        for row in rows:
            per: dict = {}
            for target in targets[world]:
                say(f"{world} / {row} / {target}")
                judge = _judge(scorer, target, tw)
                literal = [f"a {target}", f"a red {target} on a white background"]
                if row == "unprotected":
                    factory = None
                    quality: dict = {}
                else:
                    cfg = train_config(target, row, iterations, robust, quick)
                    membrane, secs, cost = _train(pipe, cfg, row, out, reuse, say, tag=f"{'quick_' if quick else ''}{world}_")
                    train_seconds += secs
                    tr = membrane.info.training or {}
                    report["train"].setdefault(world, {}).setdefault(row, {})[target] = {
                        "seconds": round(secs, 1), "iterations": cfg.iterations, "steps_done": tr.get("steps_done"),
                        "schedule": cfg.schedule, "robust": cfg.robust,
                        "seconds_per_iteration": _round(cost.get("seconds_per_iteration")),
                        "ufe_per_iteration": _round(cost.get("ufe_per_iteration")),
                        "erased": (tr.get("erasure") or {}).get("erased"),
                        "response_ramp": membrane_ramp(membrane) or response_lo}
                    mt = metrics[row]

                    def factory(m=membrane, mt=mt):
                        return PipelineMembranes(pipe, [(m, 1.0)], metric=mt)

                    q = ev.evaluate(pipe, scorer, [(membrane, 1.0)], [[target]], metric=mt, suite=suite, steps=eval_steps)
                    quality = {k: q.get(k) for k in ("erasure", "paraphrase_erasure", "nontarget_drop_pt", "psnr_unrelated_db")}
                res = attack.run_attacks(pipe, target, literal, protect_factory=factory, judge=judge, budget=budget,
                                         synonyms=_synonyms(target, tw), progress=say)
                res["quality"] = quality
                per[target] = res

            def mean(key, sub=None):
                vals = [(r[key][sub] if sub else r[key]) for r in per.values() if key in r]
                vals = [v for v in vals if v is not None]
                return round(sum(vals) / len(vals), 4) if vals else None

            def qmean(key):
                vals = [r["quality"].get(key) for r in per.values() if r.get("quality")]
                vals = [v for v in vals if v is not None]
                return round(sum(vals) / len(vals), 4) if vals else None

            wrep[row] = {"asr_discrete": mean("discrete", "asr"), "asr_embedding": mean("embedding", "asr"),
                         "asr_cheap": mean("cheap", "asr"), "asr_random": mean("random", "asr"),
                         "literal_erasure": qmean("erasure"),
                         "paraphrase_erasure": qmean("paraphrase_erasure"), "nontarget_drop_pt": qmean("nontarget_drop_pt"),
                         "per_target": per}
        report["worlds"][world] = wrep
    report["train_seconds"] = round(train_seconds, 1)
    report["seconds"] = round(time.time() - t_all, 1)
    report["attack_seconds"] = round(report["seconds"] - train_seconds, 1)
    return report


def _run_world(job: dict) -> dict:
    """One world in its own process (``--processes``): the same :func:`run`, its own torch threads."""
    import torch

    torch.set_num_threads(job.pop("threads"))
    budget = job.pop("budget")
    return run(budget=budget, say=_say(job.pop("quiet")), **job)


def merge(reports: list[dict], seconds: float) -> dict:
    """Per-world reports of one run (same budget, rows and settings) as one report; ``seconds`` is the wall clock
    of the whole run, ``train_seconds`` and ``attack_seconds`` the sums over the worlds' processes."""
    out = {k: v for k, v in reports[0].items() if k not in ("train", "worlds", "train_seconds", "seconds", "attack_seconds")}
    out["train"], out["worlds"] = {}, {}
    for r in reports:
        out["train"].update(r["train"])
        out["worlds"].update(r["worlds"])
    out["train_seconds"] = round(sum(r["train_seconds"] for r in reports), 1)
    out["seconds"] = round(seconds, 1)
    out["attack_seconds"] = round(sum(r["attack_seconds"] for r in reports), 1)
    out["processes"] = len(reports)
    return out


def _round(v, nd: int = 4):
    return round(float(v), nd) if isinstance(v, (int, float)) else None


def _budget(quick: bool, overrides: list[str] | None):
    """``Budget`` (quick or full) with ``KEY=VALUE`` overrides; ValueError names a bad one."""
    from dataclasses import fields

    from spm.attack import Budget

    b = Budget.quick() if quick else Budget()
    types = {f.name: type(getattr(b, f.name)) for f in fields(b)}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--budget {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        try:
            v = types[key](value)
        except ValueError:
            raise ValueError(f"--budget {item!r}: {key} must be a {types[key].__name__}") from None
        if isinstance(v, (int, float)) and v < 0 or (key != "seed" and types[key] is int and v < 1):
            raise ValueError(f"--budget {item!r}: {key} must be positive")
        setattr(b, key, v)
    return b


def main(argv: list[str] | None = None) -> int:
    import torch

    from spm import toy
    from spm.response import LO_RULES
    from spm.train.config import ROBUST_MODES

    p = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quick", action="store_true",
                   help="the machinery only (CI, about 2 minutes): first world, one target, tiny budget, short membranes")
    p.add_argument("--world", action="append", help="toy model name(s) (default: every shipped base model; quick: the first)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated rows to measure, of {', '.join(ALL_ROWS)} (default: {','.join(ROWS)})")
    p.add_argument("--metric", help="transport metric of the robust (and plain) row (default: spm.transport.RESPONSE_METRIC, "
                                    "the response gate)")
    p.add_argument("--robust-training", default="embedding", choices=ROBUST_MODES,
                   help="TrainConfig.robust of the robust row (default: embedding, the robust settings; off: the "
                        "trainer's default)")
    p.add_argument("--response-lo", default="null", choices=LO_RULES,
                   help="where the response gate's ramp starts for membrane files that name no ramp (spm.response."
                        "LO_RULE): null, the default: above random words' second-largest closure; empty: above the "
                        "empty prompt's (a robust-trained file names empty itself)")
    p.add_argument("--budget", action="append", metavar="KEY=VALUE", help="override a field of the attack budget (repeatable)")
    p.add_argument("--target", action="append", help="target concept(s) (default: the first two concepts of each world)")
    p.add_argument("--iterations", type=int, help="training iterations of the membranes (default: the trainer's)")
    p.add_argument("--reuse", action="store_true", help="load membranes already in --membranes instead of training")
    p.add_argument("--membranes", type=Path, default=RESULTS / "attack_membranes")
    p.add_argument("--out", type=Path, help="write the JSON here (default: bench/results/attack.json; quick: not written)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: the toy models run "
                                                           "fastest on one)")
    p.add_argument("--processes", type=int, help="worlds measured at once, one process each (default: as many as "
                                                 "there are worlds and CPU cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad_rows = [r for r in rows if r not in ALL_ROWS]
    if bad_rows or not rows:
        print(f"error: --rows {args.rows!r}: choose from {', '.join(ALL_ROWS)}", file=sys.stderr)
        return 2
    if args.processes is not None and args.processes < 1:
        print(f"error: --processes {args.processes}: must be at least 1", file=sys.stderr)
        return 2
    from spm.transport import METRICS

    if args.metric is not None and args.metric not in METRICS:
        print(f"error: --metric {args.metric}: not a transport metric ({', '.join(METRICS)})", file=sys.stderr)
        return 2
    try:
        budget = _budget(args.quick, args.budget)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worlds = args.world or [name for name, m in toy.MODELS.items() if m.which == "base"][: 1 if args.quick else None]
    for w in worlds:
        if toy.toy_model(w) is None:
            print(f"error: --world {w}: not a shipped toy model ({', '.join(toy.MODELS)})", file=sys.stderr)
            return 2
    targets = {}
    for w in worlds:
        known = toy.concepts(toy.toy_model(w).world)
        ts = args.target or list(known[:1 if args.quick else 2])
        bad = [t for t in ts if t not in known]
        if bad:
            print(f"error: --target {', '.join(bad)}: not a concept of {w} ({', '.join(known)})", file=sys.stderr)
            return 2
        targets[w] = ts
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else None)
    args.membranes.mkdir(parents=True, exist_ok=True)
    processes = min(len(worlds), args.processes or max(1, (os.cpu_count() or 1) // max(1, args.threads)))
    common = dict(quick=args.quick, reuse=args.reuse, iterations=iterations, out=args.membranes, rows=rows,
                  metric=args.metric, robust=args.robust_training, response_lo=args.response_lo)
    if processes <= 1:
        rep = run(worlds, targets, budget, say=_say(args.quiet), **common)
        rep["processes"] = 1
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        t0 = time.time()
        jobs = [dict(worlds=[w], targets={w: targets[w]}, budget=budget, threads=args.threads, quiet=args.quiet, **common)
                for w in worlds]
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as ex:
            rep = merge(list(ex.map(_run_world, jobs)), time.time() - t0)
    text = json.dumps(rep, indent=2, ensure_ascii=False)
    out = args.out or (None if args.quick else RESULTS / "attack.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text if args.json else json.dumps({w: {r: {k: v for k, v in d.items() if k != "per_target"} for r, d in rows.items()}
                                            for w, rows in rep["worlds"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
