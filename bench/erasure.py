"""``python -m bench.erasure --json``: erasure, preservation, ablations, multi-concept, transfer and cost in the toy world.

Trains membranes on the shipped toy model with the default :class:`spm.train.TrainConfig` (override with
``--iterations``/``--lr``), generates the toy harness's fixed prompt suites with the same seeds with and without
membranes (diffusers host, Facilitated Transport), scores them with the toy scorer and prints one JSON object
(also written under ``bench/results/``).

Definitions (fractions in 0..1, drops in percentage points):

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

RESULTS = Path(__file__).resolve().parent / "results"
SINGLE = "circle"
MULTI = ("circle", "heart", "arrow")  # objects the base model draws reliably (star and cross: about half the time)


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


def run(args) -> dict:
    from spm.transport import DEFAULT_METRIC, METRICS

    t0 = time.time()
    torch.set_num_threads(args.threads)
    b = Bench(args.iterations, args.lr, Path(args.out), args.reuse, args.quiet)
    cfg = b.config([SINGLE])
    report: dict = {"settings": {"iterations": cfg.iterations, "lr": cfg.lr, "la_mode": cfg.la_mode,
                                 "la_budget": cfg.la_budget, "default_metric": DEFAULT_METRIC, "threads": args.threads}}

    def partial() -> None:  # every finished part is on disk, even if the run is cut short
        report["seconds"] = time.time() - t0
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "erasure.partial.json").write_text(json.dumps(report, indent=2))

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.erasure", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--iterations", type=int, default=None, help="override the default training length")
    p.add_argument("--lr", type=float, default=None, help="override the default learning rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cost-iterations", type=int, default=20)
    p.add_argument("--curve-every", type=int, default=100, help="keep the single membrane every N iterations")
    p.add_argument("--ref-iterations", type=int, default=200,
                   help="train a reference-schedule membrane this long and compare its erasure with the default "
                        "schedule's at the same iteration count (0: skip)")
    p.add_argument("--skip-multi", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse membranes already trained in --out")
    p.add_argument("--out", default=str(RESULTS / "erasure_membranes"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        report = run(args)
    except FileNotFoundError as e:
        print(f"error: the toy world's assets are missing: {e}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "erasure.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
