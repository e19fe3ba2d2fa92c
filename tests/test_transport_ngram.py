"""The ``ngram`` transport metrics: context-free phrase states of the prompt's windows against the concept
(the fixed-threshold ``ngram_fixed``; the calibrated default is tested in test_transport_calibration.py)."""

import pytest
import torch
import torch.nn.functional as F

from spm.attach import MembraneStack, Transport
from spm.transport import (
    NGRAM_BANK,
    NGRAM_HI,
    NGRAM_LO,
    ConceptEmbedding,
    PhraseCache,
    concept_scores,
    needs_phrases,
    ngram,
    windows,
)
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane

BOS, EOS = 49406, 49407


def test_windows_keep_order_drop_specials_and_repeats():
    ids = [BOS, 5, 6, 7, 5, 6, EOS, EOS, EOS]
    assert windows(ids, 1) == [(5,), (6,), (7,)]
    assert windows(ids, 2) == [(5, 6), (6, 7), (7, 5)]
    assert windows([BOS, 9, EOS], 3) == [(9,)]  # shorter than the concept: the whole content
    assert windows(None, 1) == [] and windows([BOS, EOS], 1) == []


def _fake_encoder(table: dict[int, torch.Tensor], calls: list):
    def encode_ids(seqs):
        calls.append(list(seqs))
        return [torch.stack([table[i] for i in q]) for q in seqs]

    return encode_ids


def test_phrase_cache_encodes_each_window_once_and_normalises():
    table = {1: torch.tensor([3.0, 4.0]), 2: torch.tensor([0.0, 2.0])}
    calls: list = []
    pc = PhraseCache(batch=1, bank=0)  # no centring bank: the fake encoder knows only two tokens
    assert pc.prepare([(1,), (2,), (1,)], _fake_encoder(table, calls)) == 2
    assert pc.prepare([(1,), (2,)], _fake_encoder(table, calls)) == 0
    assert calls == [[(1,)], [(2,)]]  # batch 1: two calls, nothing twice
    assert torch.allclose(pc.get((1,)), torch.tensor([[0.6, 0.8]]))
    assert pc.get((3,)) is None


def _concept(text: str, vec: torch.Tensor, token: int) -> ConceptEmbedding:
    emb = torch.zeros(77, vec.shape[0])
    emb[1] = vec
    return ConceptEmbedding(text, emb, [BOS, token, EOS])


@pytest.mark.parametrize("cos", [1.0, 0.97, NGRAM_HI, 0.93, NGRAM_LO, 0.5, -0.2])
def test_ngram_maps_the_best_window_cosine_through_the_calibration(cos):
    concept_vec = torch.tensor([1.0, 0.0])
    other = torch.tensor([cos, (1 - cos**2) ** 0.5])
    table = {10: concept_vec, 11: other, 12: torch.tensor([0.0, 1.0])}
    pc = PhraseCache(bank=0)
    pc.prepare([(11,), (12,)], _fake_encoder(table, []))
    ce = _concept("c", concept_vec, 10)
    got = ngram([[BOS, 12, 11, EOS]], ce, pc)
    want = min(max((cos - NGRAM_LO) / (NGRAM_HI - NGRAM_LO), 0.0), 1.0)
    assert got.item() == pytest.approx(want, abs=1e-5)


def test_ngram_unprepared_windows_and_unknown_rows_score_zero():
    ce = _concept("c", torch.tensor([1.0, 0.0]), 10)
    assert ngram([[BOS, 11, EOS], None], ce, PhraseCache()).tolist() == [0.0, 0.0]
    for metric in ("ngram", "ngram_fixed"):
        with pytest.raises(ValueError, match="phrase states"):
            concept_scores(torch.zeros(1, 77, 2), [[BOS, 11, EOS]], [ce], metric)  # no phrases given


def test_needs_phrases():
    assert needs_phrases("ngram") and needs_phrases("ngram_tokenuni") and needs_phrases("ngram_fixed")
    assert not needs_phrases("clipcos") and not needs_phrases("tokenuni") and not needs_phrases("nonexistent")


def test_transport_ngram_on_a_real_encoder(encode, tokenizer):
    """The fixed-threshold ``ngram_fixed`` (the previous default): a literal mention scores 1 (the word encoded alone is the concept's own state); window states are the
    host's encoding of the decoded window, centred on the mean state of the random-token bank."""
    tr = Transport(encode, metric="ngram_fixed")
    prompts = ["a photo of a cat on a sofa", "a red car"]
    ctx, toks = encode(prompts)
    concept = tr.concepts.get(["cat"], encode, None)[0]
    s = concept_scores(ctx, toks, [concept], "ngram_fixed", phrases=tr.phrases)
    assert s.tolist() == [0.0, 0.0]  # nothing prepared yet: never encodes by itself
    tr.prepare_phrases(toks, [1])
    # the centre: the mean position-1 state of NGRAM_BANK seeded random regular tokens, each encoded alone
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(256, BOS, (NGRAM_BANK,), generator=g).tolist()
    texts = [tokenizer.decode([i], clean_up_tokenization_spaces=False).strip() for i in bank]
    assert torch.allclose(tr.phrases.center, encode(texts)[0][:, 1].mean(0), atol=1e-5)
    s = concept_scores(ctx, toks, [concept], "ngram_fixed", phrases=tr.phrases)
    assert s[0].item() == pytest.approx(1.0, abs=1e-5)
    c = tr.phrases.unit(concept.embedding[1:2])[0]
    cos = []
    for word in ("a", "red", "car"):
        state = encode([word])[0][0, 1]
        want = F.normalize(state - tr.phrases.center, dim=-1)
        assert torch.allclose(tr.phrases.get((tokenizer(word).input_ids[1],))[0], want, atol=1e-5)
        cos.append(float(want @ c))
    want_s = min(max((max(cos) - NGRAM_LO) / (NGRAM_HI - NGRAM_LO), 0.0), 1.0)
    assert s[1].item() == pytest.approx(want_s, abs=1e-4)


