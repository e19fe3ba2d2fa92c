"""The WebUI trainer hosts (A1111, Forge) on the stand-in WebUI (tests/webui_stub*.py) around real networks:
a CompVis ``ldm`` UNetModel (stable-diffusion-sdkit, the code A1111 loads for SD1.x) and a small CLIP text
encoder through A1111's hijacked-CLIP surface."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from spm.backend import check_backend
from spm.train import TrainConfig, Trainer
from spm.train.jobs import NoModelError, TrainService
from tests import webui_stub as stub
from tests import webui_stub_train as tstub
from tests.test_webui_lifecycle import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def env(tmp_path):
    e = tstub.install(tmp_path)
    yield e
    tstub.uninstall()


@pytest.fixture
def forge_env(tmp_path):
    e = tstub.install(tmp_path, forge=True)
    yield e
    tstub.uninstall()


def a1111_model(tokenizer, text_encoder, parameterization="eps"):
    return tstub.A1111Model(tiny_unet(), stub.HijackedCLIP(tokenizer, text_encoder), parameterization)


def small_config(**kw):
    return TrainConfig(**{"targets": ["a red circle"], "iterations": 3, "max_denoising_steps": 4, "pool_size": 2,
                          "anchors": 1, "lr_warmup_steps": 0, "resolution": 16, **kw})


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, \
        {n: (p, p.requires_grad) for n, p in module.named_parameters()}


def assert_untouched(module, before):
    sd, params = before
    now_sd, now_params = snapshot(module)
    assert sd.keys() == now_sd.keys() and all(torch.equal(sd[k], now_sd[k]) for k in sd)
    for n, (p, rg) in params.items():  # the very same parameter objects, requires_grad as before
        assert now_params[n][0] is p and now_params[n][1] == rg


# --- A1111 ---------------------------------------------------------------------------------------------
def test_a1111_conditioning_schedule_and_prediction_match_the_ldm_model(env, tokenizer, text_encoder):
    from spm.webui.train_backend_a1111 import A1111Backend

    model = a1111_model(tokenizer, text_encoder)
    be = A1111Backend(model)
    check_backend(be)
    assert be.parameterization == "eps" and be.architecture == "custom-ctx32" and not be.is_xl
    assert be.latent.channels == 4 and be.latent.downscale == 2 and be.latent.resolution == 512
    # schedule: ldm's "linear" betas == diffusers' "scaled_linear" with the same endpoints
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(be.alphas_cumprod, ref.float(), atol=1e-6)
    # conditioning: exactly what A1111's hijacked CLIP gives, 77 tokens per chunk
    c = be.encode(["a red circle", ""])
    assert c.context.shape == (2, 77, 32) and c.pooled is None
    assert torch.equal(c.context, model.get_learned_conditioning(["a red circle", ""]))
    # noise prediction: apply_model with {"c_crossattn": [ctx]} == the LDM UNet called with context=
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        out = be.predict(x, t, c)
        direct = model.model.diffusion_model(x, t, context=c.context)
    assert torch.equal(out, direct)
    img = be.decode(torch.randn(1, 4, 8, 8))
    assert img.shape == (1, 3, 16, 16) and img.min() >= 0 and img.max() <= 1


def test_a1111_training_leaves_the_checkpoint_bit_identical(env, tokenizer, text_encoder, tmp_path):
    from spm.checkpoint import load_membrane
    from spm.webui.train_backend_a1111 import A1111Backend

    model = a1111_model(tokenizer, text_encoder)
    unet = model.model.diffusion_model
    before = snapshot(unet)
    res = Trainer(A1111Backend(model), small_config(), tmp_path / "c.safetensors", progress_bar=False).train()
    assert res.steps == 3 and not res.interrupted
    assert all(h["loss"] == h["loss"] for h in res.history)
    grads = [layer.lora_down.weight for layer in res.membrane.layers.values()]
    assert any(g.abs().sum() > 0 for g in grads)
    assert_untouched(unet, before)
    assert all(p.grad is None for p in unet.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    m = load_membrane(tmp_path / "c.safetensors")
    assert m.info.concepts == ["a red circle"] and m.info.context_dim == 32
    # calibrated at training time with the runtime's own transport: the first generation computes none
    assert set(m.info.transport["concepts"]) == {"a red circle"} and m.info.transport["fingerprint"]


def test_a1111_v_parameterization_and_refusals(env, tokenizer, text_encoder):
    from spm.webui.train_backend_a1111 import A1111Backend

    assert A1111Backend(a1111_model(tokenizer, text_encoder, "v")).parameterization == "v"
    with pytest.raises(NoModelError, match="no Stable Diffusion model"):
        A1111Backend(None)
    with pytest.raises(NoModelError, match="cannot find the UNet"):
        A1111Backend(types.SimpleNamespace(model=None))
    bad = a1111_model(tokenizer, text_encoder)
    bad.parameterization = "x0"
    with pytest.raises(NoModelError, match="parameterization"):
        A1111Backend(bad)
    inpaint = a1111_model(tokenizer, text_encoder)
    inpaint.model.diffusion_model.in_channels = 9
    with pytest.raises(NoModelError, match="9 input channels"):
        A1111Backend(inpaint)


def test_a1111_sdxl_dict_conditioning(env, tokenizer, text_encoder):
    from spm.webui.train_backend_a1111 import A1111Backend

    calls = []

    class XLUNet(nn.Module):
        """Records what sgm's OpenAIWrapper passes; delegates to a real LDM UNet for the output."""

        def __init__(self):
            super().__init__()
            self.inner = tiny_unet()
            self.in_channels = 4

        def forward(self, x, timesteps=None, context=None, y=None):
            calls.append((context.shape, None if y is None else y.shape))
            return self.inner(x, timesteps, context=context)

    model = tstub.SgmModel(XLUNet(), stub.HijackedCLIP(tokenizer, text_encoder))
    be = A1111Backend(model)
    assert be.is_xl and be.architecture == "SDXL" and be.latent.resolution == 1024
    c = be.encode(["a red circle", "a dog"])
    assert c.pooled is not None and c.pooled.shape == (2, 8)
    sub = c.rows([1])
    with torch.no_grad():
        be.predict(torch.randn(1, 4, 8, 8), torch.tensor([5]), sub)
    assert calls == [((1, 77, 32), (1, 8))]


