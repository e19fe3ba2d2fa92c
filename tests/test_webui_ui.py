"""The SPM panel built with real Gradio (3.41 as in A1111 1.10, 4.40 as in Forge), against the stub WebUI.

Skipped where Gradio is not installed (the default test environment); run it in a venv with
``gradio==3.41.2`` or ``gradio==4.40.0`` (see the README, section "Tests").
"""

import runpy
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from spm.checkpoint import save_membrane  # noqa: E402
from tests import webui_stub as stub  # noqa: E402
from tests.test_library import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def script(tmp_path):
    env = stub.install(tmp_path)
    folder = Path(env.shared.cmd_opts.spm_dir)
    (folder / "styles").mkdir(parents=True)
    save_membrane(tiny(concepts=("nudity",)), folder / "nudity.safetensors")
    save_membrane(tiny(concepts=("Van Gogh",)), folder / "styles" / "van_gogh.safetensors")
    from spm.webui import state

    state.reset()
    ns = runpy.run_path(str(ROOT / "scripts" / "spm_membranes.py"))
    s = ns["SpmScript"]()
    s.is_img2img = False
    yield s, folder
    state.reset()
    stub.uninstall()


def test_panel_components_and_api_order(script):
    s, folder = script
    with gr.Blocks():
        comps = s.ui(False)
    enabled, membranes, weights, metric, factor = comps
    assert isinstance(enabled, gr.Checkbox) and enabled.value is False
    assert isinstance(membranes, gr.CheckboxGroup)
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in membranes.choices]
    assert choices == ["nudity", "styles/van_gogh"]
    assert isinstance(weights, gr.Textbox) and isinstance(metric, gr.Dropdown) and isinstance(factor, gr.Slider)
    assert all(c.elem_id and c.elem_id.startswith("script_txt2img_spm_concept_erasing_spm_") for c in comps)
    fields = dict((id(c), k) for c, k in s.infotext_fields)
    d = {"SPM": "nudity:1.0, styles/van_gogh:0.8, gone:1", "SPM transport": "tokenuni x1.4"}
    assert fields[id(enabled)](d) is True and fields[id(enabled)]({}) is False
    assert fields[id(membranes)](d) == ["nudity", "styles/van_gogh"]  # unknown names are not pasted
    assert fields[id(weights)] == "SPM"
    assert fields[id(metric)](d) == "tokenuni" and fields[id(factor)](d) == pytest.approx(1.4)
    assert s.paste_field_names == ["SPM", "SPM transport"]


def test_panel_in_an_input_accordion(script):
    """A1111 1.7+ and Forge: the enable switch is the accordion's own checkbox (InputAccordion)."""
    if int(gr.__version__.split(".")[0]) >= 4:
        pytest.skip("Gradio 4 writes a .pyi file beside every Component subclass (here: into tests/); "
                    "the InputAccordion path is exercised with Gradio 3.41")
    s, _ = script
    ui_components = stub.install_ui_components()
    with gr.Blocks():
        comps = s.ui(False)
    assert isinstance(comps[0], ui_components.InputAccordion) and comps[0].value is False
    assert comps[0].accordion_id == "script_txt2img_spm_concept_erasing_spm_enable"
    assert len(comps) == 5


def test_refresh_and_weight_sync(script):
    s, folder = script
    from spm.webui.script import sync_weights
    from spm.webui.ui import refresh_choices

    save_membrane(tiny(concepts=("cat",)), folder / "cat.safetensors")
    (folder / "nudity.safetensors").unlink()
    upd = refresh_choices(["nudity", "styles/van_gogh"])
    assert isinstance(upd, dict)
    assert upd["choices"] == ["cat", "styles/van_gogh"] and upd["value"] == ["styles/van_gogh"]
    assert sync_weights(["cat", "styles/van_gogh"], "styles/van_gogh:0.3, gone:2") == "cat:1.0, styles/van_gogh:0.3"


def load_events(blocks):
    """``(output ids, fn)`` of each event a page load fires (Gradio 3.41: ``trigger == "load"``; 4.40: a target
    ``(id, "load")``)."""
    fns = blocks.fns
    out = []
    for i, dep in enumerate(blocks.get_config_file()["dependencies"]):
        if dep.get("trigger") == "load" or any(isinstance(t, (list, tuple)) and t[1] == "load" for t in dep.get("targets") or []):
            block_fn = fns[dep["id"]] if isinstance(fns, dict) else fns[i]
            out.append((list(dep["outputs"]), block_fn.fn))
    return out


def test_the_list_is_rescanned_on_every_page_load(script):
    """A1111 and Forge build txt2img inside its own Blocks and render it into the page: the panel adds a load
    event there, so a page opened after a new membrane was trained lists it (without 🔄)."""
    s, folder = script
    with gr.Blocks() as txt2img_interface:
        comps = s.ui(False)
    with gr.Blocks() as demo:
        txt2img_interface.render()
    membranes = comps[1]
    events = [fn for outputs, fn in load_events(demo) if outputs == [membranes._id]]
    assert len(events) == 1
    save_membrane(tiny(concepts=("cat",)), folder / "cat.safetensors")
    upd = events[0](["nudity", "gone"])
    assert upd["choices"] == ["cat", "nudity", "styles/van_gogh"] and upd["value"] == ["nudity"]


def test_the_panel_outside_blocks_has_no_load_event(script):
    from spm.webui.ui import refresh_on_page_load

    assert refresh_on_page_load(None) is False
