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
