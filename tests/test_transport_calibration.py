"""The calibrated ``ngram`` (default): thresholds from the encoder's own null, windows of several lengths,
the calibration stored in the membrane file with an encoder fingerprint, and the invariants."""

import pytest
import torch

from spm.attach import MembraneStack, Transport
from spm.checkpoint import load_membrane, read_file, save_membrane
from spm.membrane import Membrane, MembraneInfo
from spm.tokenizer import clip_tokenizer
from spm.transport import (
    BOS,
    DEFAULT_METRIC,
    EOS,
    METRICS,
    NGRAM_EXTRA,
    NGRAM_HI,
    NGRAM_LO,
    Calibration,
    concept_scores,
    fingerprint_distance,
    frequent_words,
    ngram,
    null_windows,
    phrase_lengths,
)
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane

pytestmark = pytest.mark.usefixtures("one_thread")


class CausalToy:
    """A causal "encoder" with known geometry: each token id has a seeded random vector, the state at a
    position is the sum of the vectors so far (plus a common offset, which the centring must remove).
    ``override`` sets a token's vector, e.g. to make a paraphrase with a chosen cosine to the concept."""

    def __init__(self, tokenizer, dim: int = 1024, override: dict[int, torch.Tensor] | None = None):
        self.tok, self.dim, self.override = tokenizer, dim, dict(override or {})
        self.offset = torch.randn(dim, generator=torch.Generator().manual_seed(7)) * 3.0

    def vec(self, i: int) -> torch.Tensor:
        if i in self.override:
            return self.override[i]
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(10_000 + int(i))) / self.dim ** 0.5

    def states(self, ids) -> torch.Tensor:
        return torch.cumsum(torch.stack([self.vec(i) for i in ids]), 0) + self.offset

    def encode_ids(self, seqs):
        return [self.states(q) for q in seqs]

    def encode(self, texts):
        toks = [self.tok(t).input_ids for t in texts]
        out = torch.zeros(len(texts), 77, self.dim)
        for r, ids in enumerate(toks):
            content = [i for i in ids if i not in (BOS, EOS)]
            out[r, 0] = self.offset
            if content:
                out[r, 1:1 + len(content)] = self.states(content)
        return out, toks

    def transport(self, metric: str = DEFAULT_METRIC) -> Transport:
        return Transport(self.encode, encoder_key=id(self), metric=metric, encode_ids=self.encode_ids)


def _concept_only(concept: str) -> Membrane:
    return Membrane({}, MembraneInfo(concepts=[concept]), name=concept)  # transport reads only the concepts


def _id(tokenizer, word: str) -> int:
    ids = tokenizer(word).input_ids
    assert len(ids) == 3, word
    return ids[1]


def _strengths(tr: Transport, membrane, prompts):
    ctx, toks = tr.encode(prompts)
    tr.registry.record(ctx, toks)
    return tr.scores(ctx, [membrane])[:, 0]


def test_calibration_places_the_ramp_between_the_null_tail_and_the_concept():
    null = torch.linspace(-0.2, 0.6, 101)
    cal = Calibration.from_scores("c", (5,), null, band=0.99, max_length=3)
    q = float(null.sort(descending=True).values[1])  # the second-largest score
    assert cal.q == pytest.approx(q) and cal.lo == pytest.approx(q + (1 - q) / 2) and cal.hi == pytest.approx(q + 3 * (1 - q) / 4)
    s = torch.tensor([cal.lo - 1e-4, (cal.lo + cal.hi) / 2, cal.hi, 1.0])
    assert cal.map(s).tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    # the concept inside neutral context sits lower: full strength already there
    low = Calibration.from_scores("c", (5,), null, band=cal.lo + 0.01, max_length=3)
    assert low.hi == pytest.approx(cal.lo + 0.01) and not low.weak
    assert Calibration.from_scores("c", (5,), null, band=0.1, max_length=3).weak
    # an encoder whose random windows already look like the concept separates nothing by states
    assert not Calibration.from_scores("c", (5,), torch.full((50,), 0.9999), 1.0, 3).usable
    assert Calibration.from_scores("c", (5,), torch.full((50,), 0.9999), 1.0, 3).map(torch.ones(1)).item() == 0.0


