"""Why a prompt gets its Facilitated Transport strength: ``python -m spm explain`` and :func:`explain_text`.

For each membrane and each of its concepts: the metric's score, the best-matching window of the prompt (its
text and similarity), ``tokenuni``, and for the calibrated ``ngram`` metrics the concept's calibration on
this encoder — the null's quantiles, ``lo``/``hi``, the neutral-context band, and whether it came from the
membrane file or was computed here, and why.  With a gate metric (``robust``, ``membrane``: :mod:`spm.gate`),
also each membrane's gate score, the token position where it peaks, and the gate's calibration.  Hosts call
:func:`explain` (a dict) or :func:`explain_text` with their own :class:`~spm.attach.Transport`, so the
explanation is computed exactly as generation scores.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .attach import Transport
from .membrane import Membrane
from .response import membrane_ramp, stored_calibration
from .transport import (
    METRICS,
    best_window,
    calibrate,
    check_metric,
    content_ids,
    content_positions,
    is_calibrated,
    needs_phrases,
    similar_words,
    tokenuni,
    uses_gate,
    uses_response,
    vocabulary_scan,
    windows,
)


def _decode(transport: Transport, ids: Sequence[int] | None) -> str | None:
    if ids is None:
        return None
    if transport._tokenizer is None:
        from .tokenizer import clip_tokenizer

        transport._tokenizer = clip_tokenizer()
    return transport._tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def _fixed_window(transport: Transport, row: list[int], ce) -> tuple[float, tuple[int, ...] | None]:
    """The best window of the fixed ``ngram`` (windows as long as the concept, aligned per-token cosine)."""
    m = content_positions(ce.tokens, ce.embedding.shape[0])
    c = transport.phrases.unit(ce.embedding[1:1 + m])
    best, where = 0.0, None
    for w in windows(row, m):
        st = transport.phrases.get(w)
        if st is None:
            continue
        k = min(st.shape[0], m)
        s = float((st[:k] * c[:k]).sum() / m)
        if s > best:
            best, where = s, w
    return best, where


def explain(transport: Transport, membranes: Sequence[Membrane], prompt: str) -> dict[str, Any]:
    """The transport strengths of ``prompt`` for ``membranes``, concept by concept (see the module docstring).

    Encodes what it needs (the prompt, its phrase windows, the calibrations) with ``transport``'s encoder, so
    call it while the text encoder is available.  ``strength`` is ``factor × clamp(max over concepts)``,
    before the user's weight.
    """
    metric = check_metric(transport.metric)
    ctx, toks = transport.encode([prompt])
    row = list(toks[0])
    out: dict[str, Any] = {"prompt": prompt, "metric": metric, "factor": transport.factor,
                           "tokens": len(content_ids(row)), "membranes": []}
    calibrated, phrases = is_calibrated(metric), needs_phrases(metric)
    if calibrated:
        transport.prepare_calibrations(membranes)
        out["encoder_fingerprint_dim"] = (transport.phrases.fingerprint or {}).get("dim")
    for m in membranes:
        ces = transport.concepts.get(m.gate_concepts, transport.encode, transport.encoder_key) if metric != "off" else []
        if phrases and ces:
            transport.prepare_phrases([row], transport._lengths(ces))
        concepts = []
        for ce in ces:
            kw = {"phrases": transport.phrases} if phrases else {}
            score = float(METRICS[metric](ctx.detach().float().cpu(), [row], ce, **kw).clamp(0, 1)[0])
            entry: dict[str, Any] = {"concept": ce.text, "score": round(score, 6),
                                     "tokenuni": round(float(tokenuni([row], ce.tokens)[0]), 6)}
            if m.synonym_of(ce.text) is not None:  # a word the model draws as that concept (spm.train.synonyms)
                entry["synonym_of"] = m.synonym_of(ce.text)
            if calibrated:
                cal = calibrate(ce, transport.phrases, transport.encode_ids, getattr(m.info, "transport", None))
                sim, where, _ = best_window(row, ce, transport.phrases, cal.max_length)
                entry.update({"similarity": round(sim, 6), "window": _decode(transport, where),
                              "window_ids": list(where) if where else None,
                              "ngram": round(float(cal.map(torch.tensor([sim]))[0]), 6),
                              "calibration": {**{k: (round(v, 6) if isinstance(v, float) else v)
                                                 for k, v in cal.to_dict().items() if k != "quantiles"},
                                              "null_quantiles": {k: round(v, 6) for k, v in cal.quantiles.items()},
                                              "source": cal.source, "reason": cal.reason, "weak": cal.weak}})
            elif phrases:
                sim, where = _fixed_window(transport, row, ce)
                entry.update({"similarity": round(sim, 6), "window": _decode(transport, where),
                              "window_ids": list(where) if where else None})
            concepts.append(entry)
        raw = max((c["score"] for c in concepts), default=1.0)
        entry = {"name": m.name, "concepts": concepts}
        if uses_gate(metric) and ces:
            entry["gate"] = _gate_entry(transport, m, ctx, row)
            raw = max(raw, entry["gate"]["score"])
        if uses_response(metric) and ces:
            entry["response"] = _response_entry(transport, m, ctx)
            raw = max([raw] + [r["score"] for r in entry["response"]])
        entry["strength"] = round(transport.factor * min(max(raw, 0.0), 1.0), 6)
        out["membranes"].append(entry)
    return out


def vocabulary(transport: Transport, membranes: Sequence[Membrane], limit: int | None = None) -> dict[str, Any]:
    """The single vocabulary words that open each membrane's concepts (calibrated metrics only; see
    :func:`spm.transport.vocabulary_matches`; the vocabulary is encoded once for all of them): what each membrane
    acts on besides its concepts' own words.

    ``limit`` caps the words listed per concept (the count is always the full one)."""
    metric = transport.metric
    if not is_calibrated(metric):
        raise ValueError(f"--vocabulary needs a calibrated metric (ngram, ngram_tokenuni, robust); {metric!r} is not")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit {limit}: give 0 or more words per concept")
    transport.prepare_calibrations(membranes)
    pairs = [(i, ce, calibrate(ce, transport.phrases, transport.encode_ids, getattr(m.info, "transport", None)))
             for i, m in enumerate(membranes)
             for ce in transport.concepts.get(m.concepts, transport.encode, transport.encoder_key)]
    found = vocabulary_scan([(ce, cal) for _, ce, cal in pairs], transport.phrases, transport.encode_ids)  # one pass
    out: dict[str, Any] = {"metric": metric, "membranes": [{"name": m.name, "concepts": []} for m in membranes]}
    for (i, ce, cal), hits in zip(pairs, found):
        out["membranes"][i]["concepts"].append(
            {"concept": ce.text, "lo": round(cal.lo, 6), "hi": round(cal.hi, 6), "count": len(hits),
             "words": [{"word": _decode(transport, [w]), "id": w, "similarity": round(sim, 6), "strength": round(st, 6)}
                       for w, sim, st in hits[:limit]]})
    return out


def neighbour_words(transport: Transport, concepts: Sequence[str]) -> dict[str, list[str]]:
    """For each concept, the whole vocabulary words that alone open it under the default (calibrated) metric on
    ``transport``'s encoder, the closest first (what ``TrainConfig.neighbours`` trains on; the host's own metric
    setting does not matter here)."""
    ces = transport.concepts.get(list(concepts), transport.encode, transport.encoder_key)
    pairs = [(ce, calibrate(ce, transport.phrases, transport.encode_ids)) for ce in ces]
    found = vocabulary_scan(pairs, transport.phrases, transport.encode_ids)
    return {ce.text: [w for w in (_decode(transport, [i]) for i, _, _ in hits) if w] for ce, hits in zip(ces, found)}


def synonym_candidates(transport: Transport, concepts: Sequence[str], k: int, null: int, seed: int) -> dict:
    """The words the trainer's model-synonym scan tries (:mod:`spm.train.synonyms`) on ``transport``'s encoder:
    for each concept its ``k`` closest whole vocabulary words (:func:`spm.transport.similar_words`), and ``null``
    random whole words as the scan's null sample, all decoded."""
    ces = transport.concepts.get(list(concepts), transport.encode, transport.encoder_key)
    picked, rand = similar_words(ces, transport.phrases, transport.encode_ids, k, null, seed)

    def words(ids):
        return [w for w in (_decode(transport, [i]) for i in ids) if w]

    return {"candidates": {ce.text: words(p) for ce, p in zip(ces, picked)}, "null": words(rand)}


