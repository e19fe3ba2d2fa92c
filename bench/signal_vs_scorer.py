"""``python -m bench.signal_vs_scorer --json``: does the trainer's classifier-free erasure signal track the scorer's erasure?

For each target, trains one membrane on a toy model with the default settings but without early stopping
(``stop_when_erased=False``, so the run goes past the point where the signal says erased), keeps a copy of the
membrane every ``--every`` iterations, and for each copy records

* ``signal``: the trainer's erasure signal at that step (:mod:`spm.train.signal`: the share of the target's gap
  to the surrogate closed on held-out probes; erased from ``THRESHOLD`` = 1), with its per-noise-level values;
* ``erasure`` / ``paraphrase_erasure``: the toy scorer's literal and paraphrase erasure of that membrane merged at
  full strength with Facilitated Transport off (``spm.toy.evaluate.evaluate`` with ``transport=False``: the same as
  ``python -m spm eval --membrane F --no-transport --n-literal 16 --n-paraphrase 8 --n-per-other 0 --n-pairs 0
  --n-mixed 0``).

Then it reports the Pearson and Spearman correlation of signal and erasure over all points, how often the
decision "signal ≥ THRESHOLD" agrees with "the scorer finds the target in at most half as many images as before"
(erasure ≥ 0.5) and with erasure ≥ 0.9 (also for the ratio over all probes together, ``aggregate``, and
for its weaker bisector rule, aggregate ≥ 0.5), the step at which each first holds, and the adaptive anchor weight of
each run (median and maximum).  Writes ``bench/results/signal_vs_scorer.json`` and ``signal_vs_scorer.png``.

``--model``: a shipped toy model by name (``spm.toy.MODELS``, e.g. ``toy`` or ``toy2``) or a toy asset folder; the
scorer, the prompt suites and the default targets are that model's toy world's (``spm.toy.evaluate.world_of``):
world 1 (``shapes``) defaults to ``TARGETS``, another world to all its objects; the results go to
``bench/results/signal_vs_scorer.json`` for world 1 and ``signal_vs_scorer_<world>.json`` for the others.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("circle", "star", "heart", "arrow")


def _load(model: str):
    """``(pipeline, toy world)`` for ``--model``."""
    from spm import toy
    from spm.toy.evaluate import NotToyModel, check_toy_pipeline, load_asset_folder

    if toy.toy_model(model) is not None:
        pipe = toy.load(model)
    elif Path(model).is_dir():
        pipe = load_asset_folder(Path(model))
    else:
        raise SystemExit(f"--model {model}: neither a shipped toy model ({', '.join(toy.MODELS)}) nor a toy asset folder")
    try:
        return pipe, check_toy_pipeline(pipe, f"--model {model}")
    except NotToyModel as e:
        raise SystemExit(str(e)) from None


def default_targets(world: str) -> list[str]:
    """World 1's historic four, else every object of the world."""
    from spm.toy import concepts

    return list(TARGETS) if world == "shapes" else list(concepts(world))


def harness_objects(world) -> tuple[str, ...]:
    from spm.toy import harness

    return harness.labels_of(world).OBJECTS


def default_out(world: str) -> Path:
    return RESULTS / ("signal_vs_scorer.json" if world == "shapes" else f"signal_vs_scorer_{world}.json")


