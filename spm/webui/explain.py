""""Why these strengths?" in the WebUI: the panel's Explain button and ``POST /spm/v1/explain``.

Explains a prompt exactly as a generation would score it: the panel's membranes and the prompt's own
``<spm:…>`` tags are resolved by the same planner, the tags are stripped, the prompt is split into the texts
the WebUI encodes (``AND`` parts, prompt editing), and each text is explained by :func:`spm.explain.explain_text`
with the runtime's own transport on the loaded model (so its encoder, its calibrations and its phrase cache).

Route (:func:`add_routes`, host-agnostic):

* ``POST /spm/v1/explain`` — JSON ``{"prompt": "…", "membranes": ["name", …], "weights": "name:w, …",
  "metric": "ngram_tokenuni", "factor": 1.0}`` (only ``prompt`` is required) → ``{"text": "…", "warnings": […]}``;
  bad input → 400 with ``{"detail": message}``; no model loaded yet → 409.

No Gradio here; :mod:`spm.webui.ui` builds the button.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

from ..tags import format_number, strip_tags
from ..transport import DEFAULT_METRIC, check_metric
from . import state
from .panel import option, panel_weights
from .response import prepare_response
from .runtime import derived_texts

log = logging.getLogger("spm")

NO_MEMBRANE = ("No membrane to explain: tick one in the panel (and enable it), or write <spm:NAME:1.0> in the prompt.")
NO_MODEL = ("No model is loaded yet (Forge loads it on the first generation): generate one image, then explain.")
NO_PROMPT = "Nothing to explain: the prompt is empty."


class ExplainError(ValueError):
    """Bad input (400) or no model (409), with a message for the user."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _queue_lock():
    """The WebUI's generation lock (the text encoder is not used by two callers at once), or a no-op."""
    try:
        from modules import call_queue

        return call_queue.queue_lock
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def _model() -> Any:
    try:
        from modules import shared
    except ImportError:
        return None
    return getattr(shared, "sd_model", None)


def explain_prompt(prompt: Any, enabled: Any = True, selected: Any = None, weights: Any = "", metric: Any = DEFAULT_METRIC,
                   factor: Any = 1.0, *, sd_model: Any = None, lock: Any = None,
                   explain_text: Callable | None = None) -> tuple[str, list[str]]:
    """The explanation of ``prompt`` (text) and the planner's warnings; raises :class:`ExplainError`."""
    from ..explain import explain_text as default_explain_text

    explain_text = explain_text or default_explain_text
    prompt = "" if prompt is None else str(prompt)
    if not prompt.strip():
        raise ExplainError(NO_PROMPT)
    metric = str(metric or DEFAULT_METRIC)
    try:
        check_metric(metric)
    except ValueError as e:
        raise ExplainError(str(e)) from None
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        raise ExplainError(f"facilitate factor {factor!r} is not a number") from None
    if not factor >= 0:
        raise ExplainError(f"facilitate factor {factor!r} must be a number >= 0")
    default = float(option("spm_default_weight", 1.0))
    panel, problems = panel_weights(enabled, selected, weights, default)
    plan = state.planner().plan(panel, [prompt], None, default)
    warnings = list(dict.fromkeys(problems + plan.warnings))
    if not plan.active:
        raise ExplainError("\n".join([NO_MEMBRANE, *warnings]))
    clean, weight_of = plan.prompts[0]
    model = sd_model if sd_model is not None else _model()
    if model is None:
        raise ExplainError(NO_MODEL, status=409)
    texts = sorted(derived_texts(clean, [20], (None,), bool(option("use_old_scheduling", False)))) or [clean]
    lines = [f"metric {metric}, facilitate factor {format_number(factor)}; strength = factor x score, then x weight"]
    for name, m in plan.membranes.items():
        w = weight_of.get(name, 0.0)
        how = "a <spm:> tag" if name not in plan.panel or plan.panel[name] != w else "the panel"
        lines.append(f"membrane {name}: weight {format_number(w)} (from {how}); concepts: {', '.join(m.concepts) or '-'}")
    with lock if lock is not None else _queue_lock():
        try:
            att = state.runtime().attach(model)
        except (LookupError, ValueError) as e:
            raise ExplainError(f"SPM cannot explain on this model: {e}", status=409) from None
        tr = att.transport
        saved = (tr.metric, tr.factor)
        tr.metric, tr.factor = metric, factor
        try:
            prepare_response(att, list(plan.membranes.values()))  # the response metric: its gates, as a generation builds them
            for text in texts:
                if len(texts) > 1:
                    lines.append(f"--- the text {text!r} (one of the {len(texts)} texts this prompt is encoded as)")
                lines.append(explain_text(tr, list(plan.membranes.values()), text))
        except Exception as e:  # e.g. a membrane for another architecture's text width
            log.warning("SPM: explain failed: %s", e)
            raise ExplainError(f"SPM could not explain this prompt: {e}") from None
        finally:
            tr.metric, tr.factor = saved
    if warnings:
        lines += ["", *warnings]
    return "\n".join(lines), warnings


def panel_explain(prompt, enabled, selected, weights, metric, factor) -> str:
    """The Explain button: the text, or the problem (never raises into Gradio)."""
    try:
        text, _ = explain_prompt(prompt, enabled, selected, weights, metric, factor)
        return text
    except ExplainError as e:
        return str(e)


def add_routes(app, prefix: str = "/spm/v1") -> None:
    """Add ``POST {prefix}/explain`` to a FastAPI ``app``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def post_explain(request: Request):
        try:
            data = await request.json()
        except Exception:
            data = None
        if not isinstance(data, dict):
            return JSONResponse({"detail": 'the body must be a JSON object, e.g. {"prompt": "a cat <spm:nudity:1>"}'},
                                status_code=400)
        unknown = sorted(set(data) - {"prompt", "membranes", "weights", "metric", "factor"})
        if unknown:
            return JSONResponse({"detail": f"unknown fields: {', '.join(unknown)} (prompt, membranes, weights, metric, factor)"},
                                status_code=400)
        selected = data.get("membranes") or []
        if not isinstance(selected, (list, str)):
            return JSONResponse({"detail": "membranes must be a list of names"}, status_code=400)
        try:
            text, warnings = explain_prompt(data.get("prompt"), True, selected, data.get("weights") or "",
                                            data.get("metric") or DEFAULT_METRIC, data.get("factor", 1.0))
        except ExplainError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        return {"text": text, "warnings": warnings, "prompt": strip_tags(str(data.get("prompt"))).strip()}

    # a plain function, not a Request annotation under `from __future__ import annotations`: FastAPI must see the class
    post_explain.__annotations__ = {"request": Request}
    app.add_api_route(f"{prefix}/explain", post_explain, methods=["POST"],
                      summary="Why a prompt gets its Facilitated Transport strengths (per membrane and concept)")


__all__ = ["ExplainError", "add_routes", "explain_prompt", "panel_explain"]
