"""The ``robust`` metric (membrane gate) through the WebUI glue (A1111 1.10 and Forge stand-ins) and the diffusers host."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from spm.checkpoint import save_membrane
from spm.gate import GATE_SUFFIXES
from spm.transport import BOS, EOS, ROBUST_METRIC
from tests.helpers import random_membrane
from tests.test_gate import DIM, Toy, cat_membrane
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


class ToyCLIP(torch.nn.Module):
    """The stand-in CLIP transformer with :class:`tests.test_gate.Toy`'s geometry (a random CLIP this small
    mixes its states so much that no single direction sets "cat" apart from 75-token random text)."""

    def __init__(self, toy: Toy):
        super().__init__()
        self.toy = toy

    def forward(self, ids, **_):
        out = self.toy.offset.expand(ids.shape[0], ids.shape[1], DIM).clone()
        for r, row in enumerate(ids.tolist()):
            for j, i in enumerate(row):
                if i not in (BOS, EOS):
                    out[r, j] += self.toy.vec(i)
        return SimpleNamespace(last_hidden_state=out)


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_robust_metric_in_the_webui(tmp_path, tokenizer, forge):
    w = World(tmp_path, tokenizer, ToyCLIP(Toy(tokenizer)), forge=forge)
    try:
        m = cat_membrane(w.unet)
        save_membrane(m, w.folder / "cat.safetensors")
        w.state.library().refresh()
        prompts = ["a photo of a cat", "a red car on a road"]
        base = w.run(prompts, batch_size=2)
        out = w.run(prompts, batch_size=2, args=(True, ["cat"], "cat:1.0", ROBUST_METRIC, 1.0))
        s = w.strengths[0][:, 0].tolist()  # A1111 rows: cond img0, cond img1, uncond, uncond; Forge: uncond first
        assert s == ([0.0, 0.0, 1.0, 0.0] if forge else [1.0, 0.0, 0.0, 0.0])
        assert not torch.equal(out.images[0], base.images[0])
        assert torch.equal(out.images[1], base.images[1])  # the unrelated prompt's image is bit-identical
        assert out.infotexts[0]["SPM transport"] == f"{ROBUST_METRIC} x1.0"
        tr = w.state.runtime().attachment.transport
        gates = [g for _, g in tr.gates._gates.values()]  # prepared before sampling, from the membrane in the library
        assert len(gates) == 1 and gates[0].usable and gates[0].source == "computed"
    finally:
        w.close()


def test_robust_metric_in_the_diffusers_host():
    """On the shipped toy model (its trained text encoder), a membrane aimed at "circle": the gate is usable, the
    circle prompt gets full strength, an unrelated prompt and the negative rows 0 and bit-identical latents."""
    from spm.hosts.diffusers import PipelineMembranes
    from spm.toy import load
    from tests.test_hosts_diffusers import generate

    pipe = load("toy")
    pipe.set_progress_bar_config(disable=True)
    m = random_membrane(pipe.unet, "circle", concepts=("circle",), std=0.05)
    _aim_at(m, pipe.text_encoder, pipe.tokenizer, "circle")
    prompts = ["a red circle", "a blue square on a black background"]
    base = generate(pipe, prompts)
    with PipelineMembranes(pipe, [(m, 1.0)], metric=ROBUST_METRIC) as pm:
        out = generate(pipe, prompts)
        s = pm.stack.current_strengths[:, 0].tolist()
        gate = pm.transport.gates.peek(m)
    assert gate is not None and gate.usable, gate.reason
    assert s == [0.0, 0.0, 1.0, 0.0]  # rows: uncond, uncond, the circle prompt, the square prompt
    assert torch.equal(out[1], base[1]) and not torch.equal(out[0], base[0])
