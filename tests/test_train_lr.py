"""Per-layer learning rates (``TrainConfig.lr_layers``, :mod:`spm.train.lr`): the gain of each layer, the optimiser's
groups, the rates the trainer steps them at, and resuming runs that used the other mode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from spm.checkpoint import load_membrane
from spm.hosts.diffusers import DiffusersBackend
from spm.membrane import Membrane
from spm.naming import find_targets
from spm.train import TrainConfig, Trainer
from spm.train import lr as L
from spm.train.state import saved_settings, state_path
from tests.test_train_models import tiny_sd_pipe

FAST = dict(anchors=1, pool_size=2, max_denoising_steps=4, lr=3e-3, lr_scheduler="constant", lr_warmup_steps=0,
            contexts=0, synonyms="off")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend(tiny_sd_pipe())


def test_pytorchs_default_initialisation_has_gain_one_and_scaling_a_weight_scales_it():
    torch.manual_seed(0)
    lin, conv = nn.Linear(512, 384), nn.Conv2d(512, 256, 1)
    assert abs(L.weight_gain(lin) - 1) < 0.02 and abs(L.weight_gain(conv) - 1) < 0.02
    g = L.weight_gain(lin)
    with torch.no_grad():
        lin.weight.mul_(3)
    assert math.isclose(L.weight_gain(lin), 3 * g, rel_tol=1e-5)
    assert math.isnan(L.weight_gain(nn.Linear(4, 4, device="meta")))
    assert math.isnan(L.weight_gain(nn.LayerNorm(4)))  # a 1-D weight: not a layer a membrane sits on


def test_degenerate_layers_take_the_median_and_gains_stay_within_the_spread():
    torch.manual_seed(0)
    net = nn.ModuleDict({f"l{i}": nn.Linear(64, 64) for i in range(5)})
    with torch.no_grad():
        net["l0"].weight.zero_()  # an untrained LDM proj_out
        net["l1"].weight.mul_(1e4)
        net["l2"].weight.fill_(float("nan"))
    gains = L.layer_gains(net, {k: k for k in net} | {"gone": "no.such.module", "none": None, "root": ""})
    med = sorted(L.weight_gain(net[k]) for k in ("l1", "l3", "l4"))[1]
    assert gains["l0"] == gains["l2"] == gains["gone"] == gains["none"] == gains["root"] == pytest.approx(med)
    assert gains["l1"] == pytest.approx(med * L.SPREAD)
    assert L.layer_gains(nn.ModuleDict({"a": nn.Linear(2, 2, device="meta")}), {"a": "a"}) == {"a": 1.0}


def test_the_groups_hold_every_parameter_once_and_lora_up_at_its_rounded_gain():
    pipe = tiny_sd_pipe()
    targets = find_targets(pipe.unet)
    mem = Membrane.for_targets(targets)
    layers = dict(mem.layers)
    one = L.param_groups(layers, None)
    assert len(one) == 1 and one[0]["lr_gain"] == 1.0
    assert [id(p) for p in one[0]["params"]] == [id(p) for p in mem.parameters()]  # an older state's order
    gains = {k: 0.5 + i / len(layers) for i, k in enumerate(layers)}
    groups = L.param_groups(layers, gains)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in mem.parameters())  # each once
    assert groups[0]["lr_gain"] == 1.0 and {id(p) for p in groups[0]["params"]} == {
        id(layer.lora_down.weight) for layer in layers.values()}
    for g in groups[1:]:
        for p in g["params"]:
            key = next(k for k, layer in layers.items() if layer.lora_up.weight is p)
            assert g["lr_gain"] == L.rounded(gains[key])
            assert abs(math.log2(g["lr_gain"] / gains[key])) <= 0.5 / L.BUCKETS + 1e-9
    assert len(groups) - 1 == len({L.rounded(v) for v in gains.values()}) < len(layers)


def test_a_function_identical_rescaled_unet_gets_the_inverse_factors():
    """q, v × 4 and k, out ÷ 4 (the same function): their lora_up factors are 4× and ¼ of the shipped model's."""
    from bench.lr_layer_scale import rescale

    pipe = tiny_sd_pipe()
    names = {t.file_key: t.name for t in find_targets(pipe.unet)}
    before = L.layer_gains(pipe.unet, names)
    assert rescale(pipe.unet, 4.0) > 0
    after = L.layer_gains(pipe.unet, names)
    for k, g in before.items():
        want = 4.0 if k.endswith(("to_q", "to_v")) else 0.25 if k.endswith(("to_k", "to_out_0")) else 1.0
        assert after[k] == pytest.approx(want * g, rel=1e-5), k


