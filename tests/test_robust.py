"""Robust training (spm/train/robust.py): the search, the extra erase rows, the schedule, resume, metadata, the
anchors' draws, the invariant that unrelated prompts stay bit-identical under transport, and the plain names
(CLI, jobs file, trainer tab request)."""

from __future__ import annotations

import pytest
import torch

from spm.attach import MembraneStack
from spm.checkpoint import load_membrane
from spm.hosts.diffusers import DiffusersBackend
from spm.membrane import Membrane
from spm.naming import find_targets
from spm.train import TrainConfig, Trainer
from spm.train.objective import run_unet
from spm.train.robust import RobustTraining, is_search_step, search_interval
from spm.train.state import state_path
from tests.test_train_models import tiny_sd_pipe

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(anchors=1, pool_size=2, max_denoising_steps=4, lr=3e-3, lr_scheduler="constant", lr_warmup_steps=0,
            stop_when_erased=False)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipe()


@pytest.fixture(scope="module")
def backend(pipe):
    return DiffusersBackend(pipe)


def test_config_names_and_validation():
    assert TrainConfig(targets=["x"]).robust == "off"
    assert TrainConfig(targets=["x"], robust=True).robust == "embedding"  # YAML ``robust: true``
    assert TrainConfig(targets=["x"], robust=False).robust == "off"
    TrainConfig(targets=["x"], robust="embedding").validate()
    with pytest.raises(ValueError, match=r"robust='strong' is not valid; expected \('off', 'embedding'\)"):
        TrainConfig(targets=["x"], robust="strong").validate()


def test_search_schedule_follows_the_budget():
    assert search_interval(600, 20) == 30 and search_interval(8, 4) == 2 and search_interval(5, 20) == 5
    steps = [s for s in range(600) if is_search_step(s, 30)]
    assert len(steps) == 20 and steps[0] == 15  # half an interval in, then every interval
    assert [s for s in range(5) if is_search_step(s, 5)] == [2]  # a budget shorter than the checks: one search


def test_search_lowers_the_attack_loss_inside_the_ball(backend):
    be = backend
    torch.manual_seed(0)
    m = Membrane.for_targets(find_targets(be.unet))
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_up.weight.normal_(0.0, 0.3)
    stack = MembraneStack(be.unet, trainable=True)
    try:
        stack.add(m, 1.0)
        targets, neutral = be.encode(["a red circle"]), be.encode([""])
        rt = RobustTraining(targets, neutral, iterations=64, checks=8, guidance_scale=1.0)
        assert rt.steps == 8 and rt.interval == 8
        assert rt.radius[0] == pytest.approx(0.5 * float((targets.context - neutral.context).norm()))
        x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([500])
        eps_pos = run_unet(be, stack, x_t, t, targets, [0.0], None, False)
        delta = rt.search(be, stack, x_t, t, 0, eps_pos)
        assert float(delta.norm()) <= rt.radius[0] * (1 + 1e-5)
        assert rt.last_gain > 0 and rt.searches == 1 and len(rt.bank[0]) == 1
        # the banked adversary is what the search reported
        out = run_unet(be, stack, x_t, t, rt._row(0, rt.bank[0][0]), [1.0], None, False)
        assert float(torch.nn.functional.mse_loss(out, eps_pos)) == pytest.approx(rt.last_attack_loss, rel=1e-4)
        # warm start: the next search starts where the last ended, so it can only improve on it
        before = rt.last_attack_loss
        rt.search(be, stack, x_t, t, 0, eps_pos)
        assert rt.last_attack_loss <= before * (1 + 1e-6) and len(rt.bank[0]) == 2
    finally:
        stack.detach()


def _run(backend, tmp_path, name, **kw):
    cfg = TrainConfig(targets=["a red circle"], iterations=8, signal_checks=4, **{**FAST, **kw})
    out = tmp_path / f"{name}.safetensors"
    res = Trainer(backend, cfg, out, progress_bar=False, keep_state=True).train()
    return res, out


def test_robust_run_records_itself_costs_more_and_leaves_the_anchor_draws_alone(backend, tmp_path):
    off, out_off = _run(backend, tmp_path, "off")
    rob, out_rob = _run(backend, tmp_path, "rob", robust="embedding")
    stats = rob.membrane.info.training["robust_stats"]
    assert stats["searches"] == 4 and stats["search_interval"] == 2  # steps 1, 3, 5, 7
    assert stats["adversarial_rows"] == 7  # one per step from the first search on
    saved = load_membrane(out_rob).info.training
    assert saved["robust"] == "embedding" and saved["robust_stats"]["searches"] == 4
    assert "robust_stats" not in load_membrane(out_off).info.training
    assert rob.cost["robust_ufe"] == stats["ufe"] > 0 and "robust_ufe" not in off.cost
    assert rob.cost["ufe_per_iteration"] > off.cost["ufe_per_iteration"]
    assert rob.cost["ufe"] - off.cost["ufe"] == stats["ufe"]  # every extra row is counted in the run's cost
    # the trainer's generator (latent pool, anchors) is consumed exactly as without robust training
    st_off, st_rob = _state(out_off), _state(out_rob)
    assert torch.equal(st_off["rng"], st_rob["rng"])
    assert not [k for k in st_off if k.startswith("x.robust")]
    from spm.train.loop import CONTEXT_RNG  # the context prompts' picks (the default) too

    assert torch.equal(st_off[f"x.{CONTEXT_RNG}"], st_rob[f"x.{CONTEXT_RNG}"])
    assert len([k for k in st_rob if k.startswith("x.robust.bank.0.")]) == 4
    assert rob.membrane.info.training["anchor_weight"] > 0
    # "erased" with robust training includes its adversaries: they are a part of the check, the least decides
    parts = rob.erasure["signal_parts"]
    assert "adversaries" in parts and rob.erasure["signal"] == pytest.approx(min(parts.values()))
    assert "adversaries" not in (off.erasure.get("signal_parts") or {})
    assert "the adversaries robust training found" in rob.erasure["message"]


