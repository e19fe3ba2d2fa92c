"""``--model``: the shipped toy models by name, toy asset folders, and models saved by current diffusers/transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from spm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_toy_names_in_generate_and_train(tmp_path, capsys):
    from PIL import Image

    from spm import toy
    from spm.checkpoint import load_membrane

    for name in toy.MODELS:
        png = tmp_path / f"{name}.png"
        assert main(["generate", "--model", name, "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
                     "-o", str(png)]) == 0
        assert Image.open(png).size == (32, 32)
    capsys.readouterr()
    out = tmp_path / "circle.safetensors"
    assert main(["train", "--model", "toy", "--target", "circle", "-o", str(out), "--iterations", "1", "--pool-size", "1",
                 "--max-denoising-steps", "2", "--anchors", "1", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    assert load_membrane(out).concepts == ["circle"]


def test_toy_asset_folder_loads_as_a_model(tmp_path):
    """A toy asset folder (unet/, vae/, text_encoder/, scheduler/; no model_index.json) was 'no model_index.json'."""
    from spm import toy
    from spm.hosts.diffusers import load_pipeline
    from spm.toy.model import asset_dir

    folder = asset_dir("base")
    assert not (folder / "model_index.json").exists()
    pipe = load_pipeline(str(folder), device="cpu")
    ref = toy.load("toy")
    for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe.tokenizer("a circle").input_ids == ref.tokenizer("a circle").input_ids
    assert type(pipe.scheduler).__name__ == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    # a folder with only some of the parts says which are missing
    part = tmp_path / "part"
    shutil.copytree(folder / "unet", part / "unet")
    with pytest.raises(ValueError, match="vae/, text_encoder/, scheduler/"):
        load_pipeline(str(part))


def test_eval_model_names_and_aliases():
    from spm import toy
    from spm.cli import _finetune_of, _toy_name

    assert _toy_name("base") == "toy" and _toy_name("finetune") == "toy-finetune"
    assert all(_toy_name(n) == n for n in toy.MODELS) and _toy_name("some/folder") is None
    assert _finetune_of("toy") == "toy-finetune"


def test_standalone_tab_loads_a_toy_model_by_name():
    from spm.ui.__main__ import make_provider

    backend = make_provider("toy-finetune", device="cpu")()
    ref = __import__("spm.toy", fromlist=["load"]).load("toy-finetune")
    w = next(iter(ref.unet.state_dict().values()))
    assert torch.equal(next(iter(backend.pipe.unet.state_dict().values())), w)


# --- a model saved by current transformers: tokenizer.json only, text-encoder keys without text_model. ----------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from spm import toy

    d = tmp_path_factory.mktemp("saved") / "pipe"
    pipe = toy.load("toy")
    pipe.save_pretrained(str(d))
    return d, pipe


def _modern(saved, dst: Path) -> Path:
    """The saved toy pipeline in the transformers >= 5 layout."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizerFast

    src, pipe = saved
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "tokenizer")
    fast = CLIPTokenizerFast.from_pretrained(str(src / "tokenizer"))
    fast.save_pretrained(str(dst / "tokenizer"), legacy_format=False)
    assert sorted(p.name for p in (dst / "tokenizer").iterdir() if p.name in ("vocab.json", "merges.txt")) == []
    f = dst / "text_encoder" / "model.safetensors"
    sd = load_file(str(f))
    assert all(k.startswith("text_model.") for k in sd)
    save_file({k[len("text_model."):]: v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    return dst


def test_current_transformers_layout_loads_with_the_real_weights(saved, tmp_path):
    from spm.hosts.diffusers import load_pipeline

    _, ref = saved
    d = _modern(saved, tmp_path / "modern")
    pipe = load_pipeline(str(d), device="cpu")
    texts = ["a red circle on a white background", "a star"]
    assert pipe.tokenizer(texts).input_ids == ref.tokenizer(texts).input_ids
    ids = ref.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], ref.text_encoder(ids)[0])  # not a randomly initialised encoder


def test_weights_that_do_not_load_are_an_error(saved, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from spm.hosts.diffusers import ModelLoadError, load_pipeline

    d = _modern(saved, tmp_path / "broken")
    f = d / "text_encoder" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("final_layer_norm.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"text encoder weights do not fit CLIPTextModel \(1 \(first: "
                                             r"text_model.final_layer_norm.weight\) missing keys\)"):
        load_pipeline(str(d))
    assert main(["generate", "--model", str(d), "--prompt", "x", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "random weights" in err and "Traceback" not in err

    u = d / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copytree(saved[0] / "text_encoder", d / "text_encoder", dirs_exist_ok=True)
    usd = load_file(str(u))
    usd["extra.weight"] = torch.zeros(1)
    save_file(usd, str(u), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"unet weights do not fit UNet2DConditionModel \(1 \(first: extra.weight\) unexpected"):
        load_pipeline(str(d))
    usd.pop("extra.weight")
    usd.pop("conv_in.bias")
    save_file(usd, str(u), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="conv_in.bias"):
        load_pipeline(str(d))

    for p in (d / "tokenizer").iterdir():
        p.unlink()
    with pytest.raises(ModelLoadError, match="vocab.json \\+ merges.txt, or tokenizer.json"):
        load_pipeline(str(d))
