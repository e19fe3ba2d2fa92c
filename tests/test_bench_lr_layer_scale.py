"""``bench.lr_layer_scale``: its rescaled model computes the same function, and its rejected variant's groups."""

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


def test_the_rejected_variant_puts_both_sides_of_each_layer_at_its_gain():
    from spm.membrane import Membrane
    from spm.naming import find_targets
    from tests.test_train_models import tiny_sd_pipe

    mem = Membrane.for_targets(find_targets(tiny_sd_pipe().unet))
    gains = {k: 1 + i for i, k in enumerate(mem.layers)}
    groups = ls._both_sides(dict(mem.layers), gains)
    assert [g["lr_gain"] for g in groups] == list(gains.values())
    assert all(g["params"] == [layer.lora_down.weight, layer.lora_up.weight] for g, layer in zip(groups, mem.layers.values()))
    assert len(ls._both_sides(dict(mem.layers), None)) == 1  # the fixed rate


@pytest.mark.parametrize("argv", [["--scale", "0"], ["--scale", "-2"], ["--scale", "1"], ["--scale", "nan"],
                                  ["--iterations", "10"], ["--model", "nope"]])
def test_bad_arguments_get_a_message_before_any_training(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ls.main(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
