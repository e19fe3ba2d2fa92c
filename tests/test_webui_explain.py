"""The WebUI's "Why these strengths?": the panel's Explain button and ``POST /spm/v1/explain``, on the stub WebUI."""

from __future__ import annotations

import pytest
import torch

from tests import webui_stub as stub
from tests.test_webui_lifecycle import world  # noqa: F401  (the stub WebUI with the extension loaded)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def client(world):  # noqa: F811
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    stub.fire("app_started", None, app)
    return TestClient(app)


def test_explain_matches_what_generation_uses(world):  # noqa: F811
    """The explanation's strength is the one the generation's hooks use (same transport, same metric)."""
    from spm.webui.explain import explain_prompt

    world.add_membrane("cat", concepts=("cat",))
    text, warnings = explain_prompt("a photo of a cat", True, ["cat"], "cat:0.7", "ngram_tokenuni", 1.0)
    assert warnings == []
    assert "membrane cat: weight 0.7 (from the panel)" in text
    assert "cat" in text and "ngram_tokenuni" in text
    world.run(["a photo of a cat"], args=(True, ["cat"], "cat:0.7", "ngram_tokenuni", 1.0))
    used = world.strengths[0][0, 0].item()  # the cond row of the one image
    assert f"{used / 0.7:.2f}" in text  # the score before the weight, as printed


def test_explain_reads_the_prompts_own_tags_and_restores_the_transport(world):  # noqa: F811
    from spm.webui.explain import explain_prompt

    world.add_membrane("cat", concepts=("cat",))
    att = world.state.runtime().attach(world.model)
    att.transport.metric, att.transport.factor = "off", 2.0
    text, _ = explain_prompt("a red car <spm:cat:0.5>", False, [], "", "tokenuni", 1.5)
    assert "membrane cat: weight 0.5 (from a <spm:> tag)" in text and "facilitate factor 1.5" in text
    assert (att.transport.metric, att.transport.factor) == ("off", 2.0)
    base = world.run(["a red car"])
    out = world.run(["a red car"])  # explaining attached nothing: images are still bit-identical
    assert torch.equal(base.images[0], out.images[0])


def test_explain_problems_are_messages(world):  # noqa: F811
    from spm.webui.explain import NO_MEMBRANE, NO_PROMPT, ExplainError, explain_prompt, panel_explain

    assert panel_explain("", True, [], "", "ngram_tokenuni", 1.0) == NO_PROMPT
    assert panel_explain("a cat", True, [], "", "ngram_tokenuni", 1.0).startswith(NO_MEMBRANE)
    msg = panel_explain("a cat <spm:nope:1>", False, [], "", "ngram_tokenuni", 1.0)
    assert msg.startswith(NO_MEMBRANE) and "'nope' skipped" in msg
    world.add_membrane("cat")
    with pytest.raises(ExplainError, match="unknown transport metric 'bogus'"):
        explain_prompt("a cat", True, ["cat"], "", "bogus", 1.0)
    with pytest.raises(ExplainError, match="not a number"):
        explain_prompt("a cat", True, ["cat"], "", "off", "x")
    world.env.shared.sd_model = None
    with pytest.raises(ExplainError, match="generate one image") as e:
        explain_prompt("a cat", True, ["cat"], "", "off", 1.0)
    assert e.value.status == 409


def test_explain_route(world, client):  # noqa: F811
    world.add_membrane("cat", concepts=("cat",))
    r = client.post("/spm/v1/explain", json={"prompt": "a photo of a cat", "membranes": ["cat"]})
    assert r.status_code == 200, r.text
    d = r.json()
    assert "membrane cat: weight 1.0" in d["text"] and d["warnings"] == []
    r = client.post("/spm/v1/explain", json={"prompt": "a cat <spm:cat:0.25>"})
    assert r.status_code == 200 and "weight 0.25" in r.json()["text"] and r.json()["prompt"] == "a cat"
    assert client.post("/spm/v1/explain", json={"prompt": "a cat"}).status_code == 400
    assert client.post("/spm/v1/explain", json={"prompt": "a cat", "wieghts": "x"}).json()["detail"].startswith("unknown fields")
    assert client.post("/spm/v1/explain", content=b"not json").status_code == 400
    world.env.shared.sd_model = None
    assert client.post("/spm/v1/explain", json={"prompt": "a cat", "membranes": ["cat"]}).status_code == 409