def test_webui_provider_picks_the_host_and_reports_no_model(env, tokenizer, text_encoder):
    from spm.webui import train_api

    env.shared.sd_model = None
    with pytest.raises(NoModelError, match="no Stable Diffusion model is loaded"):
        train_api.webui_backend()
    env.shared.sd_model = a1111_model(tokenizer, text_encoder)
    assert type(train_api.webui_backend()).__name__ == "A1111Backend"


# --- Forge -------------------------------------------------------------------------------------------
def forge_model(tokenizer, text_encoder, prediction_type="epsilon"):
    return tstub.forge_engine(tiny_unet(), stub.HijackedCLIP(tokenizer, text_encoder), prediction_type)


def test_forge_blockers_reproduce_without_the_fixes(forge_env, tokenizer, text_encoder, tmp_path):
    """Training straight on Forge's objects fails the way the runtime notes say; our backend's session fixes it."""
    from spm.webui.train_backend_forge import ForgeBackend

    engine = forge_model(tokenizer, text_encoder)
    be = ForgeBackend(engine)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        Trainer(be, small_config(iterations=1), None, progress_bar=False).train()
    # the in-place add: a Forge transformer block breaks autograd unless norm inputs are cloned
    from spm.webui.train_backend_forge import add_norm_clone_hooks

    block = tstub.ForgeTransformerBlock()
    x = torch.randn(1, 4, 16)
    ctx = torch.randn(1, 3, 32)
    delta = nn.Parameter(torch.zeros(16))
    with pytest.raises(RuntimeError, match="inplace operation"):
        block(x.clone() + delta, ctx).sum().backward()
    handles = add_norm_clone_hooks(block)
    block(x.clone() + delta, ctx).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    for h in handles:
        h.remove()


