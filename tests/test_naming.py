import pytest
import torch

from spm.naming import (
    KeyMap,
    NamingError,
    file_key,
    find_targets,
    layers_per_block_of,
    to_diffusers,
    to_ldm,
)
from tests.archs import diffusers_unet, ldm_unet, sgm_sdxl_transformers

EXPECTED = {"sd1": 192, "sd2": 192, "sdxl": 722}
CONV = {"sd1": 32, "sd2": 0, "sdxl": 0}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def unets():
    return {a: diffusers_unet(a) for a in EXPECTED}


@pytest.fixture(scope="module")
def ldms():
    return {"sd1": ldm_unet("sd1"), "sd2": ldm_unet("sd2"), "sdxl": sgm_sdxl_transformers()}


def test_counts_diffusers(unets, arch):
    ts = find_targets(unets[arch])
    assert len(ts) == EXPECTED[arch]
    assert sum(t.kind == "conv" for t in ts) == CONV[arch]
    assert all(t.name == t.canonical for t in ts)


def test_counts_ldm(ldms, arch):
    ts = find_targets(ldms[arch])
    assert len(ts) == EXPECTED[arch]
    assert sum(t.kind == "conv" for t in ts) == CONV[arch]
    assert all(t.name.startswith(("input_blocks", "middle_block", "output_blocks")) for t in ts)


def test_both_namings_agree(unets, ldms, arch):
    d = {t.canonical: t for t in find_targets(unets[arch])}
    ldm = find_targets(ldms[arch])
    assert {t.canonical for t in ldm} == set(d)
    for t in ldm:
        ref = d[t.canonical]
        assert (t.kind, t.in_features, t.out_features) == (ref.kind, ref.in_features, ref.out_features)
        assert to_ldm(t.canonical, 2) == t.name


def test_sd1_parameter_count(unets):
    ts = find_targets(unets["sd1"])
    n = sum(t.in_features + t.out_features for t in ts)  # rank 1: down in + up out
    assert 400_000 < n < 450_000  # the reference quotes about 424k


@pytest.mark.parametrize("arch_ldm", ["sd1", "sd2", "sdxl"])
def test_rule_matches_diffusers_single_file_conversion(arch_ldm):
    """Derive LDM→diffusers names with diffusers' own converter (marker values) and compare."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests.archs import DIFFUSERS_CONFIGS, LDM_SD1

    if arch_ldm == "sdxl":  # SDXL's block layout (3 levels, no attention at level 0) on the CompVis class
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        cfg = dict(LDM_SD1, channel_mult=[1, 2, 4], attention_resolutions=[4, 2], num_heads=-1, num_head_channels=64,
                   context_dim=2048, use_linear_in_transformer=True)
        with torch.device("meta"):
            model = UNetModel(**cfg)
        dcfg = dict(DIFFUSERS_CONFIGS["sdxl"])
        for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                  "transformer_layers_per_block"):
            dcfg.pop(k)
    else:
        model = ldm_unet(arch_ldm)
        dcfg = DIFFUSERS_CONFIGS[arch_ldm]
    keys = list(model.state_dict().keys())
    ckpt = {"model.diffusion_model." + k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    conv = convert_ldm_unet_checkpoint(ckpt, dcfg)
    by_marker = {int(v.item()): k for k, v in conv.items() if v.numel() == 1}
    checked = 0
    for t in find_targets(model):
        i = keys.index(t.name + ".weight")
        assert by_marker[i] == t.canonical + ".weight"
        assert to_diffusers(t.name, 2) == t.canonical
        checked += 1
    assert checked == len(find_targets(model)) > 0


def test_layers_per_block(unets, ldms):
    assert layers_per_block_of(unets["sd1"]) == 2
    assert layers_per_block_of(ldms["sd1"]) == 2
    assert layers_per_block_of(ldms["sdxl"]) == 2


def test_keymap_accepts_reference_and_kohya_ldm_keys(ldms):
    km = KeyMap.for_model(ldms["sdxl"])
    ref = file_key("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k")
    kohya = file_key("input_blocks.4.1.transformer_blocks.1.attn2.to_k")
    assert km.resolve(ref) is km.resolve(kohya)
    assert km.resolve(ref).name == "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    assert km.resolve("lora_unet_nonsense") is None


def test_reference_key_example():
    assert file_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def test_non_targets_rejected():
    with pytest.raises(NamingError):
        to_ldm("down_blocks.0.resnets.0.conv1")
    with pytest.raises(NamingError):
        to_diffusers("input_blocks.3.0.op")  # a downsampler slot holds no attention
