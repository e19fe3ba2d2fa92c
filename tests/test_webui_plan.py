"""Per-batch planning (panel + each prompt's tags) and the script-argument normalisation, without a model."""

import pytest

from spm.checkpoint import save_membrane
from spm.library import Library
from spm.transport import DEFAULT_METRIC
from spm.webui.plan import Planner
from spm.webui.runtime import RowWeightTransport, TextRegistry, derived_groups, lookup_with_prefix
from tests.test_library import tiny


@pytest.fixture
def planner(tmp_path):
    (tmp_path / "styles").mkdir()
    save_membrane(tiny(concepts=("nudity",)), tmp_path / "nudity.safetensors")
    save_membrane(tiny(concepts=("Van Gogh",)), tmp_path / "styles" / "van_gogh.safetensors")
    lib = Library(tmp_path)
    lib.refresh()
    return Planner(lib)


def test_tag_overrides_panel_for_its_prompt_only(planner):
    plan = planner.plan({"nudity": 0.5}, ["a <spm:nudity:1.2>", "b <spm:van_gogh:0.3>", "c"], ["a ", "b ", "c"])
    assert list(plan.membranes) == ["nudity", "styles/van_gogh"]  # stems resolve to listed names
    assert plan.prompts == [("a ", {"nudity": 1.2}), ("b ", {"nudity": 0.5, "styles/van_gogh": 0.3}), ("c", {"nudity": 0.5})]
    assert plan.panel == {"nudity": 0.5}
    assert plan.infotext() == "nudity:0.5, styles/van_gogh:0.3"
    assert plan.warnings == []


def test_override_and_warnings(planner):
    plan = planner.plan({"gone": 1.0}, ["x <spm:nudity:2> <spm:nope> <spm:>", "y <spm:nope>"], weight_override=0.0)
    assert plan.prompts[0][1] == {"nudity": 0.0}
    assert len(plan.warnings) == 3  # gone (panel), nope (once: deduplicated), <spm:>
    assert any("membrane 'gone'" in w for w in plan.warnings) and any("<spm:>" in w for w in plan.warnings)
    assert plan.prompts[0][0] == "x   "  # without WebUI-stripped prompts, SPM strips its own tags


def test_panel_weights_from_ui_and_api(tmp_path):
    from tests import webui_stub as stub

    stub.install(tmp_path)
    try:
        from spm.webui.script import panel_weights, parse_transport_infotext

        assert panel_weights(False, ["a"], "a:1") == ({}, [])
        assert panel_weights(True, ["a", "b"], "a:0.4", 0.7)[0] == {"a": 0.4, "b": 0.7}
        assert panel_weights(True, "a, b", "", 1.0)[0] == {"a": 1.0, "b": 1.0}  # API: a string of names
        assert panel_weights(True, [], {"c": 0.2})[0] == {"c": 0.2}  # API: weights as an object
        w, problems = panel_weights(True, [], "c:x")
        assert w == {} and "not a number" in problems[0]
        assert parse_transport_infotext("tokenuni x1.25") == ("tokenuni", 1.25)
        assert parse_transport_infotext("bogus") == (DEFAULT_METRIC, 1.0)
    finally:
        stub.uninstall()


def test_row_weights_rule():
    import torch

    t = RowWeightTransport(lambda texts: (torch.zeros(len(texts), 77, 4), [[] for _ in texts]), None, metric="off")
    rows = torch.randn(4, 77, 4)
    t.texts.record(rows[:2], ["a cat", "a car"], negative=False)
    t.texts.record(rows[2:3], ["a cat"], negative=True)  # same text as a negative prompt
    t.set_weights({"m": 0.5}, {"a cat": {"m": 1.0, "n": 0.3}})
    w = t.row_weights(rows, ["m", "n"])
    # own prompt's weights; a prompt without an entry and negative/unknown rows get the panel weights
    assert w.tolist() == [[1.0, pytest.approx(0.3)], [0.5, 0.0], [0.5, 0.0], [0.5, 0.0]]


def test_prefix_lookup_and_text_registry():
    import torch

    reg = TextRegistry()
    short = torch.randn(1, 77, 8)
    reg.record(short, ["short"], negative=False)
    padded = torch.cat([short, short[:, -1:].repeat(1, 77, 1)], 1)
    repeated = short.repeat(1, 2, 1)
    assert reg.lookup(torch.cat([padded, repeated])) == [("short", False), ("short", False)]
    assert lookup_with_prefix(lambda r: [None] * r.shape[0], torch.randn(2, 100, 8)) == [None, None]


def test_derived_groups_follow_the_webui_parser(tmp_path):
    from tests import webui_stub as stub

    assert derived_groups("plain", [20]) == [("plain",)]  # no WebUI: the prompt itself
    stub.install(tmp_path)
    try:
        groups = derived_groups("a [dog:cat:0.5] AND a tree:0.4", [20, 1000], [None])
        assert ("a dog", "a cat") in groups and (" a tree",) in groups
    finally:
        stub.uninstall()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rows_cast_to_the_unet_dtype_are_recognised(dtype):
    """A1111 casts the conditioning to the UNet's dtype (fp16, or bf16) before the call."""
    import torch

    torch.manual_seed(0)
    reg = TextRegistry()
    rows = torch.randn(3, 77, 32) * 3
    reg.record(rows, ["a", "b", "c"], negative=False)
    cast = rows.to(getattr(torch, dtype))
    assert reg.lookup(cast) == [("a", False), ("b", False), ("c", False)]
    assert reg.lookup(torch.randn(1, 77, 32).to(getattr(torch, dtype))) == [None]


def test_token_transport_on_bf16_rows():
    import torch

    from spm.membrane import Membrane, MembraneInfo

    vocab: dict[str, int] = {}

    def tokenize(texts):  # deterministic ids (str hash() is salted per process and may collide)
        return [[vocab.setdefault(w, len(vocab) + 1) for w in t.split()] for t in texts]

    def encode(texts):
        return torch.zeros(len(texts), 77, 8), tokenize(texts)

    t = RowWeightTransport(encode, tokenize, metric="tokenuni")
    rows = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    t.record(["a cat", "a car"], rows, negative=False)
    t.set_weights({}, {"a cat": {"m": 0.5}, "a car": {"m": 1.0}})
    m = Membrane({}, MembraneInfo(concepts=["cat"]), name="m")
    s = t.scores(rows.to(torch.bfloat16), [m])
    assert s[:, 0].tolist() == [0.5, 0.0]  # "a cat" has the concept's token; "a car" does not
