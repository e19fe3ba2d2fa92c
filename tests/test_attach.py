import sys

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


# --- the lean GPU path: row scaling of the low-rank activations, no host sync per step -------------
@pytest.mark.parametrize("linear_proj", [False, True])
@pytest.mark.parametrize("rows", [[1.0, 0.0, 0.5, 0.2], [0.0, 0.3, 0.0, 0.0], [0.7, 0.7, 0.7, 0.7]])
def test_lowrank_row_scaling_equals_cached(rows, linear_proj):
    """``row_scaling="lowrank"`` (the default off the CPU, forced here) gives the cached path's output, rows
    without strength stay bit-identical to the bare model, nothing per-row is cached, and detach is exact."""
    unet = tiny_diffusers_unet(linear_proj=linear_proj)
    torch.manual_seed(3)
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.full((4,), 300), torch.randn(4, 77, 32)
    base = run(unet, x, t, ctx)
    stack = MembraneStack(unet)
    for i, r in enumerate((1, 2, 1)):  # unequal rank groups; two rank-1 membranes
        stack.add(random_membrane(unet, f"m{i}", seed=10 + i, rank=r))
    s = torch.tensor([[v, v / 2, 1.0 - v] if v else [0.0, 0.0, 0.0] for v in rows])
    stack.set_strengths(s)
    out = {}
    for mode in ("cached", "lowrank"):
        stack.row_scaling = mode
        stack.set_strengths(s)
        with torch.inference_mode():
            out[mode] = unet(x, t, encoder_hidden_states=ctx).sample
        ups = [k for k in stack._col_cache if k[0] == "up"]
        assert (not ups) if mode == "lowrank" else ups
    torch.testing.assert_close(out["lowrank"], out["cached"], rtol=1e-5, atol=1e-5)
    for i, v in enumerate(rows):
        if v == 0:
            assert torch.equal(out["lowrank"][i], base[i])
    stack.detach()
    assert torch.equal(run(unet, x, t, ctx), base)


def test_row_scaling_auto_depends_on_the_device():
    stack = MembraneStack(tiny_diffusers_unet())
    assert stack._scaling_mode(torch.device("cpu")) == "cached"
    assert stack._scaling_mode(torch.device("cuda")) == "lowrank"
    stack.row_scaling = "bogus"
    with pytest.raises(ValueError, match="row_scaling"):
        stack._scaling_mode(torch.device("cpu"))


@pytest.fixture
def count_host_copies(monkeypatch):
    """Counts every ``Tensor.cpu`` / ``item`` / ``tolist`` / ``numpy`` call (each one a host sync on CUDA)."""
    calls = []
    for name in ("cpu", "item", "tolist", "numpy"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls.append((_name, sys._getframe(1).f_code.co_name))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


def test_steady_state_needs_no_host_copy(encode, count_host_copies):
    """Repeated UNet calls with the same conditioning tensor (a sampling loop) make no host copy at all:
    no fingerprint, no strength transfer.  An in-place change of that tensor is noticed (version counter),
    and a new tensor with equal values is fingerprinted but not re-scored."""
    unet = tiny_diffusers_unet()
    ctx, toks = encode(["a photo of a cat", "a red car", "cat", ""])
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 300)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "cat", concepts=("cat",)))
    stack.add(random_membrane(unet, "car", concepts=("car",), seed=1))
    tr = Transport(encode, metric="clipcos_tokenuni")
    tr.registry.record(ctx, toks)
    stack.set_transport(tr)
    scored = []
    orig = tr.scores
    tr.scores = lambda *a, **k: scored.append(1) or orig(*a, **k)
    first = run(unet, x, t, ctx)
    assert count_host_copies and scored == [1]  # the first call fingerprints and scores
    count_host_copies.clear()
    for _ in range(3):
        again = run(unet, x, t, ctx)
    assert count_host_copies == [] and scored == [1]
    assert torch.equal(again, first)
    # same values, another tensor: one fingerprint, no re-scoring, the same output
    again = run(unet, x, t, ctx.clone())
    assert count_host_copies and scored == [1] and torch.equal(again, first)
    # changed in place: re-scored
    with torch.no_grad():
        ctx.mul_(0.5)
    run(unet, x, t, ctx)
    assert scored == [1, 1]
    stack.detach()


def test_manual_strengths_steady_state_needs_no_host_copy(count_host_copies):
    """The trainer's path (explicit strengths every call): the hooks read the device copy of the strengths
    and decide skipping on the host copy, so a UNet call makes no host copy."""
    unet = tiny_diffusers_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.full((2,), 300), torch.randn(2, 77, 32)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "a"))
    stack.set_strengths([[1.0], [0.0]])
    run(unet, x, t, ctx)
    stack.set_strengths(torch.tensor([[0.5], [1.0]]))
    count_host_copies.clear()
    run(unet, x, t, ctx)
    # only the row-skipping plan reads values, and it reads the host copy of the strengths
    assert stack._strengths.device.type == "cpu"
    assert {caller for _, caller in count_host_copies} <= {"_active_runs"}
    stack.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steady_state_does_not_sync(encode):
    unet = tiny_diffusers_unet().cuda()
    ctx, toks = encode(["a photo of a cat", ""])
    ctx = ctx.cuda()
    x, t = torch.randn(2, 4, 8, 8, device="cuda"), torch.full((2,), 300, device="cuda")
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "cat", concepts=("cat",)).cuda())
    tr = Transport(encode, metric="clipcos_tokenuni")
    tr.registry.record(ctx, toks)
    stack.set_transport(tr)
    run(unet, x, t, ctx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run(unet, x, t, ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stack.detach()
