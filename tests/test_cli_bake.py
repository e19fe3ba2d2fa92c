"""``python -m spm bake``: the baked UNet gives the hook path's output (strength 1, transport off), in both layouts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from spm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _membrane(unet, concept: str, seed: int, std: float = 0.05):
    from spm.membrane import Membrane, MembraneInfo
    from spm.naming import context_dim, describe_architecture, find_targets

    ctx = context_dim(unet)
    m = Membrane.for_targets(find_targets(unet), info=MembraneInfo(concepts=[concept], architecture=describe_architecture(ctx),
                                                                   context_dim=ctx), name=concept)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * std)
    return m


@pytest.fixture(scope="module")
def toy():
    from spm import toy as toys
    from spm.checkpoint import save_membrane

    pipe = toys.load("toy")
    d = Path(__import__("tempfile").mkdtemp())
    files = []
    for i, c in enumerate(["circle", "star"]):
        f = d / f"{c}.safetensors"
        save_membrane(_membrane(pipe.unet, c, i), f)
        files.append(f)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500, 120])
    ctx = torch.randn(2, 77, 64, generator=g)
    return {"pipe": pipe, "files": files, "inputs": (x, t, ctx), "dir": d}


def _hook_output(pipe, files, weights, inputs):
    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import PipelineMembranes

    x, t, ctx = inputs
    with torch.no_grad(), PipelineMembranes(pipe, [(load_membrane(f), w) for f, w in zip(files, weights)], transport=False):
        return pipe.unet(x, t, encoder_hidden_states=ctx).sample


def _unet_output(unet, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def _hashes(root: Path) -> dict:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _close(a, b, ref):
    scale = float((ref - a).abs().max())  # what the membranes change: the tolerance is small against it
    assert scale > 1e-3, "the membranes change nothing: the test would prove nothing"
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max())), (float((a - b).abs().max()), scale)


def test_bake_toy_and_diffusers_folder_match_the_hook_path(toy, tmp_path, capsys):
    from spm.bake import BAKED_KEY
    from spm.hosts.diffusers import load_pipeline

    pipe, (f1, f2), inputs = toy["pipe"], toy["files"], toy["inputs"]
    plain = _unet_output(pipe.unet, inputs)
    hooked = _hook_output(pipe, [f1, f2], [1.0, 0.6], inputs)

    out = tmp_path / "baked_toy"
    assert main(["bake", "--model", "toy", "--membrane", str(f1), "--membrane", f"{f2}:0.6", "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    baked = load_pipeline(str(out), device="cpu")
    _close(hooked, _unet_output(baked.unet, inputs), plain)

    # a diffusers folder in, a diffusers folder out; the input is not touched
    src = tmp_path / "src"
    pipe.save_pretrained(str(src))
    before = _hashes(src)
    out2 = tmp_path / "baked_folder"
    assert main(["bake", "--model", str(src), "--membrane", str(f1), "--membrane", f"{f2}:0.6", "-o", str(out2), "--quiet"]) == 0
    assert _hashes(src) == before
    _close(hooked, _unet_output(load_pipeline(str(out2), device="cpu").unet, inputs), plain)
    from safetensors import safe_open

    with safe_open(str(out2 / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert "circle" in f.metadata()[BAKED_KEY]
    # the text encoder and VAE are copied as they were
    assert _hashes(out2 / "vae")[str(out2 / "vae" / "diffusion_pytorch_model.safetensors")] == \
        before[str(src / "vae" / "diffusion_pytorch_model.safetensors")]
    # an existing output is not replaced silently
    assert main(["bake", "--model", str(src), "--membrane", str(f1), "-o", str(out2)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bake_ldm_single_file_matches_the_hook_path_and_keeps_everything_else(toy, tmp_path, capsys):
    pytest.importorskip("ldm")
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from bench.toyworld.ldm import from_ldm_state_dict, to_ldm_state_dict

    pipe, (f1, f2), inputs = toy["pipe"], toy["files"], toy["inputs"]
    src = tmp_path / "toy_ldm.safetensors"
    save_file(to_ldm_state_dict(pipe.text_encoder, pipe.vae, pipe.unet, dtype=torch.float32), str(src),
              metadata={"format": "pt", "note": "kept"})
    before = _hashes(src)
    out = tmp_path / "baked.safetensors"
    assert main(["bake", "--model", str(src), "--membrane", f"{f1}:1", "--membrane", f"{f2}:0.6", "-o", str(out), "--quiet"]) == 0
    assert _hashes(src) == before
    a, b = load_file(str(src)), load_file(str(out))
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("model.diffusion_model.") and k.endswith(".weight") for k in changed)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["note"] == "kept"

    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.load_state_dict(from_ldm_state_dict(b, dict(pipe.unet.config), dict(pipe.vae.config))["unet"], strict=True)
    _close(_hook_output(pipe, [f1, f2], [1.0, 0.6], inputs), _unet_output(unet.eval(), inputs), _unet_output(pipe.unet, inputs))

    # fp16 checkpoints stay fp16: the merge runs in fp32 and is cast back
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in a.items()}, str(half))
    out16 = tmp_path / "baked16.safetensors"
    assert main(["bake", "--model", str(half), "--membrane", str(f1), "-o", str(out16), "--quiet"]) == 0
    assert {v.dtype for v in load_file(str(out16)).values()} == {torch.float16}


def test_bake_refuses_other_architectures_and_bad_input(toy, tmp_path, capsys):
    from spm.checkpoint import save_membrane
    from tests.test_train_models import tiny_sd_pipe

    other = tmp_path / "other.safetensors"
    save_membrane(_membrane(tiny_sd_pipe().unet, "dog", 0), other)
    out = tmp_path / "never"

    def fails(*argv, expect: str):
        assert main(["bake", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
        assert not out.exists() and not list(tmp_path.glob(".never*"))

    fails("--model", "toy", "--membrane", str(other), "-o", str(out), expect="is for")
    fails("--model", "toy", "--membrane", str(tmp_path / "gone.safetensors"), "-o", str(out), expect="no such file")
    fails("--model", str(tmp_path / "nope"), "--membrane", str(toy["files"][0]), "-o", str(out), expect="no such file")
    fails("--model", "toy", "--membrane", f"{toy['files'][0]}:nan", "-o", str(out), expect="not a finite number")
    lora = tmp_path / "lora.safetensors"
    save_membrane(_membrane(toy["pipe"].unet, "x", 1), lora)
    fails("--model", str(lora), "--membrane", str(toy["files"][0]), "-o", str(tmp_path / "never.safetensors"),
          expect="not a single-file SD checkpoint")
