"""The ``robust`` metric (membrane gate) through the WebUI glue (A1111 1.10 and Forge stand-ins) and the diffusers host."""

from __future__ import annotations

import pytest
import torch

from spm.checkpoint import save_membrane
from spm.gate import GATE_SUFFIXES
from spm.transport import ROBUST_METRIC
from tests.helpers import random_membrane
from tests.test_webui_lifecycle import World

pytestmark = pytest.mark.usefixtures("one_thread")


def _aim_at(membrane, text_encoder, tokenizer, word: str = "cat") -> None:
    """Point the membrane's cross-attention key/value downs at ``word``'s state (centred on other tokens' states),
    as training does for the concept it erases."""
    ids = tokenizer(f"a photo of a {word}", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = text_encoder(ids).last_hidden_state[0]
    pos = ids[0].tolist().index(tokenizer(word).input_ids[1])
    u = torch.nn.functional.normalize(h[pos] - h.mean(0), dim=0)
    with torch.no_grad():
        for stem, layer in membrane.layers.items():
            if stem.endswith(GATE_SUFFIXES):
                layer.lora_down.weight.copy_(u[None] * layer.lora_down.weight.norm())


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_robust_metric_in_the_webui(tmp_path, tokenizer, text_encoder, forge):
    w = World(tmp_path, tokenizer, text_encoder, forge=forge)
    try:
        m = random_membrane(w.unet, name="cat", concepts=("cat",), seed=1, std=0.3)
        _aim_at(m, text_encoder, tokenizer)
        save_membrane(m, w.folder / "cat.safetensors")
        w.state.library().refresh()
        prompts = ["a photo of a cat", "a red car on a road"]
        base = w.run(prompts, batch_size=2)
        out = w.run(prompts, batch_size=2, args=(True, ["cat"], "cat:1.0", ROBUST_METRIC, 1.0))
        s = w.strengths[0][:, 0].tolist()  # rows: cond img0, cond img1, uncond, uncond
        assert s == [1.0, 0.0, 0.0, 0.0]
        assert not torch.equal(out.images[0], base.images[0])
        assert torch.equal(out.images[1], base.images[1])  # the unrelated prompt's image is bit-identical
        assert out.infotexts[0]["SPM transport"] == f"{ROBUST_METRIC} x1.0"
        tr = w.state.runtime().attachment.transport
        gates = [g for _, g in tr.gates._gates.values()]  # prepared before sampling, from the membrane in the library
        assert len(gates) == 1 and gates[0].usable and gates[0].source == "computed"
    finally:
        w.close()


def test_robust_metric_in_the_diffusers_host(tokenizer, text_encoder):
    from spm.hosts.diffusers import PipelineMembranes
    from tests.test_hosts_diffusers import generate
    from tests.test_train_models import tiny_sd_pipe

    pipe = tiny_sd_pipe()
    m = random_membrane(pipe.unet, "cat", concepts=("cat",), std=0.5)
    _aim_at(m, pipe.text_encoder, tokenizer)
    prompts = ["a photo of a cat", "a red car on a road"]
    base = generate(pipe, prompts)
    with PipelineMembranes(pipe, [(m, 1.0)], metric=ROBUST_METRIC) as pm:
        out = generate(pipe, prompts)
        s = pm.stack.current_strengths[:, 0].tolist()
        gate = pm.transport.gates.peek(m)
    assert gate is not None and gate.usable
    assert s == [0.0, 0.0, 1.0, 0.0]  # rows: uncond, uncond, the cat prompt, the car prompt
    assert torch.equal(out[1], base[1]) and not torch.equal(out[0], base[0])
