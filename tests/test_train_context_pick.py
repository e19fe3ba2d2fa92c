"""``TrainConfig.context_pick``: which context prompt each training step erases (:class:`spm.train.contexts.ContextPicker`)."""

from __future__ import annotations

import pytest
import torch

from spm.checkpoint import load_membrane
from spm.hosts.diffusers import DiffusersBackend
from spm.train import TrainConfig, Trainer
from spm.train.contexts import ContextPicker
from spm.train.state import state_path
from tests.test_train import FAST, _pairs_nearer
from tests.test_train_models import tiny_sd_pipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniform_draws_exactly_as_before_the_setting():
    """``uniform`` makes the same one ``randint(n)`` per step that runs made before ``context_pick`` existed, so that
    a membrane trained then is reproduced draw for draw."""
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p = ContextPicker("uniform", {0: 7}, a)
    picks = [p.pick(0) for _ in range(40)]
    assert picks == [int(torch.randint(7, (1,), generator=b)) for _ in range(40)]
    assert torch.allclose(p.weights(0), torch.full((7,), 1 / 7, dtype=torch.float64))


def test_hard_draws_the_lagging_prompts_more_often_but_every_one_at_least_half_its_share():
    p = ContextPicker("hard", {0: 4, 1: 2}, torch.Generator().manual_seed(0))
    # nothing measured yet: every prompt counts as lagging fully (1), so the draw is uniform
    assert torch.allclose(p.weights(0), torch.full((4,), 0.25, dtype=torch.float64))
    p.record(0, 0, 3.0, 1.0)  # lag 3/4
    p.record(0, 1, 1.0, 3.0)  # lag 1/4
    p.record(0, 1, 1.0, 1.0)  # lag 1/2: the mean of its draws is 3/8
    p.record(0, 2, 0.0, 0.0)  # nothing to learn from: not counted
    p.record(0, 2, float("nan"), 1.0)
    w = p.weights(0)
    r = torch.tensor([0.75, 0.375, 1.0, 1.0], dtype=torch.float64)  # prompts 2 and 3 not drawn yet: 1
    assert torch.allclose(w, 0.5 * 0.25 + 0.5 * r / r.sum())
    assert float(w.sum()) == pytest.approx(1.0) and float(w.min()) >= 0.5 * 0.25
    assert w[0] > w[1] and w[2] == w[3] > w[0]
    assert torch.equal(p.weights(1), torch.full((2,), 0.5, dtype=torch.float64))  # the other target: its own lags
    counts = torch.bincount(torch.tensor([p.pick(0) for _ in range(4000)]), minlength=4).double() / 4000
    assert torch.allclose(counts, w, atol=0.03)
    summary = p.summary({0: ["a", "b", "c", "d"]})
    assert summary[0] == {"a": [0.75, 1], "b": [0.375, 2], "c": [None, 0], "d": [None, 0]}
    assert summary[1] == {"0": [None, 0], "1": [None, 0]}


def test_the_lags_are_saved_and_resumed_only_for_the_same_prompts():
    p = ContextPicker("hard", {0: 3}, torch.Generator())
    p.record(0, 2, 1.0, 1.0)
    saved = p.state_tensors("ctx")
    assert set(saved) == {"ctx.lag.0", "ctx.draws.0"}
    q = ContextPicker("hard", {0: 3}, torch.Generator())
    assert q.load_tensors("ctx", saved) and torch.equal(q.weights(0), p.weights(0))
    other = ContextPicker("hard", {0: 4}, torch.Generator())  # other prompts (e.g. another model left others out)
    before = other.weights(0)
    assert not other.load_tensors("ctx", saved) and torch.equal(other.weights(0), before)
    assert not other.load_tensors("ctx", {})
    with pytest.raises(ValueError, match="context_pick must be one of uniform, hard"):
        ContextPicker("hardest", {0: 3}, torch.Generator())


def test_config_names_the_choices():
    with pytest.raises(ValueError, match="context_pick"):
        TrainConfig(targets=["x"], context_pick="often").validate()
    assert TrainConfig(targets=["x"]).to_dict()["context_pick"] in ("uniform", "hard")


def test_the_trainer_records_each_context_prompts_lag_and_resumes_them(tmp_path, monkeypatch):
    """With ``hard`` every step records its context prompt's lag, the file lists them per prompt (draws summing to
    the steps), and an interrupted run's ``.trainstate`` carries them on."""
    from safetensors.torch import load_file

    from spm.train import synonyms as syn
    from spm.train.loop import CONTEXT_PICK

    monkeypatch.setattr(syn, "distances", _pairs_nearer("surrogate"))  # keep every pair (see tests/test_train.py)
    backend = DiffusersBackend(tiny_sd_pipe())
    cfg = TrainConfig(targets=["circle"], iterations=6, la_mode="off", synonyms="off", signal_checks=3,
                      signal_trajectories=2, signal_levels=2, **{**FAST, "contexts": 4, "context_pick": "hard"})
    out, steps = tmp_path / "h.safetensors", []
    first = Trainer(backend, cfg, out, progress_bar=False, callback=lambda p: steps.append(p.step),
                    should_stop=lambda: len(steps) >= 3)
    assert first.train().steps == 3
    state = load_file(str(state_path(out)))
    assert float(state[f"x.{CONTEXT_PICK}.draws.0"].sum()) == 3
    tr = Trainer(backend, cfg, out, resume=True, progress_bar=False)
    res = tr.train()
    assert res.steps == 6 and float(tr.context_picker.draws[0].sum()) == 6  # 3 saved + 3 more, not 3 afresh
    lags = load_membrane(out).info.training["context_lags"]["circle"]
    texts = load_membrane(out).info.training["context_prompts"]["circle"]
    assert list(lags) == texts and sum(d for _, d in lags.values()) == 6
    assert all(lag is None or 0 < lag < 1 for lag, _ in lags.values())
