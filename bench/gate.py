"""``python -m bench.gate --json``: the membrane gate (``robust``) against today's default transport, in the toy worlds.

For every shipped toy world (``toy``, ``toy2``) and target (default: the first two concepts of each world), one
membrane is trained at the trainer's defaults (cached under ``bench/results/gate_membranes/``; ``--reuse`` loads
it) and measured with two transport metrics on the same membrane:

* ``default`` (:data:`spm.transport.DEFAULT_METRIC`, ``ngram_tokenuni``) and ``robust``
  (:data:`spm.transport.ROBUST_METRIC`: its maximum with the membrane gate, :mod:`spm.gate`);
* the attacks of :func:`spm.attack.run_attacks` (discrete, embedding, cheap) under one fixed budget (in the JSON),
  white-box through the gate; ``unprotected`` is the same attacks on the model without a membrane (the ceiling);
* ``spm.toy.evaluate`` on its default suite: literal and paraphrase erasure, non-target drop, PSNR; plus
  ``nontarget_bit_identical``: the share of the suite's non-target images (and, separately, of images of random
  word prompts) that are bit-identical with and without the membrane;
* the gate's calibration (null top, concept's low end, lo/hi) and the transport cost per prompt: the gate's own
  scoring per new conditioning, on the toy membranes and on an SD1-sized one (16 blocks, 768 wide).

Writes ``bench/results/gate.json`` (``--quick``: a tiny budget and suite, not written unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def _say(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: print(f"[gate] {m}", file=sys.stderr, flush=True))


def _judge(scorer, target: str, world: str):
    from spm.toy import harness

    return harness.target_judge(scorer, target, world)


def _membrane(pipe, world: str, target: str, out: Path, reuse: bool, iterations: int | None, say) -> tuple:
    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer

    path = out / f"{world}_{target}.safetensors"
    if reuse and path.exists():
        return load_membrane(path), 0.0
    cfg = TrainConfig(targets=[target], **({"iterations": iterations} if iterations else {}))
    say(f"training {world}/{target} ({cfg.iterations} iterations at most)")
    t0 = time.time()
    Trainer(DiffusersBackend(pipe), cfg, path, progress_bar=False).train()
    return load_membrane(path), time.time() - t0


def _identical(a: list, b: list) -> float:
    import numpy as np

    same = [bool(np.array_equal(np.asarray(x), np.asarray(y))) for x, y in zip(a, b)]
    return sum(same) / len(same) if same else float("nan")


def bit_identity(pipe, membrane, metric: str, cases: list, random_prompts: list[str], steps: int) -> dict:
    """Share of non-target (and random-prompt) images that are bit-identical with and without the membrane."""
    from spm.hosts.diffusers import PipelineMembranes
    from spm.toy import harness

    prompts = [c.prompt for c in cases]
    seeds = [c.seed for c in cases]
    rp_seeds = list(range(5000, 5000 + len(random_prompts)))
    base = harness.generate(pipe, prompts + random_prompts, seeds + rp_seeds, steps=steps)
    with PipelineMembranes(pipe, [(membrane, 1.0)], metric=metric) as pm:
        after = harness.generate(pipe, prompts + random_prompts, seeds + rp_seeds, steps=steps)
        gate = pm.transport.gates.peek(membrane)
    n = len(prompts)
    return {"nontarget_bit_identical": _identical(base[:n], after[:n]), "random_bit_identical": _identical(base[n:], after[n:]),
            "nontarget_images": n, "random_images": len(random_prompts),
            **({"gate_source": gate.source} if gate is not None else {})}


def gate_summary(pipe, membrane) -> dict:
    from spm.gate import compute_gate
    from spm.hosts.diffusers import pipeline_transport
    from spm.transport import ROBUST_METRIC

    tr = pipeline_transport(pipe, ROBUST_METRIC)
    t0 = time.perf_counter()
    g = tr.prepare_gates([membrane])[0]
    secs = time.perf_counter() - t0
    fresh = pipeline_transport(pipe, ROBUST_METRIC)
    t0 = time.perf_counter()
    compute_gate(membrane, fresh._encode_context)  # what a file without the gate pays once per session
    return {"prepare_seconds": round(secs, 3), "compute_seconds": round(time.perf_counter() - t0, 3), "usable": g.usable, "modules": len(g.stems), "null_top": round(g.q, 4), "concept_low": round(g.top, 4),
            "lo": round(g.lo, 4), "hi": round(g.hi, 4), "null_quantiles": {k: round(v, 4) for k, v in g.quantiles.items()},
            "samples": g.samples, "source": g.source}


def _time_per_call(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def cost(pipe, membrane, reps: int = 200) -> dict:
    """Milliseconds per prompt: the gate's scoring of a new conditioning (2 rows: prompt and negative), and the
    whole transport's steady scores() for default and robust (rows seen before: their windows are cached)."""
    from spm.hosts.diffusers import pipeline_transport
    from spm.transport import DEFAULT_METRIC, ROBUST_METRIC

    out = {}
    texts = ["a red circle on a white background", ""]
    for metric in (DEFAULT_METRIC, ROBUST_METRIC):
        tr = pipeline_transport(pipe, metric)
        ctx, toks = tr.encode(texts)
        tr.registry.record(ctx, toks)
        tr.scores(ctx, [membrane])  # calibrations, windows: first sight
        out[f"scores_ms_{metric}"] = round(_time_per_call(lambda: tr.scores(ctx, [membrane]), reps), 4)
        if metric == ROBUST_METRIC:
            out["gate_ms"] = round(_time_per_call(lambda: tr.gate_scores(ctx, [membrane]), reps), 4)
    return out