def test_the_trainer_steps_each_group_at_rate_times_its_gain_and_records_the_mode(backend, tmp_path, monkeypatch):
    import spm.train.loop as loop

    seen = []
    make = loop.make_optimizer

    def spy(cfg, params, device):
        opt = make(cfg, params, device)
        step = opt.step

        def record(*a, **kw):
            seen.append([(g["lr"], g.get("lr_gain", 1.0)) for g in opt.param_groups])
            return step(*a, **kw)

        opt.step = record
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spy)
    out = tmp_path / "g.safetensors"
    progress = []
    res = Trainer(backend, TrainConfig(targets=["circle"], iterations=2, **FAST), out, progress_bar=False,
                  callback=progress.append).train()
    assert len(seen) == 2 and len(seen[0]) > 2
    for lr_, k in seen[0]:
        assert lr_ == pytest.approx(3e-3 * k)
    assert [p.lr for p in progress] == [3e-3, 3e-3]  # the scheduled rate, not one group's
    training = load_membrane(out).info.training
    assert training["lr_layers"] == "gain" and res.membrane.info.training["lr_gains"]["layers"] == len(res.membrane.layers)
    g = training["lr_gains"]
    assert 0 < g["min"] <= g["median"] <= g["max"]
    seen.clear()
    res = Trainer(backend, TrainConfig(targets=["circle"], iterations=1, lr_layers="fixed", **FAST), out,
                  progress_bar=False).train()
    assert seen == [[(3e-3, 1.0)]] and "lr_gains" not in res.membrane.info.training
    with pytest.raises(ValueError, match="lr_layers"):
        TrainConfig(targets=["circle"], lr_layers="per-layer").validate()


def _drop_lr_layers(path):
    """Make ``path`` look like a state written before ``lr_layers`` existed (no setting, no ``lr_gain`` key)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["spm_trainstate"])
    del meta["config"]["lr_layers"]
    for g in meta["param_groups"]:
        g.pop("lr_gain", None)
    save_file(tensors, str(path), {"spm_trainstate": json.dumps(meta)})


def test_a_run_resumes_with_the_rates_it_started_with(backend, tmp_path, caplog):
    out = tmp_path / "r.safetensors"
    cfg = TrainConfig(targets=["circle"], iterations=2, lr_layers="fixed", **FAST)
    Trainer(backend, cfg, out, progress_bar=False, keep_state=True).train()
    _drop_lr_layers(state_path(out))  # as an older version left it
    assert saved_settings(state_path(out))["lr_layers"] == "fixed"
    res = Trainer(backend, cfg.with_(iterations=4, lr_layers="gain"), out, resume=True, progress_bar=False,
                  keep_state=True).train()
    assert res.steps == 4 and "started with lr_layers=fixed" in caplog.text
    assert load_membrane(out).info.training["lr_layers"] == "fixed"
    # and a run started with the default resumes with it, whatever the new request says
    out2 = tmp_path / "g.safetensors"
    Trainer(backend, cfg.with_(lr_layers="gain"), out2, progress_bar=False, keep_state=True).train()
    res = Trainer(backend, cfg.with_(iterations=3), out2, resume=True, progress_bar=False).train()
    assert res.steps == 3 and load_membrane(out2).info.training["lr_layers"] == "gain"
    assert saved_settings(tmp_path / "missing.trainstate") is None
