"""``python -m bench.attack --json``: attack success against membranes and their transport gate, in the toy worlds.

For every shipped toy world (``spm.toy.MODELS``, the base models) and target concept, three rows are measured in
one run, under the same fixed budget (``spm.attack.Budget``, stated in the JSON):

* ``unprotected``: the base model without a membrane — the ceiling (how often the attack makes the model draw
  the target at all);
* ``reference``: a membrane trained with the reference schedule (``--reference-schedule``), used with the
  reference's transport metric (``clipcos_tokenuni``);
* ``default``: a membrane trained with this project's defaults, used with the default transport metric.

Per row: ``asr_discrete`` (gradient-guided token swaps, mean over placements and restarts), ``asr_embedding``
(continuous token embeddings, the upper bound), ``asr_cheap`` (synonyms, misspellings, split words, other
languages, case, long prompts) — each the share of judged images in which the toy scorer finds the target with
the membrane and gate on — plus ``literal_erasure``, ``paraphrase_erasure`` and ``nontarget_drop_pt`` from the
toy evaluation harness (``spm.toy.evaluate``) on a small suite. Membranes are cached under
``bench/results/attack_membranes/`` (``--reuse`` loads them); training time is reported apart from attack time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("unprotected", "reference", "default")


def _say(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: print(f"[attack] {m}", file=sys.stderr, flush=True))


def _judge(scorer, target: str, world: str):
    from spm.toy import harness

    def judge(images: list) -> list:
        if not images:
            return []
        return [bool(f) for f in harness.found(harness.score_images(scorer, images), [target] * len(images), world=world)]

    return judge


def _train(pipe, target: str, row: str, out: Path, reuse: bool, iterations: int | None, say, tag: str = "") -> tuple:
    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer

    path = out / f"{tag}{row}_{target}.safetensors"
    if reuse and path.exists():
        return load_membrane(path), 0.0
    kw = {"iterations": iterations} if iterations else {}
    if row == "reference":
        kw["schedule"] = "reference"
    cfg = TrainConfig(targets=[target], **kw)
    say(f"training the {row} membrane for {target!r} ({cfg.iterations} iterations, {cfg.schedule} schedule)")
    t0 = time.time()
    res = Trainer(DiffusersBackend(pipe), cfg, path, progress_bar=False).train()
    return res.membrane.cpu(), time.time() - t0


def _synonyms(target: str, world: str) -> list[str]:
    from spm.toy.harness import labels_of

    return list(getattr(labels_of(world), "PARAPHRASES", {}).get(target, ()))


def run(worlds: list[str], targets: dict[str, list[str]], budget, *, quick: bool, reuse: bool, iterations: int | None,
        out: Path, say) -> dict:
    from spm import attack
    from spm.hosts.diffusers import PipelineMembranes
    from spm.toy import evaluate as ev
    from spm.toy import load
    from spm.toy.scorer import load_scorer
    from spm.transport import DEFAULT_METRIC

    t_all = time.time()
    suite = ({"n_literal": 4, "n_paraphrase": 2, "n_per_other": 1, "n_pairs": 2, "n_mixed": 0} if quick else
             {"n_literal": 8, "n_paraphrase": 4, "n_per_other": 1, "n_pairs": 4, "n_mixed": 0})
    report: dict = {"budget": budget.as_dict(), "suite": suite, "quick": quick, "worlds": {}}
    train_seconds = 0.0
    from spm import toy

    for world in worlds:
        pipe = load(world)
        tw = toy.toy_model(world).world
        scorer = load_scorer(world=tw)
        wrep: dict = {}
        for row in ROWS:
            per: dict = {}
            for target in targets[world]:
                say(f"{world} / {row} / {target}")
                judge = _judge(scorer, target, tw)
                literal = [f"a {target}", f"a red {target} on a white background"]
                if row == "unprotected":
                    factory = None
                    quality: dict = {}
                else:
                    membrane, secs = _train(pipe, target, row, out, reuse, iterations, say, tag=f"{world}_")
                    train_seconds += secs
                    metric = "clipcos_tokenuni" if row == "reference" else DEFAULT_METRIC

                    def factory(m=membrane, mt=metric):
                        return PipelineMembranes(pipe, [(m, 1.0)], metric=mt)

                    q = ev.evaluate(pipe, scorer, [(membrane, 1.0)], [[target]], metric=metric, suite=suite)
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
                         "asr_cheap": mean("cheap", "asr"), "literal_erasure": qmean("erasure"),
                         "paraphrase_erasure": qmean("paraphrase_erasure"), "nontarget_drop_pt": qmean("nontarget_drop_pt"),
                         "per_target": per}
        report["worlds"][world] = wrep
    report["train_seconds"] = round(train_seconds, 1)
    report["seconds"] = round(time.time() - t_all, 1)
    report["attack_seconds"] = round(report["seconds"] - train_seconds, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    import torch

    from spm import toy
    from spm.attack import Budget

    p = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quick", action="store_true", help="tiny budget, one target, short membranes (CI: about 2 minutes)")
    p.add_argument("--world", action="append", help="toy model name(s) (default: every shipped base model)")
    p.add_argument("--target", action="append", help="target concept(s) (default: the first two concepts of each world)")
    p.add_argument("--iterations", type=int, help="training iterations of the membranes (default: the trainer's)")
    p.add_argument("--reuse", action="store_true", help="load membranes already in --membranes instead of training")
    p.add_argument("--membranes", type=Path, default=RESULTS / "attack_membranes")
    p.add_argument("--out", type=Path, help="write the JSON here (default: bench/results/attack.json; quick: not written)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    worlds = args.world or [name for name, m in toy.MODELS.items() if m.which == "base"]
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
    budget = Budget.quick() if args.quick else Budget()
    iterations = args.iterations or (60 if args.quick else None)
    args.membranes.mkdir(parents=True, exist_ok=True)
    rep = run(worlds, targets, budget, quick=args.quick, reuse=args.reuse, iterations=iterations, out=args.membranes,
              say=_say(args.json and False))
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