def cost_sd1(reps: int = 200) -> dict:
    """The gate's scoring cost for an SD1-sized membrane (16 transformer blocks: 32 key/value downs, 768 wide) on a
    ``[2, 77, 768]`` conditioning, and on a 3-chunk (231-token) prompt."""
    import torch

    from spm.gate import Gate

    g = torch.Generator().manual_seed(0)
    mods = [(f"lora_unet_block_{i}_attn2_to_{kv}", torch.randn(1, 768, generator=g) / 768 ** 0.5)
            for i in range(16) for kv in ("k", "v")]
    gate = Gate(tuple(s for s, _ in mods), tuple(1.0 for _ in mods), 1.0, 2.0, 1.25, 1.5, {}, 0, True, [], None).bind(mods)
    ctx = torch.randn(2, 77, 768, generator=g)
    long = torch.randn(2, 231, 768, generator=g)
    return {"sd1_gate_ms": round(_time_per_call(lambda: gate.score(ctx), reps), 4),
            "sd1_gate_ms_231_tokens": round(_time_per_call(lambda: gate.score(long), reps), 4),
            "modules": len(mods), "threads": torch.get_num_threads()}


def random_prompts(n: int, seed: int = 4242) -> list[str]:
    """Prompts of 3 … 12 random whole words (another seed than any calibration's null)."""
    import torch

    from spm.gate import _pools

    _, words = _pools()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 13, (1,), generator=g))
        out.append(" ".join(words[i] for i in torch.randint(len(words), (k,), generator=g).tolist()))
    return out


def run(worlds: list[str], targets: dict[str, list[str]], budget, *, quick: bool, reuse: bool, iterations: int | None,
        out: Path, say, unprotected: bool = True) -> dict:
    from spm import attack, toy
    from spm.hosts.diffusers import PipelineMembranes
    from spm.toy import evaluate as ev
    from spm.toy import harness
    from spm.toy.scorer import load_scorer
    from spm.transport import DEFAULT_METRIC, ROBUST_METRIC

    t_all = time.time()
    suite = ({"n_literal": 4, "n_paraphrase": 2, "n_per_other": 1, "n_pairs": 2, "n_mixed": 0} if quick else {})
    metrics = {"default": DEFAULT_METRIC, "robust": ROBUST_METRIC}
    report: dict = {"budget": budget.as_dict(), "suite": {**ev.SUITE_DEFAULTS, **suite}, "quick": quick,
                    "metrics": metrics, "worlds": {}}
    train_s = 0.0
    rps = random_prompts(8 if quick else 32)
    for world in worlds:
        pipe = toy.load(world)
        tw = toy.toy_model(world).world
        scorer = load_scorer(world=tw)
        syn = getattr(harness.labels_of(tw), "PARAPHRASES", {})
        wrep: dict = {"targets": {}}
        for target in targets[world]:
            membrane, secs = _membrane(pipe, world, target, out, reuse, iterations, say)
            train_s += secs
            judge = _judge(scorer, target, tw)
            literal = [f"a {target}", f"a red {target} on a white background"]
            trep: dict = {"gate": gate_summary(pipe, membrane), "cost": cost(pipe, membrane, 20 if quick else 200)}
            if unprotected:
                say(f"{world}/{target}: unprotected")
                res = attack.run_attacks(pipe, target, literal, protect_factory=None, judge=judge, budget=budget,
                                         synonyms=list(syn.get(target, ())), progress=say)
                trep["unprotected"] = _attack_row(res)
            for row, metric in metrics.items():
                say(f"{world}/{target}: {row} ({metric})")
                q = ev.evaluate(pipe, scorer, [(membrane, 1.0)], [[target]], metric=metric, suite=suite or None)
                cases = harness.prompt_suite(target, **{**ev.SUITE_DEFAULTS, **suite}, world=tw)["nontarget"]
                ident = bit_identity(pipe, membrane, metric, cases, rps, harness.DEFAULT_STEPS)

                def factory(m=membrane, mt=metric):
                    return PipelineMembranes(pipe, [(m, 1.0)], metric=mt)

                res = attack.run_attacks(pipe, target, literal, protect_factory=factory, judge=judge, budget=budget,
                                         synonyms=list(syn.get(target, ())), progress=say)
                trep[row] = {**_attack_row(res),
                             **{k: q.get(k) for k in ("erasure", "paraphrase_erasure", "nontarget_drop_pt",
                                                      "psnr_unrelated_db", "mixed_erasure")},
                             **ident}
            wrep["targets"][target] = trep
        wrep["summary"] = _summary(wrep["targets"], ["unprotected", *metrics] if unprotected else list(metrics))
        report["worlds"][world] = wrep
    report["cost_sd1"] = cost_sd1(20 if quick else 200)
    report["train_seconds"] = round(train_s, 1)
    report["seconds"] = round(time.time() - t_all, 1)
    return report


