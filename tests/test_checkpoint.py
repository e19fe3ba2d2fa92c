import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from spm.attach import MembraneStack
from spm.checkpoint import (
    IncompatibleMembrane,
    MembraneFileError,
    load_membrane,
    read_file,
    resolve_targets,
    save_membrane,
)
from spm.membrane import Membrane, MembraneInfo
from spm.naming import KeyMap, file_key, find_targets
from tests.archs import diffusers_unet, ldm_unet, sgm_sdxl_transformers, tiny_diffusers_unet
from tests.helpers import random_membrane


@pytest.fixture(scope="module")
def sd1_targets():
    return find_targets(diffusers_unet("sd1"))


def write_reference_file(path, targets, rank=1, alpha=1.0, concepts="nudity", with_alpha=True):
    """A membrane exactly as the reference writes it: documented keys, prompts/rank/alpha metadata."""
    tensors = {}
    for t in targets:
        stem = file_key(t.canonical)
        if t.kind == "conv":
            down, up = torch.randn(rank, t.in_features, 1, 1), torch.randn(t.out_features, rank, 1, 1) * 0.01
        else:
            down, up = torch.randn(rank, t.in_features), torch.randn(t.out_features, rank) * 0.01
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        if with_alpha:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"prompts": concepts, "rank": str(rank), "alpha": str(alpha)})
    return tensors


def test_reference_file_loads_and_maps_to_ldm(tmp_path, sd1_targets):
    p = tmp_path / "nudity.safetensors"
    tensors = write_reference_file(p, sd1_targets)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (1, 768)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (1, 320, 1, 1)
    m = load_membrane(p)
    assert m.concepts == ["nudity"] and m.rank == 1 and len(m.layers) == 192
    assert m.info.architecture == "sd1" and m.info.source == "reference"
    ldm = ldm_unet("sd1")
    mapping = resolve_targets(m, KeyMap.for_model(ldm), "sd1", 768)
    assert len(mapping) == 192
    assert mapping["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].name == \
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    assert mapping["lora_unet_up_blocks_3_attentions_2_proj_out"].name == "output_blocks.11.1.proj_out"


def test_round_trip_exact_reference_keys(tmp_path, sd1_targets):
    info = MembraneInfo(concepts=["van gogh", "starry night"], surrogate="painting", architecture="sd1",
                        context_dim=768, training={"iterations": 3000, "lr": 1e-4})
    m = Membrane.for_targets(sd1_targets, info=info, name="vg")
    for layer in m.layers.values():
        torch.nn.init.normal_(layer.lora_up.weight)
    p = save_membrane(m, tmp_path / "vg.safetensors")
    raw = load_file(str(p))
    expected = {f"{file_key(t.canonical)}.{s}" for t in sd1_targets for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(raw) == expected
    _, meta = read_file(p)
    assert meta["prompts"] == "van gogh,starry night" and meta["rank"] == "1" and float(meta["alpha"]) == 1.0
    assert json.loads(meta["spm_concepts"]) == ["van gogh", "starry night"]
    assert meta["spm_surrogate"] == "painting" and meta["spm_architecture"] == "sd1"
    assert json.loads(meta["spm_training"])["iterations"] == 3000 and meta["spm_format_version"] == "1"
    back = load_membrane(p)
    assert back.concepts == info.concepts and back.info.surrogate == "painting" and back.info.source == "spm"
    for stem, layer in m.layers.items():
        assert torch.equal(back.layers[stem].lora_down.weight, layer.lora_down.weight)
        assert torch.equal(back.layers[stem].lora_up.weight, layer.lora_up.weight)


def test_pickle_suffix_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for suffix in (".pt", ".ckpt", ".bin"):
        p = tmp_path / f"m{suffix}"
        p.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(MembraneFileError, match="only .safetensors"):
            load_membrane(p)
    assert not marker.exists()


def test_pickle_renamed_safetensors(tmp_path):
    p = tmp_path / "m.safetensors"
    torch.save({"a": torch.zeros(2)}, p)
    with pytest.raises(MembraneFileError, match="pickle"):
        load_membrane(p)


def test_truncated_and_corrupt(tmp_path, sd1_targets):
    good = tmp_path / "good.safetensors"
    write_reference_file(good, sd1_targets[:4])
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(MembraneFileError, match="truncated"):
        load_membrane(trunc)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(MembraneFileError, match="corrupt"):
        load_membrane(bad)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(MembraneFileError, match="empty"):
        load_membrane(empty)


def test_nan_and_unknown_keys(tmp_path, sd1_targets):
    p = tmp_path / "nan.safetensors"
    t = write_reference_file(p, sd1_targets[:2])
    k = next(k for k in t if k.endswith("lora_up.weight"))
    t[k] = t[k].clone()
    t[k][0] = float("nan")
    save_file(t, str(p))
    with pytest.raises(MembraneFileError, match="NaN"):
        load_membrane(p)
    t[k] = torch.zeros_like(t[k])
    t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(1, 4)
    save_file(t, str(p))
    with pytest.raises(MembraneFileError, match="text-encoder"):
        load_membrane(p)


def test_missing_alpha_means_alpha_equals_rank_and_rank_gt_1(tmp_path, sd1_targets):
    p = tmp_path / "r4.safetensors"
    write_reference_file(p, sd1_targets, rank=4, with_alpha=False)
    m = load_membrane(p)
    assert m.rank == 4
    assert all(float(layer.alpha) == 4.0 and layer.scale == 1.0 for layer in m.layers.values())


def test_wrong_architecture_named_and_nothing_attached(tmp_path, sd1_targets):
    p = tmp_path / "nudity.safetensors"
    write_reference_file(p, sd1_targets)
    m = load_membrane(p)
    km = KeyMap.for_model(sgm_sdxl_transformers())
    with pytest.raises(IncompatibleMembrane) as e:
        resolve_targets(m, km, "sdxl", 2048)
    assert str(e.value) == "nudity.safetensors is for SD1.x (context 768); the loaded model is SDXL (context 2048)"
    unet = tiny_diffusers_unet()
    stack = MembraneStack(unet)
    with pytest.raises(IncompatibleMembrane, match="is for SD1.x"):
        stack.add(m)
    assert stack.names == [] and not stack._hooks


def test_info_cli(tmp_path):
    unet = tiny_diffusers_unet()
    m = random_membrane(unet, name="circle", concepts=("circle",))
    p = save_membrane(m, tmp_path / "circle.safetensors")
    out = subprocess.run([sys.executable, "-m", "spm", "info", str(p)], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert d["concepts"] == ["circle"] and d["rank"] == 1 and d["modules"] == len(find_targets(unet))
    assert d["architecture"] == "custom-ctx32"
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"junk")
    r = subprocess.run([sys.executable, "-m", "spm", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "only .safetensors" in r.stderr
