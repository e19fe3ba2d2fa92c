"""The ``spm`` extra network (``<spm:NAME:WEIGHT>``) and its "SPM" cards page.

Imported only by the extension's ``scripts/`` (subclasses WebUI classes).  Register both in
``on_before_ui``: registrations made at import time are wiped by the WebUI's own initialisation.

The WebUI hands :meth:`ExtraNetworkSpm.activate` only the *first* prompt's tags for the whole batch, so
activation does not decide anything here: the AlwaysOn script reads every prompt's own tags
(``before_process_batch``) and applies them per row.  Registering the network is still what makes the
WebUI treat ``<spm:…>`` as an extra network (cards, completion, ``extra_network_data``).
"""

from __future__ import annotations

import logging
import os

from modules import extra_networks, shared, ui_extra_networks

from ..tags import format_number
from . import state

log = logging.getLogger("spm")


class ExtraNetworkSpm(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("spm")
        self.last_params: list = []

    def activate(self, p, params_list):
        # A1111 calls this during model load with a dummy p whose all_prompts is None.
        if getattr(p, "all_prompts", None) is None:
            return
        self.last_params = list(params_list)

    def deactivate(self, p):
        self.last_params = []


def default_weight() -> float:
    opts = getattr(shared, "opts", None)
    w = getattr(opts, "spm_default_weight", None)
    try:
        return float(w) if w is not None else 1.0
    except (TypeError, ValueError):
        return 1.0


def weight_js(preferred: float | None = None) -> str:
    """A JS expression giving the weight *as text*, with its decimal point (``1.0``, ``0.85``): the card's
    ``prompt`` is evaluated in the browser, where ``"<spm:a:" + 1.0 + ">"`` would give ``<spm:a:1>``.

    A card's preferred weight (its user metadata) is a string literal; otherwise the setting
    ``opts.spm_default_weight`` is read when the card is clicked, as the Lora cards read
    ``opts.extra_networks_default_multiplier``, falling back to the value at render time."""
    if preferred:
        return ui_extra_networks.quote_js(format_number(float(preferred)))
    fallback = format_number(default_weight())
    return ("(function(w){w=Number(w);if(!isFinite(w))return " + ui_extra_networks.quote_js(fallback) + ";"
            "var s=String(Math.round(w*1e4)/1e4);return /[.e]/.test(s)?s:s+'.0';})"
            "(typeof opts==='object'&&opts?opts.spm_default_weight:undefined)")


STAMP = '<span class="spm-cards-stamp" data-spm-signature="{}" hidden></span>'


class ExtraNetworksPageSpm(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("SPM")

    def refresh(self):
        state.library().refresh()

    def create_item(self, name, index=None, enable_filter=True):
        entry = state.library().entries.get(name)
        if entry is None:
            return None
        path, _ = os.path.splitext(str(entry.path))
        quote = ui_extra_networks.quote_js
        item = {
            "name": name,
            "filename": str(entry.path),
            "shorthash": None,
            "preview": self.find_preview(path),
            "description": entry.description(),
            "search_terms": [self.search_terms_from_path(str(entry.path)), *entry.concepts],
            "local_preview": f"{path}.{getattr(shared.opts, 'samples_format', 'png')}",
            "metadata": entry.as_dict(),
            "sort_keys": {"default": index, **self.get_sort_keys(str(entry.path))},
        }
        self.read_user_metadata(item)  # the WebUI's per-card user metadata (.json beside the file)
        preferred = (item.get("user_metadata") or {}).get("preferred weight") or 0.0
        try:
            preferred = float(preferred)
        except (TypeError, ValueError):
            preferred = 0.0
        item["prompt"] = quote(f"<spm:{name}:") + " + " + weight_js(preferred) + " + " + quote(">")
        return item

    def create_html(self, tabname, *, empty=False):
        """The WebUI's pane, plus a hidden stamp with the library's signature at render time ("loading" while
        empty): ``javascript/spm.js`` compares it with ``/spm/v1/names`` and refreshes cards that are stale
        (the WebUI renders the cards once and serves that copy on every page load until Refresh)."""
        html = super().create_html(tabname, empty=empty)
        return html + STAMP.format("loading" if empty else state.library().signature)

    def list_items(self):
        state.library().refresh()  # cheap: a directory scan; only new or changed headers are read
        for index, name in enumerate(list(state.library().entries)):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [str(state.membrane_dir())]