def _attack_row(res: dict) -> dict:
    return {"asr_discrete": (res.get("discrete") or {}).get("asr"),
            "asr_discrete_by_placement": (res.get("discrete") or {}).get("asr_by_placement"),
            "asr_embedding": (res.get("embedding") or {}).get("asr"),
            "asr_embedding_by_placement": (res.get("embedding") or {}).get("asr_by_placement"),
            "asr_cheap": (res.get("cheap") or {}).get("asr"),
            "asr_cheap_per_kind": (res.get("cheap") or {}).get("per_kind"),
            "discrete_prompts": [r.get("prompt") for r in (res.get("discrete") or {}).get("runs", [])]}


def _summary(per: dict, rows: list[str]) -> dict:
    keys = ("asr_discrete", "asr_embedding", "asr_cheap", "erasure", "paraphrase_erasure", "nontarget_drop_pt",
            "nontarget_bit_identical", "random_bit_identical")
    out = {}
    for row in rows:
        d = {}
        for k in keys:
            vals = [t[row].get(k) for t in per.values() if row in t and t[row].get(k) is not None]
            if vals:
                d[k] = round(sum(vals) / len(vals), 4)
        out[row] = d
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from spm import toy
    from spm.attack import Budget

    p = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    p.add_argument("--quick", action="store_true", help="tiny budget and suite, one target, short membranes")
    p.add_argument("--world", action="append", help="toy model name(s) (default: every shipped base model)")
    p.add_argument("--target", action="append", help="target concept(s) (default: the first two concepts of each world)")
    p.add_argument("--iterations", type=int, help="training iterations (default: the trainer's)")
    p.add_argument("--reuse", action="store_true", help="load the membranes already in --membranes instead of training")
    p.add_argument("--no-unprotected", action="store_true", help="skip the attacks on the unprotected model")
    p.add_argument("--membranes", type=Path, default=RESULTS / "gate_membranes")
    p.add_argument("--out", type=Path, help="write the JSON here (default: bench/results/gate.json; quick: not written)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=N",
                   help="override a field of spm.attack.Budget, e.g. --budget restarts=1 (repeatable; stated in the JSON)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    worlds = args.world or [name for name, m in toy.MODELS.items() if m.which == "base"]
    targets = {}
    for w in worlds:
        if toy.toy_model(w) is None:
            print(f"error: --world {w}: not a shipped toy model ({', '.join(toy.MODELS)})", file=sys.stderr)
            return 2
        known = toy.concepts(toy.toy_model(w).world)
        ts = [t for t in (args.target or []) if t in known] if args.target else list(known[:1 if args.quick else 2])
        if not ts:
            print(f"error: --target {', '.join(args.target)}: no concept of {w} ({', '.join(known)})", file=sys.stderr)
            return 2
        targets[w] = ts
    budget = Budget.quick() if args.quick else Budget()
    for item in args.budget:
        key, _, val = item.partition("=")
        if not hasattr(budget, key) or not val:
            print(f"error: --budget {item}: expected KEY=NUMBER with KEY a field of spm.attack.Budget", file=sys.stderr)
            return 2
        try:
            setattr(budget, key, type(getattr(budget, key))(val))
        except ValueError:
            print(f"error: --budget {item}: {val!r} is not a number", file=sys.stderr)
            return 2
    iterations = args.iterations or (60 if args.quick else None)
    args.membranes.mkdir(parents=True, exist_ok=True)
    rep = run(worlds, targets, budget, quick=args.quick, reuse=args.reuse, iterations=iterations, out=args.membranes,
              say=_say(False), unprotected=not args.no_unprotected)
    text = json.dumps(rep, indent=2, ensure_ascii=False)
    out = args.out or (None if args.quick else RESULTS / "gate.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text if args.json else json.dumps({w: r["summary"] for w, r in rep["worlds"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