def format_vocabulary(v: dict[str, Any]) -> str:
    """The text form of :func:`vocabulary`."""
    lines = [f"single vocabulary words that open each membrane (metric {v['metric']}; the concept's own words left out)"]
    for m in v["membranes"]:
        for c in m["concepts"]:
            lines.append(f"membrane {m['name']}, concept {c['concept']!r}: {c['count']} word{'' if c['count'] == 1 else 's'}"
                         f" (similarity above lo {c['lo']:.3f}; full strength from {c['hi']:.3f})")
            lines += [f"    {w['word']!r}: similarity {w['similarity']:.3f}, strength {w['strength']:.3f}" for w in c["words"]]
            if len(c["words"]) < c["count"]:
                lines.append(f"    … and {c['count'] - len(c['words'])} more")
    return "\n".join(lines)


def _gate_entry(transport: Transport, membrane: Membrane, ctx: torch.Tensor, row: list[int]) -> dict[str, Any]:
    """The membrane gate's score of the prompt, where it peaks, and its calibration (see :mod:`spm.gate`)."""
    gate = transport.prepare_gates([membrane])[0]
    ts = gate.token_scores(ctx.detach().float().cpu())[0]
    j = int(ts.argmax()) if ts.numel() else 0
    raw = float(ts[j]) if ts.numel() else 0.0
    n = len(row)
    where = "BOS" if j == 0 else (_decode(transport, [row[j]]) if 0 < j < n - 1 else "EOS/padding (the whole prompt)")
    return {"score": round(float(gate.map(torch.tensor([raw]))[0]), 6), "raw": round(raw, 6), "position": j, "token": where,
            "calibration": {"q": round(gate.q, 6), "top": round(gate.top, 6), "lo": round(gate.lo, 6), "hi": round(gate.hi, 6),
                            "null_quantiles": {k: round(v, 6) for k, v in gate.quantiles.items()}, "samples": gate.samples,
                            "modules": len(gate.stems), "usable": gate.usable, "source": gate.source, "reason": gate.reason}}


