"""Toy world: data, shipped assets (SD1 shapes), deterministic generation, scorer, LDM export."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bench.toyworld import data
from spm.toy.model import asset_dir

HAVE_ASSETS = (asset_dir("base") / "unet").is_dir()
HAVE_SCORER = (asset_dir("scorer") / "scorer.safetensors").is_file()
needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason="toy-world assets not built")
needs_scorer = pytest.mark.skipif(not HAVE_SCORER, reason="toy-world scorer not built")


# ----------------------------------------------------------------------------------------------- data
def test_vocab_sizes():
    assert len(data.OBJECTS) >= 8 and len(data.COLOURS) >= 6 and len(data.BACKGROUNDS) >= 3 and len(data.STYLES) >= 2
    for obj, paras in data.PARAPHRASES.items():
        assert obj in data.OBJECTS and 1 <= len(paras) <= 2
        assert all(obj not in p.split() for p in paras)


def test_sample_is_deterministic():
    a_img, a_cap, a_lab = data.sample(123)
    b_img, b_cap, b_lab = data.sample(123)
    assert a_cap == b_cap and a_lab == b_lab
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert a_img.size == (32, 32) and a_img.mode == "RGB"
    s_img, _, s_lab = data.sample(123, shifted=True)
    assert s_lab.shifted and not np.array_equal(np.asarray(a_img), np.asarray(s_img))


def test_caption_variety():
    caps, labs = [], []
    for i in range(600):
        _, c, lab = data.sample(i)
        caps.append(c)
        labs.append(lab)
    assert len(set(caps)) > 400
    assert any(c in data.OBJECTS for c in caps), "some captions are the bare object word"
    assert any(" and " in c for c in caps), "some two-object captions"
    assert any(len(lab.objects) == 2 for lab in labs)
    paras = {p for ps in data.PARAPHRASES.values() for p in ps}
    assert any(any(re.search(rf"\b{p}\b", c) for p in paras) for c in caps)
    assert any(c.split(",")[0].strip().endswith(("background", "backdrop")) for c in caps), "attribute-first order"
    assert any(re.match(r"^(an? )?\w+ \w+", c) and c.split()[-1] in data.STYLES for c in caps)
    for obj in data.OBJECTS:
        assert any(obj in c for c in caps)
    for col in data.COLOURS:
        assert any(col in c for c in caps)


def test_prompt_suite_separates_targets():
    from spm.toy.harness import prompt_suite

    suite = prompt_suite("star")
    assert set(suite) == {"literal", "paraphrase", "nontarget", "mixed"}
    assert all("star" in c.objects for c in suite["literal"])
    assert any(c.prompt == "star" for c in suite["literal"])
    for c in suite["paraphrase"]:
        assert "star" not in c.prompt.split() and c.objects == ["star"]
    for c in suite["nontarget"]:
        assert "star" not in c.prompt and "pentagram" not in c.prompt and "star" not in c.objects
    assert any(len(c.objects) == 2 for c in suite["nontarget"])
    assert prompt_suite("star")["literal"][3].prompt == suite["literal"][3].prompt


def test_image_metrics():
    from spm.toy.harness import psnr, ssim

    imgs = [data.sample(i)[0] for i in range(4)]
    assert np.isinf(psnr(imgs, imgs)).all()
    assert np.allclose(ssim(imgs, imgs), 1.0, atol=1e-5)
    other = [data.sample(i + 10)[0] for i in range(4)]
    assert (ssim(imgs, other) < 0.9).all() and (psnr(imgs, other) < 30).all()


# ----------------------------------------------------------------------------------------------- assets
@pytest.fixture(scope="module")
def base_components():
    from spm.toy.model import load_components

    return load_components("base")


@needs_assets
def test_assets_have_sd1_shapes(base_components):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    te, vae, unet = base_components["text_encoder"], base_components["vae"], base_components["unet"]
    assert te.config.vocab_size == 49408 and te.config.max_position_embeddings == 77
    assert te.config.num_hidden_layers == 2 and te.config.hidden_size == unet.config.cross_attention_dim
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor != 1.0
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    assert len(blocks) == 7
    n_targets = 0
    for b in blocks:
        for name in ("proj_in", "proj_out"):
            conv = getattr(b, name)
            assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)
        tb = b.transformer_blocks[0]
        for attn in (tb.attn1, tb.attn2):
            assert all(isinstance(getattr(attn, k), torch.nn.Linear) for k in ("to_q", "to_k", "to_v"))
            assert isinstance(attn.to_out[0], torch.nn.Linear)
        assert tb.attn2.to_k.in_features == te.config.hidden_size
        n_targets += sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in b.modules())
    assert n_targets == 7 * 12
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)


@needs_assets
def test_finetune_differs_only_in_unet(base_components):
    from spm.toy.model import load_components

    ft = load_components("finetune")
    assert not (asset_dir("finetune") / "text_encoder").exists()
    a = dict(base_components["unet"].named_parameters())
    b = dict(ft["unet"].named_parameters())
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@needs_assets
def test_generation_is_deterministic_per_seed():
    from spm.toy.harness import generate
    from spm.toy.model import load_toy_pipeline

    pipe = load_toy_pipeline("base")
    one = generate(pipe, ["a red star", "ring"], [1, 2], steps=4)
    two = generate(pipe, ["a red star", "a blue square"], [1, 3], steps=4)
    assert one[0].size == (32, 32)
    a0, b0 = np.asarray(one[0]).astype(int), np.asarray(two[0]).astype(int)
    assert np.abs(a0 - b0).max() <= 1  # same (prompt, seed) regardless of the batch neighbour
    again = generate(pipe, ["a red star", "ring"], [1, 2], steps=4)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(one, again))
    other = generate(pipe, ["a red star"], [99], steps=4)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(one[0]))


@needs_scorer
def test_scorer_reads_renders():
    from bench.toyworld.train import to_tensor
    from spm.toy.scorer import accuracy, load_scorer, predict

    scorer = load_scorer()
    imgs, labs = data.dataset_arrays(64, 31337)
    acc = accuracy(predict(scorer, to_tensor(imgs)), data.label_arrays(labs))
    assert acc["objects"] >= 0.85 and acc["background"] >= 0.95  # measured: 0.94 objects on 1000 held-out renders


@needs_assets
def test_ldm_export_round_trip(tmp_path, base_components):
    from safetensors.torch import load_file

    from bench.toyworld.ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, export_ldm, from_ldm_state_dict

    out = tmp_path / "toy.safetensors"
    yaml_path = export_ldm(out)
    assert yaml_path.is_file() and "UNetModel" in yaml_path.read_text()
    sd = load_file(str(out))
    assert any(k.startswith(UNET_PREFIX) for k in sd) and any(k.startswith(VAE_PREFIX) for k in sd)
    assert any(k.startswith(TEXT_PREFIX) for k in sd)
    assert sd[UNET_PREFIX + "input_blocks.1.1.proj_in.weight"].shape == (64, 64, 1, 1)
    back = from_ldm_state_dict(sd, dict(base_components["unet"].config), dict(base_components["vae"].config))
    for name in ("unet", "vae", "text_encoder"):
        ref = {k: v for k, v in base_components[name].state_dict().items() if not k.endswith("position_ids")}
        got = back[name]
        assert set(ref) <= set(got), f"{name}: missing {sorted(set(ref) - set(got))[:3]}"
        for k, v in ref.items():
            assert torch.equal(got[k].reshape(v.shape).to(v.dtype), v.half().to(v.dtype)), f"{name}.{k}"


# ----------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_quick_build_is_reproducible(tmp_path):
    from bench.toyworld.train import BuildConfig, build

    for d in ("a", "b"):
        build(tmp_path / d, BuildConfig.quick())
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), str(f)
