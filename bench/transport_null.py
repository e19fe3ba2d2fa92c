"""The default transport on several text encoders: its calibration, literal and random-text strengths, and on
the shipped toy encoder the strengths of the ``spm eval`` prompt suites.

``python -m bench.transport_null --json`` prints one JSON object and writes ``bench/results/transport_null.json``.

* Encoders: the shipped toy text encoder (64 wide, 2 layers, trained), and CLIP text encoders with random
  weights, 32 × 2, 64 × 2 and CLIP-L-sized 768 × 12 (``--encoders``).  Random weights hold no semantics, so
  only the invariants that need none are measured there: literal prompts get full strength, prompts of random
  words that share no token with the concept get 0 (out of sample: another seed than the calibration's null).
* For each encoder and concept, the calibrated ``ngram`` (without ``tokenuni``, so literal strength is the
  metric's own) and the fixed-threshold ``ngram_fixed`` (the previous default).
* Toy encoder only: literal / paraphrase / non-target / mixed prompt strengths of ``ngram_tokenuni`` and
  ``ngram_fixed_tokenuni`` per object (min, mean, max, number non-zero).
* Both toy worlds (with ``toy`` in ``--encoders``, unless ``--no-vocabulary``): every whole vocabulary word that
  alone opens each object's membrane, split into the world's own caption words and unrelated ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spm.attach import Transport  # noqa: E402
from spm.membrane import Membrane, MembraneInfo  # noqa: E402
from spm.tokenizer import clip_tokenizer  # noqa: E402
from spm.transport import _whole_words, causal_phrase_encoder, content_ids  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "transport_null.json"
CONCEPTS = ["circle", "star", "heart", "sun", "house", "fish", "van gogh", "ice cream"]
ENCODERS = {"toy": None, "random_32x2": (32, 2, 4), "random_64x2": (64, 2, 4), "random_768x12": (768, 12, 12)}


def _clip(width: int, layers: int, heads: int, seed: int = 1) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def _transport(te: torch.nn.Module, metric: str, key: str) -> Transport:
    tok = clip_tokenizer()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return te(ids).last_hidden_state.clone()

    def encode(texts: list[str]):
        ids = tok(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return run(ids), [tok(t).input_ids for t in texts]

    return Transport(encode, encoder_key=key, metric=metric, fast_encode_ids=causal_phrase_encoder(run))


def _membrane(concept: str) -> Membrane:
    return Membrane({}, MembraneInfo(concepts=[concept]), name=concept)  # transport reads only the concepts


def _stats(s: torch.Tensor) -> dict:
    return {"min": round(float(s.min()), 3), "mean": round(float(s.mean()), 3), "max": round(float(s.max()), 3),
            "nonzero": int((s > 0).sum()), "n": int(s.numel())}


def random_prompts(n: int, words: int = 8, seed: int = 12345) -> list[str]:
    """Prompts of random whole words of the CLIP vocabulary (another seed than the calibration's null)."""
    tok = clip_tokenizer()
    vocab = _whole_words()
    g = torch.Generator().manual_seed(seed)
    return [" ".join(tok.decode([vocab[i]]).strip() for i in torch.randint(0, len(vocab), (words,), generator=g).tolist())
            for _ in range(n)]


def measure_encoder(name: str, te: torch.nn.Module, n_random: int) -> dict:
    tok = clip_tokenizer()
    rand = random_prompts(n_random)
    out: dict = {"width": te.config.hidden_size, "layers": te.config.num_hidden_layers, "random_prompts": n_random,
                 "concepts": {}}
    for metric in ("ngram", "ngram_fixed"):
        tr = _transport(te, metric, name)
        for c in CONCEPTS:
            cids = set(content_ids(tok(c).input_ids))
            lit = [c, f"a photo of a {c}", f"a red {c} on a white background"]
            nul = [p for p in rand if not set(content_ids(tok(p).input_ids)) & cids]
            ctx, toks = tr.encode(lit + nul)
            s = tr.scores(ctx, [_membrane(c)], toks)[:, 0]
            e = out["concepts"].setdefault(c, {})
            e[metric] = {"literal_min": round(float(s[:3].min()), 3), "random_nonzero": int((s[3:] > 0).sum()),
                         "random": len(nul)}
            if metric == "ngram":
                cal = tr.phrases.calibrations[(c, tuple(content_ids(tok(c).input_ids)))]
                e["calibration"] = {"q": round(cal.q, 3), "lo": round(cal.lo, 3), "hi": round(cal.hi, 3),
                                    "band": round(cal.band, 3), "weak": cal.weak, "usable": cal.usable,
                                    "null_quantiles": {k: round(v, 3) for k, v in cal.quantiles.items()}}
    for metric in ("ngram", "ngram_fixed"):
        lit_ok = sum(v[metric]["literal_min"] == 1.0 for v in out["concepts"].values())
        nz = sum(v[metric]["random_nonzero"] for v in out["concepts"].values())
        tot = sum(v[metric]["random"] for v in out["concepts"].values())
        out[f"summary_{metric}"] = {"concepts_with_full_literal": lit_ok, "concepts": len(CONCEPTS),
                                    "random_prompt_activations": nz, "random_prompt_pairs": tot}
    return out


def toy_suites() -> dict:
    """Strengths of the ``spm eval`` prompt suites on the shipped toy encoder, per object."""
    from spm.toy import captions, harness
    from spm.toy.model import load_toy_pipeline

    te = load_toy_pipeline("base").text_encoder
    out: dict = {}
    for metric in ("ngram_tokenuni", "ngram_fixed_tokenuni"):
        tr = _transport(te, metric, "toy")
        for o in captions.OBJECTS:
            suite = harness.prompt_suite(o)
            row = {}
            for kind in ("literal", "paraphrase", "nontarget", "mixed"):
                ctx, toks = tr.encode([c.prompt for c in suite[kind]])
                row[kind] = _stats(tr.scores(ctx, [_membrane(o)], toks)[:, 0])
            out.setdefault(o, {})[metric] = row
    return out


def toy_vocabulary(models: tuple[str, ...] = ("toy", "toy2"), objects: list[str] | None = None) -> dict:
    """On each toy world's encoder, every whole word of the CLIP vocabulary (about 32 000) that alone opens each
    object's membrane (:func:`spm.transport.vocabulary_matches`, the default metric): split into the world's own
    caption words (object names and paraphrases: trained synonyms, expected) and every other word (unrelated:
    an image that changes without reason)."""
    import importlib

    from spm import toy
    from spm.explain import vocabulary
    from spm.hosts.diffusers import pipeline_transport

    out: dict = {}
    for name in models:
        model = toy.MODELS[name]
        pipe = toy.load(name)
        caps = importlib.import_module("spm.toy.captions_icons" if model.world == "icons" else "spm.toy.captions")
        tok = pipe.tokenizer
        world_ids = {i for o in caps.OBJECTS for p in (o, *caps.PARAPHRASES[o]) for i in tok(p).input_ids[1:-1]}
        tr = pipeline_transport(pipe)
        objs, n_words = list(objects or caps.OBJECTS), len(_whole_words())
        voc = vocabulary(tr, [_membrane(o) for o in objs])  # the vocabulary is encoded once for every object
        rows = {}
        for o, m in zip(objs, voc["membranes"]):
            (c,) = m["concepts"]
            rows[o] = {"world_words": [w["word"] for w in c["words"] if w["id"] in world_ids],
                       "other_words": [w["word"] for w in c["words"] if w["id"] not in world_ids]}
        out[name] = {"world": model.world, "words_scanned": n_words, "objects": rows,
                     "other_word_pairs": sum(len(r["other_words"]) for r in rows.values()),
                     "pairs": n_words * len(rows)}
        print(f"vocabulary {name}: {out[name]['other_word_pairs']} unrelated word-object pairs of {out[name]['pairs']}",
              file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transport_null", description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma-separated, of {', '.join(ENCODERS)}")
    ap.add_argument("--random-prompts", type=int, default=40, help="random-word prompts per concept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-vocabulary", dest="vocabulary", action="store_false",
                    help="skip the whole-vocabulary scan on both toy worlds (about 2 minutes)")
    ap.add_argument("--json", action="store_true", help="print the JSON (it is always written to the results file)")
    ap.add_argument("-o", "--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    names = [n.strip() for n in args.encoders.split(",") if n.strip()]
    bad = [n for n in names if n not in ENCODERS]
    if bad:
        print(f"error: unknown encoder {bad[0]!r}; choose from {', '.join(ENCODERS)}", file=sys.stderr)
        return 2
    result: dict = {"encoders": {}, "threads": args.threads}
    for n in names:
        if n == "toy":
            from spm.toy.model import load_toy_pipeline

            te = load_toy_pipeline("base").text_encoder
        else:
            te = _clip(*ENCODERS[n])
        result["encoders"][n] = measure_encoder(n, te, args.random_prompts)
        print(f"{n}: {result['encoders'][n]['summary_ngram']}", file=sys.stderr, flush=True)
    if "toy" in names:
        result["toy_suites"] = toy_suites()
        if args.vocabulary:
            result["toy_vocabulary"] = toy_vocabulary()
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