def _response_entry(transport: Transport, membrane: Membrane, ctx: torch.Tensor) -> list[dict[str, Any]]:
    """Per concept of ``membrane``: the response gate's closure of the prompt, its score and its calibration
    (see :mod:`spm.response`); an empty list where the host runs no UNet for it."""
    responder = transport.responder
    if responder is None:
        return []
    out = []
    rule = membrane_ramp(membrane)
    for concept in membrane.info.concepts:
        gate = responder.gate(concept, stored_calibration(membrane, concept))
        if gate is None:
            continue
        closure = float(responder.closures(gate, ctx.detach())[0])
        out.append({"concept": concept, "closure": round(closure, 6),
                    "score": round(float(gate.map(torch.tensor([closure]), rule)[0]), 6),
                    "calibration": gate.to_dict(rule)})
    return out


def format_explanation(ex: dict[str, Any]) -> str:
    """The text form of :func:`explain`'s dict."""
    n = ex["tokens"]
    lines = [f"prompt: {ex['prompt']!r}  ({n} token{'' if n == 1 else 's'})   metric: {ex['metric']} x{ex['factor']:g}"]
    for m in ex["membranes"]:
        lines.append(f"membrane {m['name']}: strength {m['strength']:.3f}")
        silent = [c for c in m["concepts"] if c.get("synonym_of") and c["score"] <= 0]
        for c in m["concepts"]:
            if c in silent:  # listed below as a count: a membrane may carry dozens
                continue
            kind = f"model synonym of {c['synonym_of']!r}" if c.get("synonym_of") else "concept"
            head = f"  {kind} {c['concept']!r}: score {c['score']:.3f} (tokenuni {c['tokenuni']:.2f}"
            if "similarity" in c:
                head += f", best window {c['window']!r} similarity {c['similarity']:.3f}" if c["window"] else ", no window"
            lines.append(head + ")")
            cal = c.get("calibration")
            if cal:
                q = cal["null_quantiles"]
                lines.append(f"    calibration ({cal['source']}: {cal['reason']}): ngram {c['ngram']:.3f} = "
                             f"clamp((s - {cal['lo']:.3f}) / ({cal['hi']:.3f} - {cal['lo']:.3f}))")
                lines.append(f"    null of {cal['samples']} windows (1..{cal['max_length']} tokens): median {q.get('0.5', 0):.3f}, "
                             f"q90 {q.get('0.9', 0):.3f}, q99 {q.get('0.99', 0):.3f}, second-largest {q.get('second', 0):.3f}, "
                             f"max {q.get('max', 0):.3f}; concept in neutral context {cal['band']:.3f}"
                             + ("  [weak: the concept's own context moves it past the null margin]" if cal["weak"] else "")
                             + ("" if cal["usable"] else "  [unusable: random windows look like the concept]"))
        if silent:
            lines.append(f"  {len(silent)} model synonym{'' if len(silent) == 1 else 's'} scored 0: "
                         + ", ".join(repr(c["concept"]) for c in silent[:12]) + (" …" if len(silent) > 12 else ""))
        g = m.get("gate")
        if g:
            c = g["calibration"]
            q = c["null_quantiles"]
            lines.append(f"  gate: score {g['score']:.3f} (raw {g['raw']:.3f} at position {g['position']}, {g['token']!r}) = "
                         f"clamp((raw - {c['lo']:.3f}) / ({c['hi']:.3f} - {c['lo']:.3f}))")
            lines.append(f"    gate calibration ({c['source']}: {c['reason'] or 'computed on this encoder'}): {c['modules']} key/value "
                         f"modules; null of {c['samples']} prompts: median {q.get('0.5', 0):.3f}, q99 {q.get('0.99', 0):.3f}, "
                         f"top {c['q']:.3f}; concept's literal prompts from {c['top']:.3f}"
                         + ("" if c["usable"] else "  [unusable: the concept does not drive the membrane beyond random text]"))
        if "response" in m and not m["response"]:
            lines.append("  response gate: not available on this host (the words part alone applies)")
        for r in m.get("response") or []:
            c = r["calibration"]
            lines.append(f"  response gate {r['concept']!r}: score {r['score']:.3f} = clamp((closure {r['closure']:.3f} - "
                         f"{c['lo']:.3f}) / ({c['hi']:.3f} - {c['lo']:.3f}))")
            lines.append(f"    on {c['probe_rows']} probes of the model's own {r['concept']!r} trajectories: random words close up to "
                         f"{c['q']:.3f} (second-largest), the literal prompts from {c['top']:.3f}"
                         + ("" if c["usable"] else "  [unusable: the literal prompts do not rise above random words]"))
            if c.get("ramp") == "empty":
                lines.append(f"    ramp from the empty prompt's closure {c['empty']:.3f} (the file's rule, robust training: every "
                             "row the model draws nearer the concept than from \"\" opens a little)")
            if c.get("reason"):
                lines.append(f"    calibration: {'stored in the file' if c.get('source') == 'file' else 'computed here'}: {c['reason']}")
    return "\n".join(lines)


def explain_text(transport: Transport, membranes: Sequence[Membrane], prompt: str) -> str:
    """What the WebUI panel shows: :func:`explain` as text (one line per membrane, concept and calibration)."""
    return format_explanation(explain(transport, membranes, prompt))


__all__ = ["explain", "explain_text", "format_explanation", "format_vocabulary", "neighbour_words", "synonym_candidates",
           "vocabulary"]