def _rank(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def spearman(x: list[float], y: list[float]) -> float | None:
    return pearson(_rank(x), _rank(y))


def run_target(pipe, scorer, target: str, args, work: Path, say) -> dict:
    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import DiffusersBackend
    from spm.toy import evaluate as ev
    from spm.train import TrainConfig, Trainer
    from spm.train.signal import THRESHOLD

    base = TrainConfig()
    iters = args.iterations or base.iterations
    if args.early_stop:  # the trainer's defaults, early stopping included; keep a copy at every other check
        from spm.train.signal import check_interval

        every = args.every or 2 * check_interval(iters, base.signal_checks)
        cfg = TrainConfig(targets=[target], iterations=iters, save_every=every, seed=args.seed,
                          **({"lr": args.lr} if args.lr else {}))
    else:
        every = args.every or max(1, iters // 12)
        cfg = TrainConfig(targets=[target], iterations=iters, stop_when_erased=False, signal_checks=max(1, iters // every),
                          save_every=every, seed=args.seed, **({"lr": args.lr} if args.lr else {}))
    out = work / f"{target}.safetensors"
    kept: dict[int, Path] = {}

    def keep(p) -> None:
        if p.step % every == 0 and p.step < iters:  # the checkpoint of this step was just written
            dst = work / f"{target}_{p.step:05d}.safetensors"
            shutil.copyfile(out, dst)
            kept[p.step] = dst

    t0 = time.time()
    say(f"{target}: training {iters} iterations (a copy every {every})")
    trainer = Trainer(DiffusersBackend(pipe), cfg, out, progress_bar=False, callback=keep)
    res = trainer.train()
    kept[res.steps] = out
    train_s = time.time() - t0
    checks = {c["step"]: c for c in res.membrane.info.training["signal_history"]}
    suite = {"n_literal": args.n_literal, "n_paraphrase": args.n_paraphrase, "n_per_other": 0, "n_pairs": 0, "n_mixed": 0}
    points = []
    for step in sorted(kept):
        c = checks.get(step)
        if c is None:
            continue
        rep = ev.evaluate(pipe, scorer, [(load_membrane(kept[step]), 1.0)], [[target]], transport=args.transport,
                          suite=suite, generations=args.gen)
        points.append({"step": step, "signal": c["signal"], "aggregate": c.get("aggregate"), "per_level": c["per_level"],
                       "level_ratio": c.get("level_ratio"), "per_seed": c.get("per_seed"),
                       "remaining": c["remaining"], "parts": c.get("parts"), "erasure": rep.get("erasure"),
                       "paraphrase_erasure": rep.get("paraphrase_erasure")})
        say(f"{target} step {step}: signal {c['signal']:.3f}  erasure {rep.get('erasure')}  "
            f"paraphrase {rep.get('paraphrase_erasure')}")
    la = sorted(h["la_weight"] for h in res.history)
    sig = [h["signal"] for h in res.history]  # the per-step MSE(ε_pos, ε_neu) the adaptive weight normalises by

    def first(pred) -> int | None:
        return next((p["step"] for p in points if pred(p)), None)

    return {
        "iterations": iters, "every": every, "early_stop": bool(args.early_stop), "steps": res.steps,
        "trainer_erasure": {k: res.erasure.get(k) for k in ("erased", "signal", "threshold", "message")}, "train_seconds": round(train_s, 1), "points": points,
        "first_signal_erased": first(lambda p: p["signal"] >= THRESHOLD),
        "first_scorer_erasure_0.5": first(lambda p: (p["erasure"] or 0) >= 0.5),
        "first_scorer_erasure_0.9": first(lambda p: (p["erasure"] or 0) >= 0.9),
        "la_weight_median": la[len(la) // 2], "la_weight_max": la[-1],
        "concept_signal_mse_median": sorted(sig)[len(sig) // 2],
        "signal_overhead_ufe": res.cost["signal_ufe"], "training_ufe": res.cost["ufe"],
        "signal_overhead": res.cost["signal_overhead"],
    }


def upgrade(per: dict) -> dict:
    """Points recorded before the signal became the minimum over noise levels (their ``signal`` was the ratio over
    all probes): recompute ``signal`` from their ``per_level`` and keep the old value as ``aggregate``."""
    for r in per.values():
        for p in r["points"]:
            if "aggregate" not in p:
                p["aggregate"], p["signal"] = p["signal"], min(p["per_level"])
    return per


def summarise(per: dict, thr: float | None = None) -> dict:
    from spm.train.signal import THRESHOLD

    thr = THRESHOLD if thr is None else thr
    pts = [p for r in per.values() for p in r["points"] if p["erasure"] is not None]
    xs, ys = [p["signal"] for p in pts], [p["erasure"] for p in pts]
    yp = [p["paraphrase_erasure"] for p in pts if p["paraphrase_erasure"] is not None]
    xp = [p["signal"] for p in pts if p["paraphrase_erasure"] is not None]

    xm = [p["aggregate"] for p in pts]  # the alternative rule: all probes together
    # the other rules on the same points (where the points recorded them): the plain per-level ratio (no confidence
    # bound; the signal before the bound) and the least-closed single held-out seed of any level (the strictest)
    ratio_pts = [p for p in pts if p.get("level_ratio")]
    seed_pts = [p for p in pts if p.get("per_seed")]
    part_pts = [p for p in pts if p.get("parts")]

    def agree(level: float, sig: list[float], thr: float = thr, ys: list[float] = ys) -> dict:
        tp = sum(1 for x, y in zip(sig, ys) if x >= thr and y >= level)
        tn = sum(1 for x, y in zip(sig, ys) if x < thr and y < level)
        fp = sum(1 for x, y in zip(sig, ys) if x >= thr and y < level)
        fn = sum(1 for x, y in zip(sig, ys) if x < thr and y >= level)
        return {"agree": (tp + tn) / len(sig) if sig else None, "signal_erased_scorer_not": fp,
                "scorer_erased_signal_not": fn, "both_erased": tp, "neither": tn}

    def rule(sub: list[dict], value) -> dict:
        sig, er = [value(p) for p in sub], [p["erasure"] for p in sub]
        return {"points": len(sub), "pearson": pearson(sig, er),
                "decision_vs_erasure_0.5": agree(0.5, sig, ys=er), "decision_vs_erasure_0.9": agree(0.9, sig, ys=er)}

    return {"threshold": thr, "points": len(pts), "pearson": pearson(xs, ys), "spearman": spearman(xs, ys),
            "pearson_paraphrase": pearson(xp, yp), "spearman_paraphrase": spearman(xp, yp),
            "decision_vs_erasure_0.5": agree(0.5, xs), "decision_vs_erasure_0.9": agree(0.9, xs),
            "aggregate": {"pearson": pearson(xm, ys), "spearman": spearman(xm, ys),
                          "decision_vs_erasure_0.5": agree(0.5, xm), "decision_vs_erasure_0.9": agree(0.9, xm)},
            "aggregate_bisector_0.5": {"decision_vs_erasure_0.5": agree(0.5, xm, 0.5),
                                       "decision_vs_erasure_0.9": agree(0.9, xm, 0.5)},
            # with context prompts (the trainer's default) the signal is the lesser of two parts: each alone, same points
            "alone_only": rule(part_pts, lambda p: p["parts"]["alone"]) if part_pts else None,
            "in_context_only": rule(part_pts, lambda p: p["parts"]["in_context"]) if part_pts else None,
            # the rule until 2026-12-07: the worst noise level's lower bound (each level judged alone)
            "level_bound_min": rule(pts, lambda p: min(p["per_level"])),
            "level_ratio_min": rule(ratio_pts, lambda p: min(p["level_ratio"])) if ratio_pts else None,
            "single_seed_min": rule(seed_pts, lambda p: min(min(lv) for lv in p["per_seed"])) if seed_pts else None}


def plot(per: dict, summary: dict, path: Path, title: str, transport: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    from spm.train.signal import THRESHOLD

    for i, (name, r) in enumerate(per.items()):
        col = f"C{i}"
        pts = [p for p in r["points"] if p["erasure"] is not None]
        a.plot([p["signal"] for p in pts], [p["erasure"] for p in pts], "o-", color=col, label=name, alpha=0.8)
        b.plot([p["step"] for p in r["points"]], [p["signal"] for p in r["points"]], "-", color=col, label=f"{name} signal")
        b.plot([p["step"] for p in pts], [p["erasure"] for p in pts], "--", color=col, alpha=0.7, label=f"{name} scorer")
    a.axvline(THRESHOLD, color="k", lw=0.8, ls=":")
    bound = any(p.get("level_ratio") for r in per.values() for p in r["points"])
    parts = any(p.get("parts") for r in per.values() for p in r["points"])
    a.set_xlabel("erasure signal: gap to the surrogate closed, least-closed noise level"
                 + (",\n95% lower bound" if bound else "") + ("; the lesser of the target alone and inside other words"
                                                              if parts else ""), fontsize=8 if parts else None)
    a.set_ylabel("scorer: literal erasure (" + ("default transport)" if transport else "transport off)"))
    pe, sp = summary.get("pearson"), summary.get("spearman")
    a.set_title(f"Pearson {pe:.2f}, Spearman {sp:.2f}" if pe is not None and sp is not None else "signal vs scorer")
    a.legend(fontsize=8)
    b.axhline(THRESHOLD, color="k", lw=0.8, ls=":")
    b.set_xlabel("iteration")
    b.set_ylabel("signal (solid) / scorer erasure (dashed)")
    b.set_title(title)
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.signal_vs_scorer", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="toy", help="a shipped toy model name or a toy asset folder (default: toy)")
    ap.add_argument("--targets", help="comma-separated toy objects (default: world 1's circle, star, heart, arrow; "
                    "another world's: all its objects)")
    ap.add_argument("--iterations", type=int, help="iterations per run (default: the TrainConfig default)")
    ap.add_argument("--every", type=int, help="keep a membrane every N iterations (default: iterations / 12)")
    ap.add_argument("--lr", type=float, help="learning rate (default: the TrainConfig default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--early-stop", action="store_true",
                    help="train with the default early stopping (default: the whole budget, checks every --every)")
    ap.add_argument("--transport", action="store_true",
                    help="judge the copies with the default transport (literal prompts then get the membrane on their "
                         "conditional row only, as the signal's probes do) instead of at full strength on every row")
    ap.add_argument("--n-literal", type=int, default=16)
    ap.add_argument("--n-paraphrase", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="the JSON (default: bench/results/signal_vs_scorer.json for world 1, "
                    "signal_vs_scorer_<world>.json for another; the plot beside it)")
    ap.add_argument("--work", help="where the kept membranes go (default: bench/results/signal_membranes/<world>)")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only merge the targets of earlier runs (e.g. one process per target) into --out and its plot")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        per: dict = {}
        for part in parts:
            for t, r in part["targets"].items():
                label = t if t not in per else f"{t}, {r['iterations']} it{', early stop' if r.get('early_stop') else ''}"
                per[label] = {"target": t, **r}
        upgrade(per)
        planned = list(dict.fromkeys(t for part in parts for t in part.get("targets_run", [])))
        done = {r["target"] for r in per.values()}
        report = {**parts[0], "targets": per, "summary": summarise(per),
                  "targets_not_run": [t for t in planned if t not in done],
                  "seconds": round(sum(p.get("seconds", 0) for p in parts), 1), "merged_from": [str(f) for f in args.merge]}
        out = Path(args.out) if args.out else default_out(report.get("world", "shapes"))
        out.write_text(json.dumps(report, indent=2) + "\n")
        plot(per, report["summary"], out.with_suffix(".png"), f"model {report['model']}",
             bool((report.get("settings") or {}).get("transport")))
        print(json.dumps(report, indent=2) if args.json else out)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from spm.toy.evaluate import Generations
    from spm.toy.scorer import load_scorer

    say = (lambda m: None) if args.quiet else (lambda m: print(f"[signal] {m}", file=sys.stderr, flush=True))
    from spm.toy.evaluate import normalise_targets

    pipe, world = _load(args.model)
    targets = [s.strip() for s in args.targets.split(",") if s.strip()] if args.targets else default_targets(world.name)
    try:
        targets = normalise_targets(targets, "--targets", world)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    scorer = load_scorer(world=world)
    args.gen = Generations()
    work = Path(args.work) if args.work else RESULTS / "signal_membranes" / world.name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    per: dict = {}
    out = Path(args.out) if args.out else default_out(world.name)
    for t in targets:
        per[t] = run_target(pipe, scorer, t, args, work, say)
        report = {"model": args.model, "world": world.name, "targets_run": targets,
                  "world_objects": list(harness_objects(world)),
                  "settings": {k: getattr(args, k) for k in
                                                    ("iterations", "every", "lr", "seed", "n_literal", "n_paraphrase",
                                                     "early_stop", "transport")},
                  "targets": per, "summary": summarise(per), "seconds": round(time.time() - t0, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # every finished target is on disk
    plot(per, report["summary"], out.with_suffix(".png"), f"model {args.model}", bool(args.transport))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
