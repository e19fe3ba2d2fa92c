"""Correctness of the fast paths (no timing assertions): the in-place fused hook, the batched transport
scores, the shared strength columns, and the benchmark's own bookkeeping on a tiny model."""

from __future__ import annotations

import pytest
import torch

from spm.attach import MembraneStack, Transport
from spm.membrane import Membrane, MembraneInfo
from spm.naming import file_key, find_targets
from spm.transport import METRICS, concept_scores, register_metric
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane


def inputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.full((b,), 300), torch.randn(b, 77, 32, generator=g)


def membranes(unet):
    """Three membranes of ranks 1, 2 and 3, so the fused columns have unequal groups."""
    return [random_membrane(unet, f"m{r}", seed=r, rank=r, std=0.1) for r in (1, 2, 3)]


def reference_delta(inp, ms, stem, strengths, kind):
    """Σ_m s[b, m] · scale_m · up_m(down_m(x)), computed module by module without fusion."""
    out = 0
    for j, m in enumerate(ms):
        layer = m.layers[stem]
        if kind == "conv":
            d = torch.nn.functional.conv2d(torch.nn.functional.conv2d(inp, layer.lora_down.weight), layer.lora_up.weight)
            out = out + d * layer.scale * strengths[:, j, None, None, None]
        else:
            d = inp @ layer.down_matrix().T @ layer.up_matrix().T
            out = out + d * layer.scale * strengths[:, j, None, None]
    return out


@pytest.mark.parametrize("name,kind,shape", [
    ("down_blocks.0.attentions.0.proj_in", "conv", (4, 32, 8, 8)),
    ("up_blocks.1.attentions.0.proj_out", "conv", (4, 32, 8, 8)),
    ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "linear", (4, 64, 32)),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", "linear", (4, 77, 32)),
])
@pytest.mark.parametrize("grad", [False, True])
def test_fused_matches_per_membrane_sum(name, kind, shape, grad):
    """In-place (inference) and out-of-place (autograd) paths both equal the unfused sum, per row."""
    unet = tiny_diffusers_unet()
    ms = membranes(unet)
    mod = dict(unet.named_modules())[name]
    stack = MembraneStack(unet)
    for m in ms:
        stack.add(m)
    s = torch.tensor([[1.0, 0.5, 0.25], [0.0, 0.0, 0.0], [0.3, 0.0, 2.0], [0.0, 1.0, 0.0]])
    stack.set_strengths(s)
    inp = torch.randn(*shape)
    if grad:
        mod.weight.requires_grad_(True)
        got = mod(inp)
        assert got.requires_grad and got.grad_fn is not None
        mod.weight.requires_grad_(False)
    else:
        with torch.inference_mode():
            got = mod(inp)
    stack.detach()
    with torch.no_grad():
        base = mod(inp)
        want = base + reference_delta(inp, ms, file_key(name), s, kind)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1].detach(), base[1])  # an all-zero row is exactly the base output


def test_inplace_and_autograd_paths_agree_on_the_whole_unet():
    unet = tiny_diffusers_unet()
    x, t, ctx = inputs()
    stack = MembraneStack(unet)
    for m in membranes(unet):
        stack.add(m)
    stack.set_strengths(torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) + 0.1)
    with torch.inference_mode():
        fast = unet(x, t, encoder_hidden_states=ctx).sample
    with torch.no_grad():
        nograd = unet(x, t, encoder_hidden_states=ctx).sample
    x.requires_grad_(True)  # autograd recording: the out-of-place path
    slow = unet(x, t, encoder_hidden_states=ctx).sample
    assert slow.grad_fn is not None
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, nograd)