def test_a_verdict_short_only_on_the_adversaries_says_so():
    from spm.train import signal as sg

    check = sg.Check(step=600, signal=0.8, per_level=[1.2], remaining=0.1,
                     parts={"alone": 1.3, "in_context": 1.1, "adversaries": 0.8})
    msg = sg.summary(check, TrainConfig(targets=["sun"]), 600, False, False, None, None)["message"]
    assert msg.startswith("not erased:") and "the adversaries robust training found 80%; the lesser decides" in msg
    assert "only the adversarial embeddings robust training found still draw it" in msg
    assert "only inside other words" not in msg
    # the target's probes pass on their plain ratio too: that is not "only the bound is short", the adversaries are
    check.aggregate = 1.1
    msg = sg.summary(check, TrainConfig(targets=["sun"]), 600, False, False, None, None)["message"]
    assert "only the adversarial embeddings robust training found still draw it" in msg and "plain ratio" not in msg


def _state(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(state_path(out)))


def test_interrupt_and_resume_keep_the_bank(backend, tmp_path):
    cfg = TrainConfig(targets=["a red circle"], iterations=8, signal_checks=4, robust="embedding", **FAST)
    out = tmp_path / "r.safetensors"
    steps = []
    first = Trainer(backend, cfg, out, progress_bar=False, callback=lambda p: steps.append(p.step),
                    should_stop=lambda: len(steps) >= 4).train()
    assert first.interrupted and first.steps == 4
    import json

    from safetensors import safe_open

    with safe_open(str(state_path(out)), framework="pt") as f:
        assert json.loads(f.metadata()["spm_trainstate"])["robust"]["searches"] == 2
    saved = [_state(out)[f"x.robust.bank.0.{j}"] for j in range(2)]
    tr = Trainer(backend, cfg, out, progress_bar=False, resume=True)
    res = tr.train()
    assert not res.interrupted and res.steps == 8
    assert res.membrane.info.training["robust_stats"]["searches"] == 4
    assert res.membrane.info.training["robust_stats"]["adversarial_rows"] == 7
    bank = tr.robust.bank[0]
    assert len(bank) == 4 and torch.equal(bank[0], saved[0]) and torch.equal(bank[1], saved[1])


def test_unrelated_prompts_stay_bit_identical_under_transport(pipe, backend, tmp_path):
    """A robust membrane changes nothing for a prompt the gate scores 0 (Facilitated Transport's invariant)."""
    from spm.hosts.diffusers import PipelineMembranes

    cfg = TrainConfig(targets=["circle"], iterations=8, signal_checks=4, robust="embedding", **{**FAST, "lr": 3e-2})
    res = Trainer(backend, cfg, None, progress_bar=False).train()

    def image(protect, seen=None):
        g = torch.Generator().manual_seed(0)
        with protect as pm:
            out = pipe(prompt=["a photo of a cat"], num_inference_steps=3, generator=g, output_type="np").images
            if seen is not None:
                seen.extend(pm.stack.current_strengths[:, 0].tolist())
        return out

    import contextlib

    plain = image(contextlib.nullcontext())
    seen: list = []
    with_membrane = image(PipelineMembranes(pipe, [(res.membrane, 1.0)]), seen)
    assert seen == [0.0, 0.0]  # the gate closed for both CFG rows
    assert (plain == with_membrane).all()
    # and the membrane does act where the gate opens (the test could fail)
    g = torch.Generator().manual_seed(0)
    base = pipe(prompt=["a circle"], num_inference_steps=3, generator=g, output_type="np").images
    with PipelineMembranes(pipe, [(res.membrane, 1.0)]):
        g = torch.Generator().manual_seed(0)
        on = pipe(prompt=["a circle"], num_inference_steps=3, generator=g, output_type="np").images
    assert not (base == on).all()


def test_plain_names_cli_jobs_and_tab(tmp_path, capsys):
    from spm.cli import build_parser, config_from_args
    from spm.train.jobs import parse_request
    from spm.train.multi import load_jobs
    from spm.ui.trainer_tab import FORM, form_to_request

    args = build_parser().parse_args(["train", "--model", "toy", "--target", "circle", "-o", "x.safetensors",
                                      "--robust", "embedding"])
    assert config_from_args(args).robust == "embedding"
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        build_parser().parse_args(["train", "--model", "toy", "--target", "circle", "-o", "x.safetensors",
                                   "--robust", "yes"])
    assert "argument --robust: invalid choice: 'yes' (choose from 'off', 'embedding')" in capsys.readouterr().err
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("defaults:\n  robust: true\njobs:\n  - targets: [circle]\n    output: c.safetensors\n"
                    "  - targets: [square]\n    output: s.safetensors\n    overrides: {robust: 'off'}\n")
    a, b = load_jobs(jobs)
    assert a.config.robust == "embedding" and b.config.robust == "off"
    assert "robust" in FORM
    req = form_to_request({**{k: None for k in FORM}, "name": "c", "target": "circle", "robust": True})
    assert parse_request(req).config().robust == "embedding"
    req = form_to_request({**{k: None for k in FORM}, "name": "c", "target": "circle", "robust": False})
    assert parse_request(req).config().robust == "off"
    assert parse_request({"name": "c", "target": "circle"}).config().robust == TrainConfig(targets=["c"]).robust
