"""World 2 (``icons``): its label space and captions, renders, model configs, shipped assets and a tiny build.

World 1's own tests (``test_toyworld.py``, ``test_eval_cli.py``) check that the generalised machinery still
gives world 1 what it gave before.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bench.toyworld import render_icons as data
from spm.toy import captions_icons as cap
from spm.toy.model import asset_dir
from spm.toy.worlds import WORLDS, get_world

W = get_world("icons")
HAVE_ASSETS = (asset_dir("base", "icons") / "unet").is_dir()
needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason="world 2 assets not built")

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- label space
def test_registry_knows_world_2():
    from spm.toy import MODELS, concepts

    assert concepts("icons") == cap.OBJECTS
    assert {MODELS["toy2"].world, MODELS["toy2-finetune"].world} == {"icons"}
    assert MODELS["toy2"].which == "base" and MODELS["toy2-finetune"].which == "finetune"
    assert not set(concepts("icons")) & set(concepts("shapes")), "world 2's concepts are new"
    with pytest.raises(ValueError, match="unknown toy world"):
        concepts("nowhere")


def test_paraphrases_are_synonyms_of_several_lengths():
    from spm.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    lengths = set()
    for obj in cap.OBJECTS:
        paras = cap.PARAPHRASES[obj]
        assert len(paras) >= 2 and len(set(paras)) == len(paras)
        for p in paras:
            words = p.split()
            assert obj not in words and not any(obj in w for w in words), (obj, p)
            assert not set(words) & set(cap.COLOURS) and not set(words) & set(cap.BACKGROUNDS), p
            assert not set(words) & set(cap.OBJECTS), f"{p!r} names another concept"
            lengths.add(len(tok.tokenize(p)))
        assert len(tok.tokenize(obj)) == 1
    assert 1 in lengths and max(lengths) >= 4, f"single-word synonyms and multi-token paraphrases ({sorted(lengths)})"


def test_heads_match_the_label_space():
    rng = np.random.default_rng(0)
    labs = [cap.sample_labels(rng, two_prob=0.5) for _ in range(64)]
    arrays = cap.label_arrays(labs)
    assert set(arrays) == set(cap.HEADS)
    for k, (n, kind) in cap.HEADS.items():
        a = arrays[k]
        if kind == "multi":
            assert a.shape == (64, n) and set(np.unique(a)) <= {0.0, 1.0}
        else:
            assert a.shape == (64,) and a.min() >= 0 and a.max() < n
    assert (arrays["objects"].sum(1) == np.array([len(lab.objects) for lab in labs])).all()


def test_caption_grammar_and_variety():
    caps, labs = [], []
    for i in range(600):
        _, c, lab = data.sample(i)
        caps.append(c)
        labs.append(lab)
    assert len(set(caps)) > 300
    assert any(c in cap.OBJECTS for c in caps), "some captions are the bare object word"
    # the colour follows the noun: "a sun, red" / "a sun in red" (world 1 puts it first: "a red sun")
    assert any(re.match(rf"^an? ({'|'.join(cap.OBJECTS)}), ({'|'.join(cap.COLOURS)})\b", c) for c in caps)
    assert any(re.search(rf"\b({'|'.join(cap.OBJECTS)}) in ({'|'.join(cap.COLOURS)})\b", c) for c in caps)
    assert not any(re.search(rf"\b({'|'.join(cap.COLOURS)}) ({'|'.join(cap.OBJECTS)})\b", c) for c in caps)
    assert any(c.startswith(tuple(f"{b} background, " for b in cap.BACKGROUNDS)) for c in caps)
    assert any(" next to " in c or ", and " in c for c in caps) and any(len(lab.objects) == 2 for lab in labs)
    paras = {p for ps in cap.PARAPHRASES.values() for p in ps}
    assert any(any(p in c for p in paras) for c in caps)
    for obj in cap.OBJECTS:
        assert any(re.search(rf"\b{obj}\b", c) for c in caps)
    for col in cap.COLOURS:
        assert any(col in c for c in caps)
    for c, lab in zip(caps, labs):  # a caption never names a colour the picture does not have
        named = set(cap.colours_named(c))
        assert named <= {cap.COLOURS[o.colour] for o in lab.objects}, (c, lab)


def test_prompt_suites_of_world_2():
    from spm.toy.harness import fidelity_suite, prompt_suite

    s = prompt_suite(["sun", "fish"], world="icons")
    for case in s["literal"]:
        assert set(case.objects) <= {"sun", "fish"} and re.search(r"\b(sun|fish)\b", case.prompt)
    paras = {p for t in ("sun", "fish") for p in cap.PARAPHRASES[t]}
    for case in s["paraphrase"]:
        assert not re.search(r"\b(sun|fish)\b", case.prompt) and any(p in case.prompt for p in paras), case.prompt
    for case in s["nontarget"]:
        assert not set(case.objects) & {"sun", "fish"} and not re.search(r"\b(sun|fish)\b", case.prompt)
    for case in s["mixed"]:
        assert len(case.objects) == 2 and len(set(case.objects) & {"sun", "fish"}) == 1
        assert all(col in case.prompt for col in case.colours)
    assert prompt_suite("sun", world="icons") == prompt_suite("sun", world="icons")
    cases = fidelity_suite(4, world="icons")
    assert [c.objects[0] for c in cases[::4]] == list(cap.OBJECTS)
    with pytest.raises(ValueError, match="unknown object"):
        prompt_suite("circle", world="icons")


def test_targets_are_checked_against_the_world():
    from spm.toy.evaluate import normalise_targets

    assert normalise_targets([" Sun", "sun", "car"], world="icons") == ["sun", "car"]
    assert normalise_targets(["sun", "circle"]) == ["sun", "circle"]  # no world yet: any toy world's objects
    with pytest.raises(ValueError, match="not a toy-world object of the shapes world"):
        normalise_targets(["sun"], world="shapes")


# ----------------------------------------------------------------------------------------------- renders
def test_renders_are_deterministic_and_distinct():
    a_img, a_cap, a_lab = data.sample(7)
    b_img, b_cap, b_lab = data.sample(7)
    assert a_cap == b_cap and a_lab == b_lab and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert a_img.size == (W.image_size, W.image_size) and a_img.mode == "RGB"
    s_img, _, s_lab = data.sample(7, shifted=True)
    assert s_lab.shifted and not np.array_equal(np.asarray(a_img), np.asarray(s_img))
    imgs = [np.asarray(data.render(cap.make_labels([(o, "red")], "white", seed=1)), np.float32) for o in cap.OBJECTS]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 4.0, (cap.OBJECTS[i], cap.OBJECTS[j])
    x, labs = data.dataset_arrays(8, 3)
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.uint8 and len(labs) == 8


# ----------------------------------------------------------------------------------------------- model configs
def test_world_2_configs_differ_from_world_1():
    from spm.toy import model as M

    te, unet, sched = M.build_text_encoder("icons"), M.build_unet("icons"), M.build_scheduler("icons")
    te1, unet1 = M.build_text_encoder(), M.build_unet()
    assert (te.config.hidden_size, te.config.num_hidden_layers) == (48, 3)
    assert (te1.config.hidden_size, te1.config.num_hidden_layers) == (64, 2)
    assert te.get_input_embeddings().weight.shape == (49408, 48)
    assert unet.config.use_linear_projection and not unet1.config.use_linear_projection
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert isinstance(unet1.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert unet.config.cross_attention_dim == 48 and tuple(unet.config.block_out_channels) != tuple(unet1.config.block_out_channels)
    assert sched.config.prediction_type == "v_prediction" and M.train_scheduler("icons").config.prediction_type == "v_prediction"
    assert M.build_scheduler().config.prediction_type == "epsilon"
    assert set(WORLDS) >= {"shapes", "icons"}


# ----------------------------------------------------------------------------------------------- shipped assets
@needs_assets
def test_shipped_assets_load_with_their_shapes():
    from spm.hosts.diffusers import DiffusersBackend
    from spm.toy import load
    from spm.toy.evaluate import world_of
    from spm.toy.scorer import load_scorer

    pipe = load("toy2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection and isinstance(pipe.unet.mid_block.attentions[0].proj_out, torch.nn.Linear)
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder.config.num_hidden_layers) == (48, 3)
    assert world_of(pipe) is W and DiffusersBackend(pipe).parameterization == "v"
    ft = load("toy2-finetune")
    assert ft.text_encoder.config.hidden_size == 48 and world_of(ft) is W
    assert not torch.equal(next(ft.unet.parameters()), next(pipe.unet.parameters()))
    scorer = load_scorer(world="icons")
    assert scorer.heads == {k: n for k, (n, _) in cap.HEADS.items()}
    total = sum(f.stat().st_size for f in asset_dir("base", "icons").parent.rglob("*") if f.is_file())
    assert total <= 15 * 2**20, f"world 2's assets are {total / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------- a tiny build
def _tiny():
    from bench.toyworld.train import BuildConfig

    cfg = BuildConfig.quick()
    cfg.world = "icons"
    cfg.n_base, cfg.n_shift, cfg.n_scorer = 64, 32, 64
    cfg.vae_steps, cfg.unet_steps, cfg.ft_steps, cfg.scorer_steps = 2, 2, 1, 2
    cfg.vae_batch = cfg.unet_batch = cfg.ft_batch = cfg.scorer_batch = 8
    cfg.warmup = 1
    cfg.ckpt_every = 1  # the mid-run checkpoint path (removed again once the stage ends)
    return cfg


@pytest.mark.slow  # about 20 s on an idle 2-core machine, minutes on a shared one
def test_tiny_build_of_world_2_loads_and_generates(tmp_path, monkeypatch):
    from bench.toyworld.train import build
    from spm.toy.evaluate import world_of
    from spm.toy.harness import generate
    from spm.toy.model import load_toy_pipeline
    from spm.toy.scorer import load_scorer

    build(tmp_path, _tiny())
    monkeypatch.setenv(W.env, str(tmp_path))

    # fine-tuning the decoder keeps the encoder (the latent space the UNet was trained on) bit-identical
    from diffusers import AutoencoderKL

    from bench.toyworld.vae_decoder import finetune_decoder

    v0 = AutoencoderKL.from_pretrained(str(tmp_path / "base" / "vae"))
    rep = finetune_decoder(tmp_path, "icons", steps=2, batch=4, n=16, threads=1)
    v1 = AutoencoderKL.from_pretrained(str(tmp_path / "base" / "vae"))
    enc0, enc1 = v0.encoder.state_dict(), v1.encoder.state_dict()
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert not all(torch.equal(a, b) for a, b in zip(v0.decoder.parameters(), v1.decoder.parameters()))
    assert v1.config.scaling_factor == v0.config.scaling_factor and rep["decoder_steps"] == 2
    pipe = load_toy_pipeline("base", world="icons")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and world_of(pipe) is W
    assert pipe.unet.config.use_linear_projection and pipe.text_encoder.config.num_hidden_layers == 3
    assert (tmp_path / "finetune" / "unet").is_dir() and not (tmp_path / "base" / "checkpoint.json").exists()
    img = generate(pipe, ["a sun, red, on a white background"], [1], steps=2)[0]
    assert img.size == (32, 32)
    assert load_scorer(world="icons").heads == {k: n for k, (n, _) in cap.HEADS.items()}

    # the harness end to end on world 2 (v-prediction, linear projections): a zero membrane changes nothing
    from spm.membrane import Membrane, MembraneInfo
    from spm.naming import context_dim, describe_architecture, find_targets
    from spm.toy.evaluate import evaluate

    ctx = context_dim(pipe.unet)
    assert ctx == 48
    m = Membrane.for_targets(find_targets(pipe.unet), info=MembraneInfo(concepts=["sun"], context_dim=ctx,
                                                                        architecture=describe_architecture(ctx)))
    assert any("proj_in" in k for k in m.layers), "the Linear proj_in/proj_out are SPM targets too"
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_up.weight.zero_()
    small = {"n_literal": 1, "n_paraphrase": 1, "n_per_other": 1, "n_pairs": 0, "n_mixed": 1}
    r = evaluate(pipe, load_scorer(world="icons"), [(m, 1.0)], steps=2, cfg=5.0, suite=small)
    assert r["world"] == "icons" and r["targets"] == ["sun"] and r["psnr_unrelated_db"] == 100.0
    assert r["images"] == {"literal": 1, "paraphrase": 1, "nontarget": 7, "mixed": 1}
    with pytest.raises(ValueError, match="shapes world|icons world"):
        evaluate(pipe, load_scorer(world="icons"), [(m, 1.0)], [["circle"]], steps=2, suite=small)