def test_null_sample_is_fixed_and_model_independent():
    a, b = null_windows(2), null_windows(2)
    assert a == b and len(a) == 128 + 64 and all(len(w) == 2 for w in a)
    assert null_windows(1) != null_windows(1, seed=2)
    assert all(256 <= i < BOS for w in a for i in w)
    # the frequent-word part: the vocabulary's most frequent whole words ("and", "the", "on" are among them)
    freq = frequent_words()
    tok = clip_tokenizer()
    assert len(freq) == 512 and {tok.convert_tokens_to_ids(t) for t in ("and</w>", "the</w>", "on</w>")} <= set(freq)
    assert all(i in freq for w in a[128:] for i in w) and len(null_windows(2, n_frequent=0)) == 128
    assert phrase_lengths("ngram_tokenuni", 2) == set(range(1, 3 + NGRAM_EXTRA))
    assert phrase_lengths("ngram_fixed", 2) == {2} and phrase_lengths("clipcos", 2) == set()


def test_a_frequent_word_that_looks_like_the_concept_raises_the_null_not_the_strength(tokenizer):
    # an encoder on which "and" (in every pair prompt) encodes almost like the concept, as on toy world 2 where
    # "and" scored 0.978 against "fish": every frequent word alone is in the null, so "and" cannot open the gate
    # (the null's tail is its second-largest score, so one such word alone would be taken for an outlier: here the
    # encoder does it to several frequent words, as world 2's does)
    circle = _id(tokenizer, "circle")
    words = [_id(tokenizer, w) for w in ("and", "the", "with")]
    assert all((w,) in null_windows(1) and w in frequent_words() for w in words)
    base = CausalToy(tokenizer)
    toy = CausalToy(tokenizer, override={w: base.vec(circle) + 0.1 * base.vec(w) for w in words})
    tr = toy.transport()
    m = _concept_only("circle")
    s = _strengths(tr, m, ["circle", "a red circle", "a red square and a blue ring", "the ring with a square"])
    assert s[:2].tolist() == [1.0, 1.0]
    assert s[2:].tolist() == [0.0, 0.0]
    cal = tr.phrases.calibrations[("circle", (circle,))]
    assert cal.q > 0.9  # "and" is the null's upper tail now


