import pytest
import torch

from spm.attach import MembraneStack, Transport
from spm.transport import METRICS, ConceptCache, RowRegistry, clipcos, concept_scores, tokenuni
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane


def test_clipcos_is_flattened_full_sequence_cosine(encode):
    p, _ = encode(["a photo of a cat", "a red car"])
    e, _ = encode(["cat"])
    hand = [float((a.flatten() @ e[0].flatten()) / (a.flatten().norm() * e[0].flatten().norm())) for a in p]
    assert clipcos(p, e[0]).tolist() == pytest.approx(hand, abs=1e-6)


def test_clipcos_long_prompt_takes_best_chunk(encode):
    p, _ = encode(["a red car", "a photo of a cat"])
    e, _ = encode(["cat"])
    long = torch.cat([p[0], p[1]], 0)[None]  # 154 tokens as A1111 builds them
    assert clipcos(long, e[0]).item() == pytest.approx(max(clipcos(p, e[0]).tolist()), abs=1e-6)


def test_tokenuni_by_hand(tokenizer):
    def ids(s):
        return tokenizer(s).input_ids

    assert tokenuni([ids("a painting by van gogh"), ids("a van on a road"), ids("a dog")], ids("van gogh")).tolist() == [1.0, 0.5, 0.0]


def test_combined_metric_and_strength(encode, tokenizer):
    unet = tiny_diffusers_unet()
    prompts = ["a photo of a cat", "a dog in snow"]
    ctx, toks = encode(prompts)
    tr = Transport(encode, metric="clipcos_tokenuni", factor=1.5)
    tr.registry.record(ctx, toks)
    stack = MembraneStack(unet)
    m = random_membrane(unet, "m", concepts=("cat", "lion"))
    stack.add(m, weight=0.8)
    stack.set_transport(tr)
    s = stack.strengths_for(ctx)
    ce, ct = encode(["cat", "lion"])
    cc = torch.stack([clipcos(ctx, ce[0]), clipcos(ctx, ce[1])]).amax(0)
    tu = torch.stack([tokenuni(toks, ct[0]), tokenuni(toks, ct[1])]).amax(0)
    expect = 0.8 * 1.5 * torch.maximum(cc, tu).clamp(0, 1)
    assert s[:, 0].tolist() == pytest.approx(expect.tolist(), abs=1e-6)
    assert s[0, 0].item() == pytest.approx(0.8 * 1.5)  # "cat" in the prompt: tokenuni 1


def test_off_metric_is_one(encode):
    ctx, toks = encode(["anything"])
    assert concept_scores(ctx, toks, [], "off").tolist() == [1.0]
    assert set(METRICS) >= {"clipcos", "tokenuni", "clipcos_tokenuni", "off"}
    with pytest.raises(ValueError, match="unknown transport metric"):
        concept_scores(ctx, toks, ["x"], "nope")


def test_concept_cache_encodes_once(encode):
    calls = []

    def counting(texts):
        calls.append(list(texts))
        return encode(texts)

    cache = ConceptCache()
    cache.get(["cat", "dog"], counting, "k")
    cache.get(["dog", "cat"], counting, "k")
    assert calls == [["cat", "dog"]]
    cache.get(["cat"], counting, "other-model")
    assert len(calls) == 2


def test_registry_matches_rows_any_order_and_dtype(encode):
    ctx, toks = encode(["a cat", "a dog", "snow"])
    reg = RowRegistry()
    reg.record(ctx, toks)
    batch = torch.cat([ctx[2:3], ctx[0:1], torch.randn(1, 77, 32)])
    assert reg.lookup(batch) == [toks[2], toks[0], None]
    assert reg.lookup(ctx.half())[:2] == toks[:2]


def test_tokenwin_matches_concept_inside_prompt(encode):
    from spm.transport import ConceptEmbedding, tokenwin

    ctx, toks = encode(["cat", "a photo of a dog", "a photo of a cat"])
    ce = ConceptEmbedding("cat", ctx[0], toks[0])
    s = tokenwin(ctx, toks, ce)
    assert s[0].item() == pytest.approx(1.0, abs=1e-5)  # the concept itself
    # the windows compare content tokens only: exactly the per-token cosine at the best position
    p = torch.nn.functional.normalize(ctx[2, 1:6], dim=-1) @ torch.nn.functional.normalize(ctx[0, 1], dim=-1)
    assert s[2].item() == pytest.approx(p.max().item(), abs=1e-5)
    assert tokenwin(ctx, [None, None, None], ce).tolist() == pytest.approx(clipcos(ctx, ctx[0]).tolist(), abs=1e-6)