def test_channels_last_and_noncontiguous_inputs_fall_back():
    unet = tiny_diffusers_unet()
    ms = membranes(unet)
    name = "down_blocks.0.attentions.0.proj_in"
    mod = dict(unet.named_modules())[name]
    stack = MembraneStack(unet)
    for m in ms:
        stack.add(m)
    s = torch.tensor([[1.0, 0.5, 0.25], [0.2, 0.0, 1.0]])
    stack.set_strengths(s)
    inp = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        got_cl = mod(inp.to(memory_format=torch.channels_last))
        got = mod(inp)
        lin = dict(unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
        tok = torch.randn(2, 32, 16).transpose(1, 2)  # non-contiguous [2, 16, 32]
        got_lin = lin(tok)
        got_lin_c = lin(tok.contiguous())
    torch.testing.assert_close(got_cl, got, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lin, got_lin_c, rtol=1e-5, atol=1e-5)
    stack.detach()


def test_cfg_batch_with_one_strength_row_and_bf16():
    unet = tiny_diffusers_unet().to(torch.bfloat16)
    x, t, ctx = inputs(2)
    stack = MembraneStack(unet)
    stack.add(random_membrane(unet, "a"))
    stack.set_strengths([0.5])  # one row for the whole batch
    with torch.inference_mode():
        y = unet(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16()).sample
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    d, u = next(iter(next(iter(stack._fused.values())).cache.values()))
    assert d.dtype == u.dtype == torch.bfloat16


def test_one_hook_per_module_and_shared_strength_columns():
    unet = tiny_diffusers_unet()
    stack = MembraneStack(unet)
    for m in membranes(unet):
        stack.add(m)
    n_targets = len(find_targets(unet))
    assert sum(len(m._forward_hooks) for m in unet.modules()) == n_targets
    assert len(unet._forward_pre_hooks) == 1
    x, t, ctx = inputs()
    stack.set_strengths(torch.ones(4, 3))
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=ctx)
    # every module carries the same three membranes: one strength-column tensor for the whole call
    assert len([k for k in stack._col_cache if k[0] not in ("up", "runs")]) == 1
    assert all(len(f.cache) == 1 for f in stack._fused.values())


def test_no_weight_copy_and_weights_untouched():
    unet = tiny_diffusers_unet()
    before = {k: (v.data_ptr(), v.clone()) for k, v in unet.state_dict().items()}
    stack = MembraneStack(unet)
    for m in membranes(unet):
        stack.add(m)
    stack.set_strengths(torch.ones(4, 3))
    x, t, ctx = inputs()
    with torch.inference_mode():
        for _ in range(2):
            unet(x, t, encoder_hidden_states=ctx)
    after = unet.state_dict()
    assert all(after[k].data_ptr() == p and torch.equal(after[k], v) for k, (p, v) in before.items())
    cached = [tt for f in stack._fused.values() for pair in f.cache.values() for tt in pair]
    ptrs = {p for p, _ in before.values()}
    assert not any(tt.data_ptr() in ptrs for tt in cached)
    # fused tensors are exactly the membranes' parameters (down and up), nothing weight-sized
    total = sum(tt.numel() for tt in cached)
    assert total == sum(layer.lora_down.weight.numel() + layer.lora_up.weight.numel()
                        for m in stack.membranes for layer in m.layers.values())