def test_transport_lazy_vs_prepared_and_tokenuni_fallback(encode):
    unet = tiny_diffusers_unet()
    prompts = ["a cat", "a dog"]
    ctx, toks = encode(prompts)
    m = random_membrane(unet, "m", concepts=("cat",))
    lazy = Transport(encode, metric="ngram_tokenuni")
    lazy.registry.record(ctx, toks)
    assert lazy.scores(ctx, [m])[0, 0].item() == pytest.approx(1.0)
    assert len(lazy.phrases) > 0  # encoded on demand
    eager = Transport(encode, metric="ngram_tokenuni", lazy_phrases=False)
    eager.registry.record(ctx, toks)
    s = eager.scores(ctx, [m])
    assert s[0, 0].item() == 1.0 and s[1, 0].item() == 0.0  # tokenuni still sees the literal word
    assert len(eager.phrases) == 0  # nothing encoded inside scores()
    assert eager.prepare_calibrations([m])[0].source == "computed"  # hosts calibrate before sampling
    assert eager.prepare_phrases() > 0  # every recorded row, for the window lengths of the concepts known
    assert eager.scores(ctx, [m]).tolist() == lazy.scores(ctx, [m]).tolist()
    stack = MembraneStack(unet)
    stack.add(m)
    stack.set_transport(eager)
    stack.detach()


def test_webui_transport_escapes_prompt_syntax():
    from spm.webui.runtime import RowWeightTransport

    tr = RowWeightTransport(lambda texts: (torch.zeros(len(texts), 77, 4), [[] for _ in texts]), None)
    assert tr.phrase_text("a (b) [c] \\ d") == "a \\(b\\) \\[c\\] \\\\ d"
    assert tr.lazy_phrases is False



def test_a_second_vocabulary_scan_for_the_same_concept_encodes_nothing():
    """A training job's neighbour scan and its model-synonym scan both read the vocabulary's similarities to the
    concept: the second reads them from the phrase cache (a real WebUI read 32 000 words twice, minutes each), with
    the same values; another word list, another concept or a cleared cache encodes again."""
    from spm.transport import similar_words, vocabulary_similarity

    g = torch.Generator().manual_seed(0)
    table = {i: torch.randn(4, generator=g) for i in range(20, 40)}
    calls: list = []
    enc = _fake_encoder(table, calls)
    pc = PhraseCache(bank=0)
    ce = _concept("c", table[20], 20)
    words = list(range(21, 40))
    ids, first = vocabulary_similarity([ce], pc, enc, words)
    n = len(calls)
    assert n > 0 and ids == words
    ids2, again = vocabulary_similarity([ce], pc, enc, words)
    assert len(calls) == n and torch.equal(first[0], again[0])  # nothing encoded the second time
    picked, _ = similar_words([ce], pc, enc, k=3, null=2, words=words)
    assert len(calls) == n and picked[0] == [words[j] for j in first[0].argsort(descending=True)[:3].tolist()]
    vocabulary_similarity([ce], pc, enc, words[:5])  # another word list
    assert len(calls) > n
    m = len(calls)
    vocabulary_similarity([_concept("d", table[21], 21)], pc, enc, words)  # another concept
    assert len(calls) > m
    pc.clear()
    m = len(calls)
    vocabulary_similarity([ce], pc, enc, words)
    assert len(calls) > m


def test_the_vocabulary_pass_reports_its_count_to_the_total():
    """``VOCABULARY_PROGRESS`` sees the words read before each batch and, once all are read, the total (a real Forge
    showed 32000/32230 as the neighbour scan's last count); a pass the cache answers reports nothing."""
    from spm.transport import VOCABULARY_PROGRESS, vocabulary_similarity

    g = torch.Generator().manual_seed(0)
    table = {i: torch.randn(4, generator=g) for i in range(20, 40)}
    pc, ce, words = PhraseCache(bank=0), _concept("c", table[20], 20), list(range(21, 40))
    seen: list = []
    token = VOCABULARY_PROGRESS.set(lambda done, total: seen.append((done, total)))
    try:
        vocabulary_similarity([ce], pc, _fake_encoder(table, []), words, batch=8)
        assert seen == [(0, 19), (8, 19), (16, 19), (19, 19)]
        seen.clear()
        vocabulary_similarity([ce], pc, _fake_encoder(table, []), words, batch=8)
        assert seen == []
    finally:
        VOCABULARY_PROGRESS.reset(token)