def test_forge_training_in_a_session_restores_the_inference_weights(forge_env, tokenizer, text_encoder, tmp_path):
    from spm.webui.train_backend_forge import ForgeBackend

    engine = forge_model(tokenizer, text_encoder)
    unet = engine.forge_objects.unet.model.diffusion_model
    assert all(p.is_inference() for p in unet.parameters())
    assert any(type(m).__name__ == "ForgeLinear" for m in unet.modules())
    before = snapshot(unet)
    be = ForgeBackend(engine)
    check_backend(be)
    assert be.parameterization == "eps" and be.latent.downscale == 2
    assert torch.allclose(be.alphas_cumprod, tstub.ldm_alphas_cumprod())
    with be.session():
        assert not any(p.is_inference() for p in unet.parameters())
        assert tstub.loaded_models == [engine.forge_objects.unet]
        res = Trainer(be, small_config(), tmp_path / "f.safetensors", progress_bar=False).train()
        c = be.encode(["a red circle"])
        assert not c.context.is_inference()
        img = be.decode(torch.randn(1, 4, 8, 8))
    assert res.steps == 3 and all(h["loss"] == h["loss"] for h in res.history)
    assert any(layer.lora_down.weight.abs().sum() > 0 for layer in res.membrane.layers.values())
    assert set(res.membrane.info.transport["concepts"]) == {"a red circle"}  # calibrated at training time
    assert img.shape == (1, 3, 16, 16)
    assert_untouched(unet, before)
    assert all(p.is_inference() for p in unet.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    # prediction == the diffusion model called as Forge's KModel calls it (timesteps as floats)
    c = be.encode(["a dog"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([321])
    with torch.no_grad():
        assert torch.equal(be.predict(x, t, c), unet(x, t.float(), context=c.context, transformer_options={}))


def test_forge_refuses_flow_models_and_quantised_weights(forge_env, tokenizer, text_encoder):
    from spm.webui.train_backend_forge import ForgeBackend

    with pytest.raises(NoModelError, match="flow/EDM"):
        ForgeBackend(forge_model(tokenizer, text_encoder, prediction_type="const"))
    assert ForgeBackend(forge_model(tokenizer, text_encoder, "v_prediction")).parameterization == "v"

    class Params4bit(nn.Parameter):  # what bitsandbytes puts in an NF4 UNet
        pass

    engine = forge_model(tokenizer, text_encoder)
    unet = engine.forge_objects.unet.model.diffusion_model
    lin = next(m for m in unet.modules() if type(m).__name__ == "ForgeLinear")
    with torch.inference_mode(False):
        lin.weight = Params4bit(torch.zeros(lin.out_features, lin.in_features), requires_grad=False)
    with pytest.raises(NoModelError, match="quantised"):
        ForgeBackend(engine)
    with pytest.raises(NoModelError, match="generate one image"):
        ForgeBackend(None)


def test_forge_before_the_first_generation_says_so(forge_env, tmp_path):
    """Forge holds ``FakeInitialModel`` in ``shared.sd_model`` until the first generation: the job fails with
    Forge's message (generate one image first), not with "cannot find the UNet … FakeInitialModel"."""
    from spm.webui import train_api
    from spm.webui.train_backend_forge import ForgeBackend, is_placeholder

    placeholder = forge_env.shared.sd_model
    assert type(placeholder).__name__ == "FakeInitialModel" and is_placeholder(placeholder)
    with pytest.raises(NoModelError, match="Forge loads it on the first generation"):
        train_api.webui_backend()
    with pytest.raises(NoModelError, match="generate one image"):
        ForgeBackend(placeholder)
    svc = TrainService(train_api.webui_backend, tmp_path)
    job = svc.run(svc.create({"name": "fc", "target": "a red circle", "iterations": 2}))
    assert job.status == "failed" and "generate one image, then train" in job.error
    assert "FakeInitialModel" not in job.error and not list(tmp_path.iterdir())
    assert not is_placeholder(None) and not is_placeholder(types.SimpleNamespace(forge_objects=None))


def test_forge_job_through_the_service(forge_env, tokenizer, text_encoder, tmp_path):
    """The whole job (train + before/after grid) on Forge's objects via the WebUI provider."""
    from spm.webui import train_api

    engine = forge_model(tokenizer, text_encoder)
    forge_env.shared.sd_model = engine
    unet = engine.forge_objects.unet.model.diffusion_model
    before = snapshot(unet)
    svc = TrainService(train_api.webui_backend, tmp_path, config_overrides={"max_denoising_steps": 4, "pool_size": 2})
    job = svc.run(svc.create({"name": "fc", "target": "a red circle", "iterations": 2, "anchors": 1,
                              "resolution": 16, "preview_steps": 2, "control_prompts": "a dog"}))
    assert job.status == "done", job.error
    assert (tmp_path / "fc.safetensors").exists() and (tmp_path / "fc.preview.png").exists()
    assert_untouched(unet, before)



def test_a1111_neighbours_come_from_the_runtimes_transport(env, tokenizer, text_encoder, tmp_path):
    """``--neighbours`` inside the WebUI: the words are found with the runtime's transport on the loaded model and
    recorded in the file (which words a random encoder opens for does not matter here)."""
    from spm.checkpoint import load_membrane
    from spm.webui.train_backend_a1111 import A1111Backend

    backend = A1111Backend(a1111_model(tokenizer, text_encoder))
    found = backend.transport_neighbours(["a red circle"])
    assert set(found) == {"a red circle"} and all(isinstance(w, str) and w for w in found["a red circle"])
    Trainer(backend, small_config().with_(neighbours=True), tmp_path / "n.safetensors", progress_bar=False).train()
    assert load_membrane(tmp_path / "n.safetensors").info.training["neighbour_words"] == found


def test_both_hosts_answer_the_transport_hooks_with_their_loaded_model(monkeypatch):
    """A1111 and Forge share one implementation of the trainer's transport hooks: each passes its own loaded model
    (``sd_model``) and the arguments to :mod:`spm.webui.state`."""
    from spm.webui import state
    from spm.webui.train_backend_a1111 import A1111Backend, WebUITransport
    from spm.webui.train_backend_forge import ForgeBackend

    calls = []
    monkeypatch.setattr(state, "training_transport_calibration", lambda m, c: calls.append(("cal", m, c)) or {"c": 1})
    monkeypatch.setattr(state, "training_transport_neighbours", lambda m, c: calls.append(("nb", m, c)) or {})
    monkeypatch.setattr(state, "training_transport_candidates",
                        lambda m, c, k, n, s: calls.append(("cand", m, c, k, n, s)) or {"candidates": {}, "null": []})
    for cls in (A1111Backend, ForgeBackend):
        assert issubclass(cls, WebUITransport)
        host = cls.__new__(cls)  # the hooks need nothing but the loaded model
        host.sd_model = model = object()
        assert host.transport_calibration(["x"]) == {"c": 1}
        host.transport_neighbours(["x"])
        host.transport_candidates(["x"], 4, 5, 6)
        assert calls[-3:] == [("cal", model, ["x"]), ("nb", model, ["x"]), ("cand", model, ["x"], 4, 5, 6)]
