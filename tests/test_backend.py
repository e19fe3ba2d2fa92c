"""The backend protocol and its diffusers implementation (SD1 ε, SD2 v-prediction, SDXL)."""

from __future__ import annotations

import pytest
import torch

from spm.backend import Backend, Conditioning, LatentSpec, add_noise, check_backend, to_eps_x0
from spm.hosts.diffusers import DiffusersBackend
from tests.test_train_models import tiny_sd_pipe, tiny_sdxl_pipe

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def sd1():
    return DiffusersBackend(tiny_sd_pipe())


@pytest.fixture(scope="module")
def sd2v():
    return DiffusersBackend(tiny_sd_pipe(v_prediction=True))


@pytest.fixture(scope="module")
def sdxl():
    return DiffusersBackend(tiny_sdxl_pipe())


def test_protocol_and_geometry(sd1, sd2v, sdxl):
    for be in (sd1, sd2v, sdxl):
        assert isinstance(be, Backend)
        check_backend(be)
        assert be.alphas_cumprod.shape == (1000,)
        assert be.latent == LatentSpec(4, 2, 16)
        assert be.latent.shape(3) == (3, 4, 8, 8)
    assert sd1.parameterization == "eps" and sd2v.parameterization == "v" and sdxl.parameterization == "eps"
    assert sdxl.is_xl and not sd1.is_xl and sdxl.architecture == "SDXL"


def test_check_backend_names_what_is_missing():
    class Half:
        unet = device = dtype = alphas_cumprod = latent = None
        parameterization = "x0"

        def encode(self, texts): ...

    with pytest.raises(TypeError, match="missing predict"):
        check_backend(Half())
    Half.predict = lambda self, x, t, c: x
    with pytest.raises(TypeError, match="parameterization is 'x0'"):
        check_backend(Half())


def test_encode_and_predict_match_direct_unet_calls(sd1):
    c = sd1.encode(["a red circle", ""])
    assert c.context.shape == (2, 77, 32) and c.pooled is None
    assert c.tokens[0][0] == 49406 and len(c.tokens[1]) == 2
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = sd1.pipe.unet(x, t, encoder_hidden_states=c.context).sample
        out = sd1.predict(x, t, c)
    torch.testing.assert_close(out, ref)


def test_sdxl_pooled_and_time_ids(sdxl):
    c = sdxl.encode(["a red circle", "a blue square"])
    assert c.context.shape == (2, 77, 64) and c.pooled.shape == (2, 32)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    ids = sdxl.pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=32)
    with torch.no_grad():
        ref = sdxl.pipe.unet(x, t, encoder_hidden_states=c.context,
                             added_cond_kwargs={"text_embeds": c.pooled, "time_ids": ids.repeat(2, 1)}).sample
        out = sdxl.predict(x, t, c)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="pooled"):
        sdxl.predict(x, t, Conditioning(c.context))


def test_decode_range(sd1):
    img = sd1.decode(torch.randn(1, 4, 8, 8))
    assert img.shape == (1, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_conditioning_rows_cat_repeat():
    a = Conditioning(torch.arange(6.).reshape(2, 3, 1), torch.arange(2.).reshape(2, 1), [[1], [2]])
    b = a.rows([1, 1, 0])
    assert b.context[:, 0, 0].tolist() == [3.0, 3.0, 0.0] and b.tokens == [[2], [2], [1]]
    c = Conditioning.cat([a, a.repeat(2)])
    assert len(c) == 6 and c.pooled[:, 0].tolist() == [0, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="pooled"):
        Conditioning.cat([a, Conditioning(a.context)])


@pytest.mark.parametrize("param", ["eps", "v"])
def test_to_eps_x0_inverts_forward_diffusion(param):
    ac = torch.linspace(0.99, 0.01, 1000)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 400, 999])
    xt = add_noise(x0, eps, t, ac)
    a = ac[t].reshape(-1, 1, 1, 1)
    out = eps if param == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
    e2, x2 = to_eps_x0(param, out, xt, t, ac)
    torch.testing.assert_close(e2, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x2, x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="parameterization"):
        to_eps_x0("x0", out, xt, t, ac)