def _toy2_transport() -> Transport:
    """Transport on the shipped toy world 2 text encoder (CLIP 48 wide, 3 layers), with the fast phrase encoder."""
    from spm import toy
    from spm.transport import causal_phrase_encoder

    te = toy.load("toy2").text_encoder
    tok = clip_tokenizer()

    def run(ids):
        with torch.inference_mode():
            return te(ids).last_hidden_state.clone()

    def encode(texts):
        ids = tok(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return run(ids), [tok(t).input_ids for t in texts]

    return Transport(encode, encoder_key="toy2", fast_encode_ids=causal_phrase_encoder(run))


def test_world2_frequent_words_no_longer_open_other_membranes():
    """Toy world 2's leaks (bench.erasure --transport-only before the frequent-word null): the moon membrane gave
    "fish" full strength and the fish membrane every "… and …" prompt; the sun membrane opened for "house"."""
    tr = _toy2_transport()
    cases = {"moon": ["fish", "a fish, green, on a black background"],
             "fish": ["a sun, red, and a car, yellow, on a white background", "a house, yellow, and a car, green"],
             "sun": ["house", "drawing of a house"]}
    for concept, prompts in cases.items():
        s = _strengths(tr, _concept_only(concept), [concept, f"a {concept}, red", *prompts])
        assert s[:2].tolist() == [1.0, 1.0], concept
        assert s[2:].tolist() == [0.0] * len(prompts), (concept, s)


def test_world2_paraphrases_are_reached_through_the_eos_state():
    """On toy world 2 the content states of "swimming creature with fins" and "sea animal" are no closer to "fish"
    than frequent words are (strength 0 with content states alone); their EOS states are.  Other objects stay 0."""
    tr = _toy2_transport()
    fish = _concept_only("fish")
    para = ["a trout, blue", "swimming creature with fins in red", "a sea animal on black",
            "white background, a swimming creature with fins, green"]
    other = ["a moon, red, on a white background", "a lunar shape in blue", "a car, green", "a cumulus in yellow",
             "a bloom with petals and a stem on black", "a house, yellow, and a car, green"]
    s = _strengths(tr, fish, para + other)
    assert s[:len(para)].tolist() == [1.0] * len(para), s
    assert s[len(para):].tolist() == [0.0] * len(other), s
    assert tr.phrases.eos_center is not None


def test_an_encoder_without_eos_states_is_compared_by_content_states(tokenizer):
    """A host phrase encoder of the content states only (``[m, d]``) keeps working: no EOS term."""
    toy = CausalToy(tokenizer)
    tr = toy.transport()
    s = _strengths(tr, _concept_only("circle"), ["a circle", "a red circle", "a blue square"])
    assert s.tolist() == [1.0, 1.0, 0.0]
    assert tr.phrases.eos_center is None and not tr.phrases._eos


def test_separation_the_fixed_mapping_throws_away_is_used(tokenizer):
    """The issue's case: a paraphrase well above the encoder's own null but below the fixed 0.85."""
    toy = CausalToy(tokenizer)
    sun, para = _id(tokenizer, "sun"), _id(tokenizer, "star")
    v = toy.vec(sun)
    u = toy.vec(para) - (toy.vec(para) @ v) / (v @ v) * v
    toy.override[para] = 0.81 * v + (0.19 * (2 - 0.19)) ** 0.5 * u * (v.norm() / u.norm())  # cosine 0.81 with "sun"
    unet = tiny_diffusers_unet()
    m = random_membrane(unet, "m", concepts=("sun",))
    tr = toy.transport("ngram")
    cal = tr.prepare_calibrations([m])[0]
    ce = tr.concepts.get(["sun"], tr.encode, tr.encoder_key)[0]
    tr.prepare_phrases([tokenizer("a star").input_ids], [1])
    s = float((tr.phrases.get((para,))[0] * tr.phrases.unit(ce.embedding[1:2])[0]).sum())
    assert cal.hi < s < NGRAM_LO  # the precondition of this test: the fixed mapping gives 0 here
    got = _strengths(tr, m, ["a star in the sky", "a red car on a road"])
    assert got.tolist() == [1.0, 0.0]
    fixed = toy.transport("ngram_fixed")
    assert _strengths(fixed, m, ["a star in the sky"]).tolist() == [0.0]


def test_a_paraphrase_longer_than_the_concept_is_reachable(tokenizer):
    """"sun" as the sum of "shining" and "star": no single token is near it, the 2-token window is."""
    toy = CausalToy(tokenizer)
    sun, shining, star = (_id(tokenizer, w) for w in ("sun", "shining", "star"))
    toy.override[sun] = toy.vec(shining) + toy.vec(star)
    m = random_membrane(tiny_diffusers_unet(), "m", concepts=("sun",))
    prompt = ["a shining star with rays"]
    assert _strengths(toy.transport("ngram_fixed"), m, prompt).tolist() == [0.0]  # windows of 1 token only
    assert _strengths(toy.transport("ngram"), m, prompt).tolist() == [1.0]


def test_invariants_literal_full_unrelated_exactly_zero_and_bit_identical(encode, tokenizer):
    """On a real (random-weight) CLIP text encoder: a literal mention gets full strength from ``ngram`` alone,
    prompts of random words that share nothing with the concept get exactly 0, and their UNet outputs are
    bit-identical with the membrane attached."""
    unet = tiny_diffusers_unet(ctx=32)
    m = random_membrane(unet, "m", concepts=("circle",))
    tr = Transport(encode, metric="ngram")
    literal = ["circle", "a photo of a circle on a table", "red circle, white background"]
    assert _strengths(tr, m, literal).tolist() == [1.0, 1.0, 1.0]
    g = torch.Generator().manual_seed(99)  # not the null's seed: an out-of-sample check
    words = ["house", "river", "music", "bread", "garden", "winter", "doctor", "paper", "engine", "forest",
             "window", "silver", "market", "letter", "castle", "bottle", "planet", "jacket"]
    prompts = [" ".join(words[i] for i in torch.randint(0, len(words), (6,), generator=g).tolist()) for _ in range(12)]
    got = _strengths(tr, m, prompts)
    assert got.tolist() == [0.0] * len(prompts)
    stack = MembraneStack(unet)
    ctx, toks = encode(prompts[:2])
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.full((2,), 500)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ctx).sample
        stack.add(m)
        stack.set_transport(tr)
        after = unet(x, t, encoder_hidden_states=ctx).sample
    stack.detach()
    assert torch.equal(before, after)


