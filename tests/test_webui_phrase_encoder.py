"""The WebUI hosts' fast phrase-window encoder: unpadded windows through the WebUI's own
``encode_with_transformers``, used only after it matched the exact (padded ``get_learned_conditioning``) path."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_membrane
from tests.test_webui_lifecycle import World

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["a1111", "forge"])
def world(request, tmp_path, tokenizer, text_encoder):
    w = World(tmp_path, tokenizer, text_encoder, forge=request.param == "forge")
    yield w
    w.close()


def clip_of(world):
    return world.model.cond_stage_model if not world.forge else world.model.text_processing_engine.clip


def test_fast_windows_equal_the_padded_path(world):
    from spm.webui.runtime import find_text_encoders

    assert len(find_text_encoders(world.model)) == 1
    tr = world.state.runtime().attach(world.model).transport
    seqs = [(320, 736, 7117), (2368,), (1929, 536, 320, 1125, 530)]  # "a red circle", "cat", "a photo of a dog"
    clip = clip_of(world)
    fast = tr.encode_ids(seqs)
    assert clip.fast_rows > 0  # the probe matched: windows went the fast way
    ref = tr._decode_and_encode(seqs)
    for a, b in zip(fast, ref):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_calibration_encodes_no_padded_windows(world):
    """Calibrating a concept's null (hundreds of windows) costs a handful of padded rows, not hundreds."""
    tr = world.state.runtime().attach(world.model).transport
    m = random_membrane(world.unet, name="cat", concepts=("cat",), seed=1)
    clip = clip_of(world)
    before = clip.padded_rows
    tr.metric = "ngram_tokenuni"
    tr.prepare_calibrations([m])
    padded = clip.padded_rows - before
    assert clip.fast_rows >= 100 and padded <= 10, (clip.fast_rows, padded)


def test_a_different_fast_path_falls_back_to_the_exact_one(world, monkeypatch):
    """E.g. a clip skip applied by the WebUI elsewhere: the probe differs, the exact path is kept."""
    clip = clip_of(world)
    real = clip.encode_with_transformers
    monkeypatch.setattr(clip, "encode_with_transformers", lambda ids: real(ids) * 1.5)
    tr = world.state.runtime().attach(world.model).transport
    seqs = [(2368,), (320, 736, 7117)]
    got = tr.encode_ids(seqs)
    ref = tr._decode_and_encode(seqs)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_a_host_without_encode_with_transformers_keeps_the_exact_path(world, monkeypatch):
    from spm.webui.runtime import phrase_encoder

    clip = clip_of(world)
    monkeypatch.delattr(type(clip), "encode_with_transformers")
    if world.forge:
        monkeypatch.delattr(type(world.model.text_processing_engine), "encode_with_transformers")
    assert phrase_encoder(world.model) is None
    tr = world.state.runtime().attach(world.model).transport
    tr.encode_ids([(2368,)])
    assert clip.fast_rows == 0
