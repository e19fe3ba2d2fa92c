"""WebUI callbacks: extra network + cards page, X/Y/Z axes, settings, detaching on model switch / Reload UI,
and the route the browser side (``javascript/spm.js``) reads.

Route (:func:`add_routes`, host-agnostic):

* ``GET /spm/v1/names`` — ``{"names": [...], "signature": "…", "descriptions": {name: "…"}, "default_weight": 1.0,
  "problem": null}``: the folder rescanned (headers of new or changed files only), for the prompt's ``<spm:``
  completion and to tell the panel and the cards that they are stale (``signature`` changes with the listing).
* ``POST /spm/v1/explain`` — why a prompt gets its transport strengths (:mod:`spm.webui.explain`).

Imported only by the extension's ``scripts/``; :func:`register` is called once at script load.
"""

from __future__ import annotations

import logging

from modules import script_callbacks

from . import state
from .panel import XYZ_FACTOR, XYZ_WEIGHT

log = logging.getLogger("spm")

AXIS_WEIGHT = "[SPM] weight"
AXIS_FACTOR = "[SPM] facilitate factor"
SECTION = ("spm", "SPM")
CATEGORY = "sd"  # the settings sidebar's "Stable Diffusion" heading (A1111 1.7+, Forge), where Extra Networks is


def _apply_attr(field):
    def apply(p, x, xs):
        setattr(p, field, float(x))

    return apply


def find_xyz_module():
    """The loaded ``scripts/xyz_grid.py`` module, or None."""
    from modules import scripts

    for data in getattr(scripts, "scripts_data", []):
        if getattr(data.script_class, "__module__", "") in ("xyz_grid.py", "xyz_grid"):
            return data.module
    return None


def register_xyz_axes() -> bool:
    """Add the two axes once (idempotent across Reload UI). False when the X/Y/Z script is absent."""
    xyz = find_xyz_module()
    if xyz is None:
        return False
    labels = {getattr(o, "label", None) for o in xyz.axis_options}
    if AXIS_WEIGHT not in labels:
        xyz.axis_options.append(xyz.AxisOption(AXIS_WEIGHT, float, _apply_attr(XYZ_WEIGHT)))
    if AXIS_FACTOR not in labels:
        xyz.axis_options.append(xyz.AxisOption(AXIS_FACTOR, float, _apply_attr(XYZ_FACTOR)))
    return True


def on_before_ui() -> None:
    from modules import extra_networks, ui_extra_networks

    from .networks import ExtraNetworksPageSpm, ExtraNetworkSpm

    ui_extra_networks.register_page(ExtraNetworksPageSpm())
    extra_networks.register_extra_network(ExtraNetworkSpm())
    register_xyz_axes()


def on_ui_settings() -> None:
    from modules import shared

    try:
        import gradio as gr

        slider = gr.Slider
    except ImportError:  # only outside a WebUI (tests): the option then renders as a number field
        slider = None
    opts = shared.opts
    opts.add_option("spm_default_weight", shared.OptionInfo(
        1.0, "Default membrane weight (panel, cards, <spm:name> without a weight)", slider,
        {"minimum": 0.0, "maximum": 2.0, "step": 0.05}, section=SECTION, category_id=CATEGORY))
    opts.add_option("spm_write_infotext", shared.OptionInfo(
        True, "Write SPM membranes and transport to the generation parameters (infotext)", section=SECTION,
        category_id=CATEGORY))
    opts.add_option("spm_response_resolution", shared.OptionInfo(
        0, "Response transport: probe size in pixels (0 = the model's native size; smaller is faster, e.g. on a CPU)",
        slider, {"minimum": 0, "maximum": 1024, "step": 64}, section=SECTION, category_id=CATEGORY))


def names_payload() -> dict:
    """The body of ``GET /spm/v1/names``."""
    from .networks import default_weight

    lib = state.library()
    entries = lib.refresh()
    return {"names": [e.name for e in entries], "signature": lib.signature,
            "descriptions": {e.name: e.description() for e in entries}, "default_weight": default_weight(),
            "problem": lib.problem}


def add_routes(app, prefix: str = "/spm/v1") -> None:
    """Add ``GET {prefix}/names`` to a FastAPI ``app``."""

    def get_names():
        return names_payload()

    app.add_api_route(f"{prefix}/names", get_names, methods=["GET"],
                      summary="The SPM membrane names (for completion) and the listing's signature")


def on_app_started(demo, app) -> None:
    from . import explain

    add_routes(app)
    explain.add_routes(app)


def on_model_loaded(sd_model) -> None:
    state.runtime().model_loaded(sd_model)


def on_script_unloaded() -> None:
    state.reset()


def register() -> None:
    script_callbacks.on_before_ui(on_before_ui)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_script_unloaded(on_script_unloaded)
