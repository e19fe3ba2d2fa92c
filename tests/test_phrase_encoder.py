"""The unpadded phrase-window encoder: exact against the padded 77-token path on SD1- and SDXL-shaped
pipelines, and a host whose encoding differs keeps the exact path."""

import pytest
import torch

from spm.attach import Transport
from spm.hosts.diffusers import PipelineMembranes, phrase_encoder
from spm.transport import checked_phrase_encoder
from tests.test_train_models import tiny_sd_pipe, tiny_sdxl_pipe

SEQS = [(320,), (736, 7117), (320, 736, 7117, 5994), (3989,)]  # "a", "red circle", "a red circle background", "cats"


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_fast_windows_equal_the_padded_encoding(kind):
    pipe = tiny_sd_pipe() if kind == "sd1" else tiny_sdxl_pipe()
    pm = PipelineMembranes(pipe, [])
    try:
        exact = pm.transport._decode_and_encode(SEQS)
        fast = phrase_encoder(pipe)(SEQS)
        for e, f, q in zip(exact, fast, SEQS):
            assert f.shape == e.shape == (len(q) + 1, e.shape[-1])  # the content states, then the EOS
            torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)
    finally:
        pm.close()


def _counting(fn):
    calls = []

    def wrapped(seqs):
        calls.append(len(seqs))
        return fn(seqs)

    return wrapped, calls


def test_checked_encoder_uses_the_fast_path_only_when_it_matches():
    ref = lambda seqs: [torch.arange(len(q) * 4, dtype=torch.float32).reshape(len(q), 4) for q in seqs]  # noqa: E731
    good, good_calls = _counting(lambda seqs: [r + 1e-7 for r in ref(seqs)])
    ref_counted, ref_calls = _counting(ref)
    enc = checked_phrase_encoder(good, ref_counted)
    enc(SEQS)
    enc(SEQS)
    assert ref_calls == [1]  # only the one-probe check
    assert good_calls == [1, len(SEQS), len(SEQS)]

    bad, bad_calls = _counting(lambda seqs: [r + 1.0 for r in ref(seqs)])
    ref_counted, ref_calls = _counting(ref)
    enc = checked_phrase_encoder(bad, ref_counted)
    out = enc(SEQS)
    enc(SEQS)
    assert bad_calls == [1]
    assert ref_calls == [1, len(SEQS), len(SEQS)]
    assert torch.equal(out[2], ref(SEQS)[2])


def test_a_fast_path_that_raises_falls_back(caplog):
    def broken(seqs):
        raise RuntimeError("no raw ids here")

    ref = lambda seqs: [torch.ones(len(q), 3) for q in seqs]  # noqa: E731
    enc = checked_phrase_encoder(broken, ref)
    assert [t.shape for t in enc(SEQS)] == [(len(q), 3) for q in SEQS]


def test_transport_scores_are_the_same_with_the_fast_path():
    pipe = tiny_sd_pipe()
    pm = PipelineMembranes(pipe, [])
    try:
        from tests.helpers import random_membrane

        m = random_membrane(pipe.unet, "m", concepts=("circle",))
        prompts = ["a red circle on a white background", "a blue square", "circle"]
        ctx, toks = pm.transport.encode(prompts)
        scores = []
        for fast in (None, phrase_encoder(pipe)):
            tr = Transport(pm.transport.encode, encoder_key="t", metric="ngram", fast_encode_ids=fast)
            tr.registry.record(ctx, toks)
            scores.append(tr.scores(ctx, [m]))
        torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=0)
    finally:
        pm.close()


def test_reference_path_gives_no_eos_row_when_decoding_changed_the_tokens():
    """If a window re-tokenises to another length, its EOS position is unknown: the exact path returns content
    states only, and never ``len(window) + 1`` rows, which the phrase cache would read as content + EOS."""
    def encode(texts):  # every text re-tokenises to two content tokens
        ids = [[49406, 320, 321, 49407] for _ in texts]
        return torch.arange(len(texts) * 77 * 4, dtype=torch.float32).reshape(len(texts), 77, 4), ids

    tr = Transport(encode)
    one, three = tr._decode_and_encode([(320,), (320, 736, 7117)])
    assert one.shape[0] == 1 and three.shape[0] == 2
    two, = tr._decode_and_encode([(320, 736)])  # same length: content states, then the EOS
    assert two.shape[0] == 3
