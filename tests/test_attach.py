import pytest
import torch

from spm.attach import PAD_RANK1_MIN_NUMEL, MembraneStack, Transport
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane


def run(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


@pytest.fixture
def setup():
    unet = tiny_diffusers_unet()
    torch.manual_seed(1)
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([500, 500, 500]), torch.randn(3, 77, 32)
    return unet, x, t, ctx


@pytest.mark.parametrize("linear_proj", [False, True])
def test_detach_restores_bit_identical(linear_proj):
    unet = tiny_diffusers_unet(linear_proj=linear_proj)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, 32)
    before = run(unet, x, t, ctx)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "a", seed=1))
    stack.add(random_membrane(unet, "b", seed=2), weight=0.7)
    during = run(unet, x, t, ctx)
    assert not torch.equal(before, during)
    stack.detach()
    assert torch.equal(run(unet, x, t, ctx), before)
    assert not unet._forward_hooks and not unet._forward_pre_hooks
    assert all(not m._forward_hooks for m in unet.modules())


def test_per_row_strengths_and_zero_row_identity(setup):
    unet, x, t, ctx = setup
    base = run(unet, x, t, ctx)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "a"))
    stack.set_strengths([[1.0], [0.0], [0.5]])
    y = run(unet, x, t, ctx)
    assert torch.equal(y[1], base[1])
    assert not torch.equal(y[0], base[0]) and not torch.equal(y[2], base[2])
    stack.set_strengths([[0.0], [0.0], [0.0]])
    assert torch.equal(run(unet, x, t, ctx), base)


@pytest.mark.parametrize("linear_proj", [False, True])
@pytest.mark.parametrize("rows", [[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.7], [0.0, 0.0, 0.3, 0.0], [0.2, 0.4, 0.6, 0.8]])
def test_rows_without_strength_are_skipped_exactly(rows, linear_proj):
    """The in-place path skips rows whose strengths are all 0 (runs of active rows as batch slices): those
    rows are bit-identical to the bare model, the others equal the out-of-place (autograd) formula."""
    unet = tiny_diffusers_unet(linear_proj=linear_proj)
    torch.manual_seed(2)
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.full((4,), 300), torch.randn(4, 77, 32)
    base = run(unet, x, t, ctx)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "a", seed=5))
    stack.add(random_membrane(unet, "b", seed=6))
    stack.set_strengths([[r, r / 2] for r in rows])
    fast = run(unet, x, t, ctx)
    with torch.enable_grad():  # autograd recording: the out-of-place formula over every row
        slow = unet(x.requires_grad_(True), t, encoder_hidden_states=ctx).sample.detach()
    for i, r in enumerate(rows):
        if r == 0:
            assert torch.equal(fast[i], base[i])
        else:
            assert not torch.equal(fast[i], base[i])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    stack.detach()


def test_module_level_sum_without_cross_terms(setup):
    unet, x, t, ctx = setup
    a, b = random_membrane(unet, "a", seed=3), random_membrane(unet, "b", seed=4)
    stack = MembraneStack(unet)
    stack.add(a)
    stack.add(b)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    mod = dict(unet.named_modules())[name]
    stem = "lora_unet_" + name.replace(".", "_")
    inp = torch.randn(3, 77, 32)
    with torch.no_grad():
        stack.set_strengths([[0.0, 0.0]] * 3)
        w = mod(inp)
        stack.set_strengths([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
        got = mod(inp)
    def delta(m):
        layer = m.layers[stem]
        return inp @ layer.down_matrix().T @ layer.up_matrix().T * layer.scale
    da, db = delta(a), delta(b)
    torch.testing.assert_close(got[0], w[0] + da[0])
    torch.testing.assert_close(got[1], w[1] + 2 * db[1])
    torch.testing.assert_close(got[2], w[2] + 0.5 * da[2] + 0.5 * db[2])


def test_mixed_batch_with_transport(encode):
    unet = tiny_diffusers_unet()
    prompts = ["a photo of a cat", "a red car on a road", "cat"]
    ctx, toks = encode(prompts)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([300] * 3)
    base = run(unet, x, t, ctx)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "cat", concepts=("cat",)))
    tr = Transport(encode, metric="tokenuni")
    tr.registry.record(ctx, toks)
    stack.set_transport(tr)
    y = run(unet, x, t, ctx)
    assert stack.current_strengths[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(y[1], base[1])
    assert not torch.equal(y[0], base[0]) and not torch.equal(y[2], base[2])
    # same conditioning again: the cached strengths are reused (no re-scoring per step)
    calls = []
    orig = tr.scores
    tr.scores = lambda *a, **k: calls.append(1) or orig(*a, **k)
    run(unet, x, t, ctx)
    assert calls == []
    stack.set_weight("cat", 0.5)
    run(unet, x, t, ctx)
    assert stack.current_strengths[:, 0].tolist() == [0.5, 0.0, 0.5]
    stack.detach()
    assert torch.equal(run(unet, x, t, ctx), base)


def test_without_transport_uses_weights(setup):
    unet, x, t, ctx = setup
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "a"), weight=0.3)
    run(unet, x, t, ctx)
    assert stack.current_strengths.tolist() == [[pytest.approx(0.3)]] * 3


def test_trainable_gradients_reach_only_the_membrane(setup):
    unet, x, t, ctx = setup
    for p in unet.parameters():
        p.requires_grad_(False)
    m = random_membrane(unet, "a", std=0.0)
    stack = MembraneStack(unet, trainable=True)
    stack.add(m)
    stack.set_strengths([1.0])
    out = unet(x, t, encoder_hidden_states=ctx).sample
    out.square().mean().backward()
    ups = [layer.lora_up.weight.grad for layer in m.layers.values()]
    assert all(g is not None for g in ups) and any(g.abs().sum() > 0 for g in ups)
    assert all(p.grad is None for p in unet.parameters())
    # a fresh membrane (zero up) is the identity
    stack.detach()
    base = run(unet, x, t, ctx)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "z", std=0.0))
    assert torch.equal(run(unet, x, t, ctx), base)


def test_low_precision_module_keeps_dtype(setup):
    unet, x, t, ctx = setup
    unet = unet.to(torch.bfloat16)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "a"))
    with torch.no_grad():
        y = unet(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16()).sample
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_rank_one_fast_path_on_large_inputs():
    """One rank-1 membrane on a large input takes the padded (threaded) down projection: same result."""
    unet = tiny_diffusers_unet()
    m = random_membrane(unet, "a", seed=7)
    stack = MembraneStack(unet)
    stack.add(m)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    mod = dict(unet.named_modules())[name]
    layer = m.layers["lora_unet_" + name.replace(".", "_")]
    inp = torch.randn(4, 8192, 32)  # 1 M elements: the padded path
    assert inp.numel() >= PAD_RANK1_MIN_NUMEL
    with torch.no_grad():
        stack.set_strengths([[1.0], [0.0], [0.5], [2.0]])
        got = mod(inp)
        assert stack._fused[name].padded  # the fast path ran
        plain = torch.nn.functional.linear(inp, mod.weight, mod.bias)
    delta = inp @ layer.down_matrix().T @ layer.up_matrix().T * layer.scale
    for i, s in enumerate([1.0, 0.0, 0.5, 2.0]):
        torch.testing.assert_close(got[i], plain[i] + s * delta[i], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], plain[1])
    stack.detach()