def test_steady_scoring_encodes_nothing(encode):
    calls = []

    def counting(seqs):
        calls.append(len(seqs))
        return Transport(encode)._decode_and_encode(seqs)

    m = random_membrane(tiny_diffusers_unet(ctx=32), "m", concepts=("circle",))
    tr = Transport(encode, metric="ngram_tokenuni", encode_ids=counting)
    ctx, toks = encode(["a red circle", "a blue square on a table"])
    tr.registry.record(ctx, toks)
    first = tr.scores(ctx, [m])
    n = len(calls)
    assert n > 0
    for _ in range(3):
        assert torch.equal(tr.scores(ctx, [m]), first)
    assert len(calls) == n  # steady: cached windows, cached best scores, cached calibration


def test_the_fixed_metric_keeps_its_formula(encode):
    m = random_membrane(tiny_diffusers_unet(ctx=32), "m", concepts=("cat",))
    tr = Transport(encode, metric="ngram_fixed_tokenuni")
    ctx, toks = encode(["a photo of a dog", "a cat"])
    s = tr.scores(ctx, [m], toks)[:, 0]
    ce = tr.concepts.get(["cat"], encode, None)[0]
    want = torch.maximum(ngram(toks, ce, tr.phrases, NGRAM_LO, NGRAM_HI), METRICS["tokenuni"](ctx, toks, ce))
    assert s.tolist() == want.tolist()
    assert concept_scores(ctx, toks, [ce], "ngram_fixed", phrases=tr.phrases).tolist() == ngram(toks, ce, tr.phrases).tolist()


def test_calibration_is_stored_reused_on_the_same_encoder_and_recomputed_on_another(tmp_path):
    from spm.hosts.diffusers import PipelineMembranes, transport_calibration
    from tests.test_train_models import tiny_sd_pipe

    pipe = tiny_sd_pipe()
    m = random_membrane(pipe.unet, "sun", concepts=("sun",))
    path = tmp_path / "sun.safetensors"
    save_membrane(m, path)  # no calibration in the file: computed on first use
    pm = PipelineMembranes(pipe, [(load_membrane(path), 1.0)])
    try:
        cal = pm.transport.prepare_calibrations([load_membrane(path)])[0]
        assert cal.source == "computed" and "no transport calibration" in cal.reason
    finally:
        pm.close()

    m.info.transport = transport_calibration(pipe, ["sun"])
    save_membrane(m, path)
    meta = read_file(path)[1]
    assert "spm_transport" in meta and meta["prompts"] == "sun"  # reference keys untouched
    loaded = load_membrane(path)
    assert loaded.info.transport["concepts"]["sun"]["lo"] == pytest.approx(cal.lo)
    with PipelineMembranes(pipe, [(loaded, 1.0)]) as pm:
        used = pm.transport.prepare_calibrations([loaded])[0]
    assert used.source == "file" and (used.lo, used.hi) == pytest.approx((cal.lo, cal.hi))

    with torch.no_grad():  # a fine-tune that retrained the text encoder
        for p in pipe.text_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with PipelineMembranes(pipe, [(loaded, 1.0)]) as pm:
        redo = pm.transport.prepare_calibrations([loaded])[0]
        fp = pm.transport.phrases.fingerprint
    assert redo.source == "computed" and "differs" in redo.reason
    assert fingerprint_distance(fp, loaded.info.transport["fingerprint"]) > 0.01


def test_trainer_writes_the_calibration(tmp_path):
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer
    from tests.test_train import FAST
    from tests.test_train_models import tiny_sd_pipe

    pipe = tiny_sd_pipe()
    out = tmp_path / "circle.safetensors"
    Trainer(DiffusersBackend(pipe), TrainConfig(targets=["circle"], iterations=1, **FAST), out, progress_bar=False).train()
    loaded = load_membrane(out)
    # the concept and its model synonyms (spm/train/synonyms.py), each calibrated once at training time
    assert set(loaded.info.transport["concepts"]) == {"circle", *loaded.synonyms.get("circle", [])}
    assert set(loaded.gate_concepts) == set(loaded.info.transport["concepts"])
    from spm.hosts.diffusers import PipelineMembranes

    with PipelineMembranes(pipe, [(loaded, 1.0)]) as pm:
        assert pm.transport.prepare_calibrations([loaded])[0].source == "file"
