"""The SPM panel (Gradio components), written for both Gradio 3.41 (A1111 1.10) and 4.40 (Forge).

Only constructor keywords both versions share; updates are returned as ``gr.update(...)`` dicts (never
``Component.update``); every component has an ``elem_id`` for the CSS and the API docs.
"""

from __future__ import annotations

from typing import Any

from ..tags import parse_weight_list
from . import state
from .explain import panel_explain
from .panel import METRIC_CHOICES, parse_transport_infotext, sync_weights


def membrane_choices() -> list[str]:
    """The folder's names now (a rescan: cheap, only new or changed headers are read)."""
    return [e.name for e in state.library().refresh()]


def refresh_choices(selected: list[str] | None) -> dict:
    """Rescan the folder; keep the selected names that still exist (🔄, and every page load)."""
    import gradio as gr

    names = membrane_choices()
    return gr.update(choices=names, value=[n for n in (selected or []) if n in names])


def enclosing_blocks():
    """The ``gr.Blocks`` being built (A1111 and Forge build txt2img and img2img each inside its own Blocks,
    which they later render into the page; their load events run on every page load), or None."""
    try:
        from gradio.context import Context
    except ImportError:  # pragma: no cover - Gradio moved it
        return None
    root = getattr(Context, "root_block", None)
    return root if callable(getattr(root, "load", None)) else None


def refresh_on_page_load(membranes) -> bool:
    """Rescan the folder on every page load: the list then shows the membranes of now, not of server start
    (Gradio 3.41 and 4.40 both fire a Blocks' load events in a page that renders it). False outside Blocks."""
    root = enclosing_blocks()
    if root is None:
        return False
    root.load(fn=refresh_choices, inputs=[membranes], outputs=[membranes], show_progress="hidden", api_name=False)
    return True


def fill_prompt_js(tab: str) -> str:
    """Client-side: an empty "Prompt to explain" takes the tab's main prompt (``#txt2img_prompt``) at the click."""
    return ("(...a) => { const root = (typeof gradioApp === 'function') ? gradioApp() : document; "
            f"const t = root.querySelector('#{tab}_prompt textarea'); "
            "if ((a[0] === undefined || a[0] === null || String(a[0]).trim() === '') && t) a[0] = t.value; return a; }")


def _js_kw(js: str) -> dict:
    """``_js=`` for Gradio 3 (A1111 1.10), ``js=`` for Gradio 4 (Forge)."""
    import gradio as gr

    return {"js": js} if int(str(gr.__version__).split(".")[0]) >= 4 else {"_js": js}


def _paste_names(d: dict) -> list[str]:
    weights, _ = parse_weight_list(str(d.get("SPM", "")))
    known = set(membrane_choices())
    return [n for n in weights if n in known]


def build_panel(script: Any) -> tuple[list, list]:
    """Components in API order ``[enabled, membranes, weights, metric, factor]`` and the infotext fields."""
    import gradio as gr

    try:
        from modules.ui_components import InputAccordion  # A1111 1.7+ and Forge
    except ImportError:  # pragma: no cover - older WebUIs
        InputAccordion = None

    choices = membrane_choices()
    if InputAccordion is not None:
        accordion = InputAccordion(False, label="SPM concept erasing", elem_id=script.elem_id("spm_enable"))
        enabled = accordion
    else:
        accordion = gr.Accordion("SPM concept erasing", open=False, elem_id=script.elem_id("spm_accordion"))
        enabled = None
    with accordion:
        if enabled is None:
            enabled = gr.Checkbox(label="Enable", value=False, elem_id=script.elem_id("spm_enable"))
        with gr.Row(elem_id=script.elem_id("spm_row_membranes")):
            membranes = gr.CheckboxGroup(label="Membranes", choices=choices, value=[],
                                         elem_id=script.elem_id("spm_membranes"))
            refresh = gr.Button(value="\U0001f504", elem_id=script.elem_id("spm_refresh"), elem_classes=["spm-refresh"])
        weights = gr.Textbox(label="Weights (name:weight, …; a <spm:name:w> tag overrides its membrane)", value="",
                             lines=1, elem_id=script.elem_id("spm_weights"))
        with gr.Row(elem_id=script.elem_id("spm_row_transport")):
            metric = gr.Dropdown(label="Facilitated Transport", choices=METRIC_CHOICES, value=METRIC_CHOICES[0],
                                 elem_id=script.elem_id("spm_metric"))
            factor = gr.Slider(label="Facilitate factor", minimum=0.0, maximum=3.0, step=0.05, value=1.0,
                               elem_id=script.elem_id("spm_factor"))
        with gr.Accordion("Why these strengths?", open=False, elem_id=script.elem_id("spm_explain_accordion")):
            explain_prompt = gr.Textbox(label="Prompt to explain (empty: the prompt above)", value="", lines=2,
                                        elem_id=script.elem_id("spm_explain_prompt"))
            explain_button = gr.Button(value="Explain", elem_id=script.elem_id("spm_explain"))
            explain_out = gr.Textbox(label="Facilitated Transport per membrane and concept", value="", lines=8,
                                     interactive=False, elem_id=script.elem_id("spm_explain_out"))
    refresh.click(fn=refresh_choices, inputs=[membranes], outputs=[membranes])
    tab = "img2img" if getattr(script, "is_img2img", False) else "txt2img"
    explain_button.click(fn=panel_explain, inputs=[explain_prompt, enabled, membranes, weights, metric, factor],
                         outputs=[explain_out], **_js_kw(fill_prompt_js(tab)))
    refresh_on_page_load(membranes)
    membranes.change(fn=sync_weights, inputs=[membranes, weights], outputs=[weights])
    infotext_fields = [
        (enabled, lambda d: "SPM" in d),
        (membranes, _paste_names),
        (weights, "SPM"),
        (metric, lambda d: parse_transport_infotext(d.get("SPM transport", ""))[0]),
        (factor, lambda d: parse_transport_infotext(d.get("SPM transport", ""))[1]),
    ]
    return [enabled, membranes, weights, metric, factor], infotext_fields