# --- transport ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["clipcos_tokenuni", "clipcos", "tokenuni"])
def test_batched_scores_equal_reference(encode, metric):
    prompts = ["a photo of a cat", "a red car on a road", "van gogh painting of a cat", ""]
    ctx, toks = encode(prompts)
    ms = [Membrane({}, MembraneInfo(concepts=c), name=str(i))
          for i, c in enumerate([["cat"], ["car", "road trip"], ["van gogh", "starry night", "cat"], []])]
    tr = Transport(encode, metric=metric)
    tr.registry.record(ctx, toks)
    got = tr.scores(ctx, ms)
    assert tr._matrices  # the batched path ran
    want = torch.stack([concept_scores(ctx, toks, tr.concepts.get(m.concepts, encode, None), metric) for m in ms], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert got[:, 3].tolist() == [1.0] * 4  # no concepts: full strength, as concept_scores
    # long prompt (2 chunks of 77) takes the best chunk, as clipcos does
    long = torch.cat([ctx[1], ctx[0]], 0)[None]
    got_long = tr.scores(long, ms[:1], [toks[0]])
    want_long = concept_scores(long, [toks[0]], tr.concepts.get(["cat"], encode, None), metric)
    torch.testing.assert_close(got_long[:, 0], want_long, rtol=0, atol=2e-6)


def test_custom_and_odd_metrics_use_the_reference_path(encode):
    ctx, toks = encode(["a cat", "a dog"])
    ms = [Membrane({}, MembraneInfo(concepts=["cat"]))]
    register_metric("always_half", lambda c, t, ce: torch.full((c.shape[0],), 0.5))
    try:
        tr = Transport(encode, metric="always_half")
        assert tr.scores(ctx, ms, toks).tolist() == [[0.5], [0.5]]
        assert not tr._matrices
    finally:
        METRICS.pop("always_half")
    # a row length that is not a multiple of the concept's: the per-concept (prefix) path
    tr = Transport(encode, metric="clipcos")
    odd = ctx[:, :50]
    want = concept_scores(odd, [None, None], tr.concepts.get(["cat"], encode, None), "clipcos")
    torch.testing.assert_close(tr.scores(odd, ms, [None, None])[:, 0], want)


def test_reencoded_concepts_are_not_served_stale(encode):
    ctx, toks = encode(["a cat"])
    ms = [Membrane({}, MembraneInfo(concepts=["cat"]))]
    tr = Transport(encode, metric="clipcos")
    first = tr.scores(ctx, ms, toks)
    tr.concepts.clear()
    tr.encode = lambda texts: (-encode(texts)[0], encode(texts)[1])  # a different encoder, same key
    second = tr.scores(ctx, ms, toks)
    assert first.item() > 0 and second.item() == 0.0  # negated embedding: cosine < 0, clamped


# --- the benchmark's bookkeeping -------------------------------------------------------------
def test_benchmark_helpers_on_tiny_model(encode):
    from bench import overhead

    unet = tiny_diffusers_unet()
    ms = overhead.make_membranes(unet, 3)
    steps = overhead.time_steps(unet, encode, ms, 8, rounds=1, steps=1, counts=(0, 3), log=lambda s: None)
    assert set(steps) >= {"ratio_3", "ratio_cpu_3", "step_s_median", "strengths", "overhead_ms_3"}
    assert len(steps["ratio_3_rounds"]) == 1 and steps["ratio_3"] > 0
    s3 = torch.tensor(steps["strengths"]["3"])
    assert s3.shape == (4, 3) and s3.min() > 0  # transport ran: per-row strengths, all non-zero
    assert not all(torch.equal(s3[0], row) for row in s3[1:])  # and they differ between rows
    mem = overhead.memory(unet, encode, ms, 8)
    assert mem["no_weight_copy"] and mem["base_storage_unchanged"] and not mem["cache_shares_base_storage"]
    assert mem["bytes_per_membrane"] == ms[0].nbytes() and mem["hooks"] == len(find_targets(unet))
    hs = overhead.hook_share(unet, encode, ms, 8, counts=(3,), log=lambda s: None)
    assert 0 < hs["share_3"] < 1 and hs["ratio_est_3"] > 1 and hs["hook_s_3"][0] > 0
    tr = overhead.time_transport(encode, ms, repeats=2)
    assert tr["ms_per_prompt_1"] > 0 and tr["concepts_1"] == len(ms[0].concepts)
    assert not any(m._forward_hooks for m in unet.modules())


def test_benchmark_reexec_runs_as_a_module():
    """The re-exec with a caching malloc must not run bench/overhead.py as a script (bench/ first on sys.path)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-m", "bench.overhead", "--help"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
