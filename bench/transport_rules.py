"""Why the calibrated ``ngram`` pools its null over window lengths, and how long its windows are: alternatives
measured offline on both toy worlds' text encoders (no membrane, no UNet: the concept's own words only).

``python -m bench.transport_rules --json`` prints one JSON object and writes ``bench/results/transport_rules.json``.

For each object of each world and each rule, over prompts the world's captions make:

* ``paraphrase_full`` / ``paraphrase_open``: the object's paraphrase prompts (50 distinct captions that name it only
  through a paraphrase) at full strength / above 0;
* ``nontarget_open``: captions of the *other* objects (literal and paraphrased, 581 or so) above 0 — each one an
  image that would no longer be bit-identical;
* ``random_open``: 300 prompts of random whole words above 0; ``generic_open``: 20 everyday SD-style prompts.

Rules (``lo``/``hi`` placed as :class:`spm.transport.Calibration` places them, from the same seeded null):

* ``pooled:{L}``: windows of 1 … L tokens, one threshold from the null of every length pooled (what ships, L = m + 2);
* ``per_length:{L}``: windows of 1 … L tokens, each length against the null of its own length.

L is ``shipped`` (m + 2), ``m+5`` and ``8`` (m = the concept's token count).  Model synonyms (the UNet-side scan) are not
part of this: it measures what the encoder alone can separate.
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

from spm import toy  # noqa: E402
from spm import transport as T  # noqa: E402
from spm.hosts.diffusers import pipeline_transport  # noqa: E402
from spm.toy import harness  # noqa: E402
from spm.toy.evaluate import world_of  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "transport_rules.json"
LONGEST = 8
# the longest window of each rule, from the concept's token count m (the shipped one first)
LENGTHS = {"shipped": lambda m: m + T.NGRAM_EXTRA, "m+5": lambda m: m + 5, str(LONGEST): lambda m: max(m, LONGEST)}
GENERIC = ["a photo of a woman in a red dress", "portrait of an old man, oil painting", "a cat sitting on a sofa",
           "landscape with mountains and a lake at dawn", "a bowl of fruit on the table", "city street at night, neon lights",
           "a dog running on the beach", "abstract art, colorful shapes", "a bicycle leaning against the wall",
           "close up of a red rose", "a castle on the hill", "anime girl with blue hair", "a plate of pasta",
           "the ocean under a stormy sky", "a man riding a horse", "a cup of coffee and a book", "snowy forest in winter",
           "a robot in a futuristic city", "a child playing with a ball", "a bird on a branch"]


def _thresholds(null: torch.Tensor, band: float) -> tuple[float, float]:
    """``(lo, hi)`` that :class:`spm.transport.Calibration` places for this null sample and band (an unusable one:
    thresholds no similarity reaches)."""
    cal = T.Calibration.from_scores("", (), null, band, 0)
    return (cal.lo, cal.hi) if cal.usable else (2.0, 3.0)


def measure_world(model: str, n_para: int = 60, n_lit: int = 40, n_random: int = 300) -> dict:
    pipe = toy.load(model)
    tr = pipeline_transport(pipe)
    tok, ph = pipe.tokenizer, tr.phrases
    world = world_of(pipe)
    cap = harness.labels_of(world)

    def ids_of(p: str) -> list[int]:
        return list(tok(p).input_ids)

    para, captions = {}, {}
    for o in cap.OBJECTS:
        rng = np.random.default_rng(7)
        para[o] = sorted({cap.single_prompt(o, rng, i, True)[0] for i in range(n_para)})
        captions[o] = sorted({cap.single_prompt(o, rng, i, False)[0] for i in range(n_lit)}) + para[o]
    g = np.random.default_rng(99)
    words = T._whole_words()
    rand = [" ".join(tok.decode([words[i]]).strip() for i in g.integers(0, len(words), int(g.integers(3, 12))))
            for _ in range(n_random)]
    prompts = sorted({p for v in captions.values() for p in v} | set(rand) | set(GENERIC))
    wins = {p: T.all_windows(ids_of(p), LONGEST) for p in prompts}
    ph.prepare(list({w for v in wins.values() for w in v}), tr.encode_ids)

    out: dict = {"world": world.name, "prompts": {"random": len(rand), "generic": len(GENERIC)}, "objects": {}}
    for o in cap.OBJECTS:
        ce = tr.concepts.get([o], tr.encode, tr.encoder_key)[0]
        own = set(T.content_ids(ce.tokens))
        m = T.content_positions(ce.tokens, ce.embedding.shape[0])
        null = {n: [w for w in T.null_windows(n) if not set(w) & own] for n in range(1, LONGEST + 1)}
        contexts = [p + tuple(T.content_ids(ce.tokens)) for p in T.NEUTRAL_PREFIXES]
        ph.prepare([w for v in null.values() for w in v] + contexts, tr.encode_ids)
        c, c_eos = ph.concept_states(ce, m)

        def sim(w):
            return T.phrase_similarity(ph.get(w), c, ph.get_summary(w), c_eos)

        by_len = {n: torch.tensor(sorted((sim(w) for w in v), reverse=True)) for n, v in null.items()}
        band = min(sim(w) for w in contexts)
        rules = {}
        for label, L in LENGTHS.items():
            L = L(m)
            pooled = torch.cat([by_len[n] for n in range(1, L + 1)])
            shared = _thresholds(pooled, band)
            rules[f"pooled:{label}"] = {n: shared for n in range(1, L + 1)}
            rules[f"per_length:{label}"] = {n: _thresholds(by_len[n], band) for n in range(1, L + 1)}
        sims = {p: [(len(w), sim(w)) for w in wins[p] if not set(w) & own] for p in prompts}

        def score(p: str, rule: dict) -> float:
            best = 0.0
            for n, s in sims[p]:
                if n in rule:
                    lo, hi = rule[n]
                    best = max(best, min(1.0, max(0.0, (s - lo) / (hi - lo))))
            return best

        others = [p for q in cap.OBJECTS if q != o for p in captions[q]]
        row = {"tokens": m}
        for name, rule in rules.items():
            pf = [score(p, rule) for p in para[o]]
            row[name] = {"paraphrase_full": sum(s >= 1 for s in pf), "paraphrase_open": sum(s > 0 for s in pf),
                         "paraphrase": len(pf), "nontarget_open": sum(score(p, rule) > 0 for p in others),
                         "nontarget": len(others), "random_open": sum(score(p, rule) > 0 for p in rand),
                         "generic_open": [p for p in GENERIC if score(p, rule) > 0]}
        out["objects"][o] = row
    return out


def summary(worlds: dict) -> dict:
    tot: dict = {}
    for wd in worlds.values():
        for row in wd["objects"].values():
            for name, r in row.items():
                if not isinstance(r, dict):
                    continue
                t = tot.setdefault(name, {"paraphrase_full": 0, "paraphrase": 0, "nontarget_open": 0, "nontarget": 0,
                                         "random_open": 0, "generic_open": 0})
                for k in ("paraphrase_full", "paraphrase", "nontarget_open", "nontarget", "random_open"):
                    t[k] += r[k]
                t["generic_open"] += len(r["generic_open"])
    return tot


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--world", action="append", help="toy model name (repeatable; default: toy, toy2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    from spm import toy as shipped

    names = args.world or ["toy", "toy2"]
    for w in names:
        if shipped.toy_model(w) is None:
            p.error(f"--world {w}: not a shipped toy model; choose one of {', '.join(shipped.MODELS)}")
    worlds = {w: measure_world(w) for w in names}
    res = {"what": "calibrated ngram rules on the toy encoders (bench.transport_rules)", "longest": LONGEST,
           "shipped": f"pooled, windows of 1 … m + {T.NGRAM_EXTRA}", "worlds": worlds, "totals": summary(worlds),
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res if args.json else res["totals"], indent=None if args.json else 1))


if __name__ == "__main__":
    main()
