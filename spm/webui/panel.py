"""The panel's values, shared by the AlwaysOn script (:mod:`spm.webui.script`) and the Gradio panel
(:mod:`spm.webui.ui`): transport choices, the weight field, the infotext of the transport, the X/Y/Z attributes.

No WebUI and no Gradio imports (``modules.shared`` is read inside :func:`option` only), so both sides import it
and neither imports the other for these.
"""

from __future__ import annotations

from typing import Any

from ..tags import format_weight_list, parse_weight_list
from ..transport import DEFAULT_METRIC, METRICS

TITLE = "SPM concept erasing"
METRIC_CHOICES = ["ngram_tokenuni", "response", "robust", "clipcos_tokenuni", "clipcos", "tokenuni", "ngram", "ngram_fixed_tokenuni", "tokenwin",
                  "membrane", "off"]
XYZ_WEIGHT = "spm_xyz_weight"
XYZ_FACTOR = "spm_xyz_factor"


def option(name: str, default: Any) -> Any:
    """A WebUI setting (``shared.opts``), or ``default`` outside a WebUI or before the settings exist."""
    try:
        from modules import shared
    except ImportError:
        return default
    opts = getattr(shared, "opts", None)
    return getattr(opts, name, default) if opts is not None else default


def panel_weights(enabled: Any, selected: Any, weights: Any, default: float = 1.0) -> tuple[dict[str, float], list[str]]:
    """The panel's ``{name: weight}`` from the raw script args (UI or API), and problems."""
    if not enabled:
        return {}, []
    if isinstance(selected, str):
        selected = [s for s in (x.strip() for x in selected.split(",")) if s]
    selected = [str(s) for s in (selected or [])]
    if isinstance(weights, dict):
        parsed, problems = {str(k): float(v) for k, v in weights.items()}, []
    else:
        parsed, problems = parse_weight_list(str(weights or ""), default)
    out = {name: parsed.get(name, default) for name in selected}
    for name, w in parsed.items():
        out.setdefault(name, w)
    return out, [f"SPM: weights: {p}" for p in problems]


def sync_weights(selected: list[str] | None, weights: str | None) -> str:
    """The weights field after the selection changed: keep known weights, add new names at the default."""
    parsed, _ = parse_weight_list(weights or "", 1.0)
    default = float(option("spm_default_weight", 1.0))
    return format_weight_list({n: parsed.get(n, default) for n in (selected or [])})


def parse_transport_infotext(text: str) -> tuple[str, float]:
    """``"clipcos_tokenuni x1.2"`` → (metric, factor)."""
    parts = (text or "").split()
    metric = parts[0] if parts and parts[0] in METRICS else DEFAULT_METRIC
    factor = 1.0
    if len(parts) > 1 and parts[1].startswith("x"):
        try:
            factor = float(parts[1][1:])
        except ValueError:
            pass
    return metric, factor


__all__ = ["METRIC_CHOICES", "TITLE", "XYZ_FACTOR", "XYZ_WEIGHT", "option", "panel_weights", "parse_transport_infotext",
           "sync_weights"]
