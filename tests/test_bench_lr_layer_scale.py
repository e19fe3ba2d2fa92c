"""``bench.lr_layer_scale``: its rescaled model computes the same function, and its per-layer optimiser steps each
group at its own rate."""

import pytest
import torch

from bench import lr_layer_scale as ls

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rescaling_the_attention_layers_keeps_the_function():
    from spm import toy

    pipe = toy.load("toy")
    unet = pipe.unet
    q0 = [m.to_q.weight.clone() for m in unet.modules() if hasattr(m, "to_q")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([700, 100])
    with torch.no_grad():
        before = unet(x, t, ctx).sample
        n = ls.rescale(unet, 4.0)
        after = unet(x, t, ctx).sample
    q1 = [m.to_q.weight for m in unet.modules() if hasattr(m, "to_q")]
    assert n == len(q0) > 0 and all(torch.equal(b, 4 * a) for a, b in zip(q0, q1))
    assert torch.equal(before, after)  # a power of two: bit for bit


def test_the_scaled_optimiser_steps_each_group_at_its_own_rate():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = ls._ScaledAdamW([{"params": [a], "k": 1.0}, {"params": [b], "k": 3.0}], lr=0.01, weight_decay=0.0)
    (a.sum() + b.sum()).backward()
    opt.step()
    # Adam's first step moves every parameter by lr (times k here), whatever its gradient's size
    assert torch.allclose(a.detach(), torch.full((3,), -0.01)) and torch.allclose(b.detach(), torch.full((3,), -0.03))
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]  # the trainer's schedule sets lr; k is applied per step


def test_the_per_side_rule_scales_only_lora_up_by_the_layers_gain():
    """On a membrane over the rescaled toy UNet: lora_down at the rate, lora_up at rate × rms(W)·√in / INIT; the q and v
    layers' factors are 4 × the shipped model's and the k and out layers' a quarter of them."""
    import math

    from spm import toy
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer

    def factors(c):
        pipe = toy.load("toy")
        ls.rescale(pipe.unet, c)
        tr = Trainer(DiffusersBackend(pipe), TrainConfig(targets=["circle"], iterations=2, synonyms="off"), None,
                     progress_bar=False)
        tr._spm_membrane = tr._new_membrane()
        stats: dict = {}
        opt = ls._per_side(tr, stats)(tr.cfg, None, "cpu")
        keys = list(tr._spm_membrane.layers)
        down = {k: g["k"] for k, g in zip(keys, opt.param_groups[0::2])}
        up = {k: g["k"] for k, g in zip(keys, opt.param_groups[1::2])}
        return down, up

    down1, up1 = factors(1.0)
    down4, up4 = factors(4.0)
    assert set(down1.values()) == set(down4.values()) == {1.0}
    for key, k in up1.items():
        want = 4.0 if key.endswith(("to_q", "to_v")) else 0.25 if key.endswith(("to_k", "to_out_0")) else 1.0
        assert math.isclose(up4[key], want * k, rel_tol=1e-5), key
    assert any(k.endswith("to_out_0") for k in up1) and any(k.endswith("to_q") for k in up1)


@pytest.mark.parametrize("argv", [["--scale", "0"], ["--scale", "-2"], ["--scale", "1"], ["--scale", "nan"],
                                  ["--iterations", "10"]])
def test_bad_arguments_get_a_message_before_any_training(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ls.main(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
