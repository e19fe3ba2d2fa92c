"""Which rows a WebUI generation encodes phrase windows for: its own prompts, not every row the conditioning
recorder has seen (a real Forge run spent ~6 min there after a training job, past the driver's 300 s)."""

from __future__ import annotations

import pytest
import torch

from tests import webui_stub as stub
from tests import webui_stub_train as tstub
from tests.test_webui_lifecycle import World

pytestmark = pytest.mark.usefixtures("one_thread")

METRIC = "ngram_tokenuni"  # the default: calibrated, reads phrase windows
UNRELATED = [f"a painting of a {w} on a hill at dawn" for w in ("house", "tree", "boat", "bridge", "castle", "road",
                                                                 "river", "tower", "field", "garden", "wall", "gate")]


@pytest.fixture(params=["a1111", "forge"])
def world(request, tmp_path, tokenizer, text_encoder):
    w = World(tmp_path, tokenizer, text_encoder, forge=request.param == "forge")
    yield w
    w.close()


def spy_phrases(monkeypatch, tr) -> list:
    calls = []
    real = tr.prepare_phrases

    def prepare_phrases(row_tokens=None, lengths=None):
        calls.append(None if row_tokens is None else [list(r) for r in row_tokens])
        return real(row_tokens, lengths)

    monkeypatch.setattr(tr, "prepare_phrases", prepare_phrases)
    return calls


def test_a_tagged_generation_encodes_the_windows_of_its_own_prompts_only(world, monkeypatch):
    world.add_membrane("cat")
    world.run("a red car", args=(False, [], "", METRIC, 1.0))  # attaches the recorder
    tr = world.state.runtime().attach(world.model).transport
    world.model.get_learned_conditioning(UNRELATED)  # e.g. what other generations encoded earlier in the session
    recorded = {tuple(r) for r in tr.registry.tokens()}
    unrelated = {tuple(r) for r in tr.tokenize(UNRELATED)}
    assert unrelated <= recorded
    calls = spy_phrases(monkeypatch, tr)
    world.run("a photo of a cat <spm:cat:1.0>", args=(False, [], "", METRIC, 1.0))
    asked = [r for c in calls if c is not None for r in c]
    assert calls and None not in calls and asked
    assert not unrelated & {tuple(r) for r in asked}
    assert {tuple(r) for r in tr.tokenize(["a photo of a cat "])} <= {tuple(r) for r in asked}
    strengths = [s.clone() for s in world.strengths if s is not None]
    assert strengths  # the membrane was applied

    # nothing is missing: with the windows of every recorded row prepared as well, the strengths are the same
    tr.prepare_phrases()
    world.run("a photo of a cat <spm:cat:1.0>", args=(False, [], "", METRIC, 1.0))
    again = [s for s in world.strengths if s is not None]
    assert len(again) == len(strengths) and all(torch.equal(a, b) for a, b in zip(again, strengths))


def test_the_panel_prepares_the_negative_rows_it_weights(world, monkeypatch):
    world.add_membrane("cat")
    world.run("a red car", args=(False, [], "", METRIC, 1.0))
    tr = world.state.runtime().attach(world.model).transport
    calls = spy_phrases(monkeypatch, tr)
    world.run("a photo of a cat", negative="a blurry cat", args=(True, ["cat"], "cat:1.0", METRIC, 1.0))
    asked = {tuple(r) for c in calls if c is not None for r in c}
    assert {tuple(r) for r in tr.tokenize(["a photo of a cat", "a blurry cat"])} <= asked


def test_a_training_job_in_the_session_records_no_rows(tmp_path, tokenizer, text_encoder):
    """The trainer's own encodings (anchors, probes, scans) go around the recorder."""
    from spm.train import TrainConfig, Trainer
    from spm.webui import state
    from spm.webui.train_backend_a1111 import A1111Backend
    from tests.test_webui_lifecycle import tiny_unet

    tstub.install(tmp_path)
    try:
        state.reset()
        model = tstub.A1111Model(tiny_unet(), stub.HijackedCLIP(tokenizer, text_encoder), "eps")
        tr = state.runtime().attach(model).transport  # the recorder is on, as after any generation
        model.get_learned_conditioning(["a red car"])
        before = len(tr.registry.tokens())
        assert before > 0
        cfg = TrainConfig(targets=["a red circle"], iterations=2, max_denoising_steps=4, pool_size=2, anchors=1,
                          lr_warmup_steps=0, resolution=16)
        Trainer(A1111Backend(model), cfg, tmp_path / "c.safetensors", progress_bar=False).train()
        assert len(tr.registry.tokens()) == before
    finally:
        state.reset()
        tstub.uninstall()


def test_a_prompt_whose_rows_the_registry_forgot_is_recorded_again(world):
    """The registry keeps the newest rows only; a prompt whose conditioning the WebUI reuses from its cache (so the
    recorder never sees it again) must be recorded again once its rows are gone, or its tag silently does nothing."""
    world.add_membrane("cat")
    world.run("a red car", args=(False, [], "", METRIC, 1.0))  # attaches the recorder
    att = world.state.runtime().attach(world.model)
    tr = att.transport
    tr.registry.capacity = 4
    g = ("a photo of a cat",)
    own = tuple(tr.tokenize(list(g))[0])
    assert att.ensure_recorded([g]) == 1 and att.ensure_recorded([g]) == 0  # recorded once, then known
    world.model.get_learned_conditioning(UNRELATED)  # 12 other texts push its row out
    assert own not in {tuple(r) for r in tr.registry.tokens()}
    assert att.ensure_recorded([g]) == 1 and own in {tuple(r) for r in tr.registry.tokens()}
    assert att.ensure_recorded([g]) == 0
