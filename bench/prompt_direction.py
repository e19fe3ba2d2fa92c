"""Does the *model* tell a paraphrase from another object where the text encoder cannot?  A measurement for the
Facilitated Transport's open limit (multi-word paraphrases the calibrated ``ngram`` gives 0), not a feature.

``python -m bench.prompt_direction --json`` prints one JSON object and writes ``bench/results/prompt_direction.json``.

For each target, on the erasure signal's held-out probes (``x_t`` on the original model's own trajectories for the
target, at the trainer's default noise levels and seeds; :class:`spm.train.signal.ErasureProbe`), with ``o`` the target's prediction and
``s`` the unconditional one, every prompt ``P`` of the world's captions gets its prediction ``p`` (no membrane) and
the **share of the target's direction it carries**::

    a(P) = ⟨p − s, o − s⟩ / ‖o − s‖²          1: predicts as the target does,  0: adds nothing along it

(sums over all probe rows; the probes are the trainer's defaults: :class:`spm.train.TrainConfig`).  A host could compute it per new prompt with one UNet call of those rows; the question
is whether it separates what the text-side metric cannot.  Reported per target, for paraphrases, literal prompts,
other objects' captions, target-and-other prompts and random whole-word text (``bench.gate``'s prompts of 3 … 12 words): min / median / max, the AUC of
paraphrases against other objects, and the paraphrases the default transport metric (``ngram_tokenuni``, calibrated
on the target alone, no model synonyms) leaves at 0 with their ``a`` against the other objects' highest ``a``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gate import random_prompts  # noqa: E402
from bench.transport_null import _membrane  # noqa: E402
from spm import toy  # noqa: E402
from spm.attach import MembraneStack  # noqa: E402
from spm.hosts.diffusers import DiffusersBackend, pipeline_transport  # noqa: E402
from spm.membrane import Membrane  # noqa: E402
from spm.naming import find_targets  # noqa: E402
from spm.toy import harness  # noqa: E402
from spm.toy.evaluate import world_of  # noqa: E402
from spm.train import TrainConfig  # noqa: E402
from spm.train import synonyms as syn  # noqa: E402
from spm.train.signal import ErasureProbe  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "prompt_direction.json"
TARGETS = {"toy": ("circle", "square", "star"), "toy2": ("sun", "flower", "cloud")}


def _auc(pos: list[float], neg: list[float]) -> float:
    """P(a paraphrase scores above another object's caption), ties half."""
    if not pos or not neg:
        return float("nan")
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def _stats(v: list[float]) -> dict:
    return {"min": round(min(v), 3), "median": round(float(np.median(v)), 3), "max": round(max(v), 3), "n": len(v)}


def measure(model: str, targets: tuple[str, ...], seed: int = 7) -> dict:
    pipe = toy.load(model)
    be = DiffusersBackend(pipe)
    tr = pipeline_transport(pipe)
    cap = harness.labels_of(world_of(pipe))
    rand = random_prompts(100)
    cfg = TrainConfig(targets=list(targets))  # the trainer's own probes: its steps, guidance, seeds and levels
    stack = MembraneStack(pipe.unet)
    stack.add(Membrane.for_targets(find_targets(pipe.unet)))  # attached at strength 0: the original model
    out: dict = {"world": world_of(pipe).name, "targets": {}}
    try:
        for t in targets:
            cond = be.encode([t, ""])
            probe = ErasureProbe(be, stack, cond.rows([0]), cond.rows([1]), cond.rows([1]), steps=cfg.max_denoising_steps,
                                 guidance=cfg.xt_guidance, resolution=be.latent.resolution,
                                 trajectories=cfg.signal_trajectories, levels=cfg.signal_levels, surrogate_is_uncond=True)
            rows = list(range(probe.rows))
            den = float(((probe.o.double() - probe.s.double()) ** 2).sum())
            rng = np.random.default_rng(seed)
            groups = {
                "paraphrase": sorted({cap.single_prompt(t, rng, i, True)[0] for i in range(40)}),
                "literal": sorted({cap.single_prompt(t, rng, i, False)[0] for i in range(40)}),
                "other_objects": sorted({cap.single_prompt(o, rng, i, k)[0] for o in cap.OBJECTS if o != t
                                         for i in range(3) for k in (False, True)}),
                "target_and_other": [f"a {t} and a {o}" for o in cap.OBJECTS if o != t],
                "random_text": rand,
            }
            row: dict = {}
            share: dict[str, dict[str, float]] = {}
            for name, prompts in groups.items():
                to_o, to_s = syn.distances(be, stack, probe, rows, be.encode(prompts), None)
                a = ((to_s - to_o + den) / (2 * den)).tolist()
                share[name] = dict(zip(prompts, a))
                row[name] = _stats(a)
            ctx, toks = tr.encode(groups["paraphrase"])
            strength = tr.scores(ctx, [_membrane(t)], toks)[:, 0].tolist()
            missed = {p: round(share["paraphrase"][p], 3) for p, s in zip(groups["paraphrase"], strength) if s <= 0}
            top_other = max(share["other_objects"].values())
            row["auc_paraphrase_vs_other_objects"] = round(_auc(list(share["paraphrase"].values()),
                                                                list(share["other_objects"].values())), 3)
            row["transport_misses"] = {"paraphrases_at_0": len(missed), "of": len(groups["paraphrase"]),
                                       "above_every_other_object": sum(v > top_other for v in missed.values()),
                                       "other_objects_max": round(top_other, 3),
                                       "highest_other_object": max(share["other_objects"], key=share["other_objects"].get),
                                       "share": missed}
            out["targets"][t] = row
    finally:
        stack.detach()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the JSON object")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    res = {"what": "share of the target's direction each whole prompt carries, on the target's own held-out probes "
                   "(bench.prompt_direction)",
           "worlds": {m: measure(m, ts) for m, ts in TARGETS.items()}}
    res["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    if args.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
