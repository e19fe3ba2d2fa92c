"""The AlwaysOn script: the SPM panel in txt2img/img2img and the generation lifecycle.

Imported only by the extension's ``scripts/`` file (it subclasses ``modules.scripts.Script``).

API (``/sdapi/v1/txt2img``, ``alwayson_scripts``): key ``"spm concept erasing"``, positional args in the
order of :meth:`SpmScript.ui`::

    [enabled: bool, membranes: list[str], weights: "name:w, …", metric: str, facilitate_factor: float]

A membrane named in ``weights`` counts as selected even if absent from ``membranes``.
"""

from __future__ import annotations

import logging
from typing import Any

from modules import scripts, shared

from ..tags import format_number
from ..transport import DEFAULT_METRIC, METRICS
from . import state
from .panel import METRIC_CHOICES, TITLE, XYZ_FACTOR, XYZ_WEIGHT, panel_weights, parse_transport_infotext, sync_weights
from .response import prepare_response
from .runtime import derived_groups

log = logging.getLogger("spm")


def _opt(name: str, default: Any) -> Any:
    opts = getattr(shared, "opts", None)
    return getattr(opts, name, default) if opts is not None else default


def _warn(p: Any, messages: list[str]) -> None:
    for m in messages:
        log.warning(m)
        if hasattr(p, "comment"):
            p.comment(m)


class GenerationState:
    """What the script keeps on ``p`` between callbacks of one generation."""

    def __init__(self, panel: dict[str, float], metric: str, factor: float, weight_override: float | None):
        self.panel = panel
        self.metric = metric
        self.factor = factor
        self.weight_override = weight_override
        self.raw_prompts: list[str] = []
        self.raw_hr_prompts: list[str] = []
        self.plan = None
        self.warned: set[str] = set()


class SpmScript(scripts.Script):
    """SPM: concept membranes with Facilitated Transport, from the panel and from ``<spm:…>`` tags."""

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    # --- UI ----------------------------------------------------------------------------------
    def ui(self, is_img2img):
        from .ui import build_panel

        components, infotext_fields = build_panel(self)
        self.infotext_fields = infotext_fields
        self.paste_field_names = ["SPM", "SPM transport"]
        return components

    # --- lifecycle ---------------------------------------------------------------------------
    def process(self, p, enabled=False, selected=None, weights="", metric=DEFAULT_METRIC, factor=1.0, *rest):
        default = float(_opt("spm_default_weight", 1.0))
        panel, problems = panel_weights(enabled, selected, weights, default)
        metric = str(metric or DEFAULT_METRIC)
        if metric not in METRICS:
            problems.append(f"SPM: unknown transport metric {metric!r}; using {DEFAULT_METRIC}")
            metric = DEFAULT_METRIC
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            problems.append(f"SPM: facilitate factor {factor!r} is not a number; using 1.0")
            factor = 1.0
        xyz_factor = getattr(p, XYZ_FACTOR, None)
        if xyz_factor is not None:
            factor = float(xyz_factor)
        override = getattr(p, XYZ_WEIGHT, None)
        st = GenerationState(panel, metric, factor, None if override is None else float(override))
        p._spm_state = st
        _warn(p, problems)
        runtime = state.runtime()
        # the recorder must see every conditioning the WebUI computes, so it is installed even when SPM is idle
        model = getattr(p, "sd_model", None) or getattr(shared, "sd_model", None)
        try:
            runtime.attach(model)
        except (LookupError, ValueError) as e:  # Forge loads lazily (retried later); or a model without SD targets
            log.debug("SPM: not attached: %s", e)
        # one planning pass over every prompt, to warn once and to write the infotext before any image
        prompts = list(getattr(p, "all_prompts", None) or [])
        plan = state.planner().plan(panel, prompts + list(getattr(p, "all_hr_prompts", None) or []), None, default,
                                    st.weight_override)
        self._report(p, st, plan)
        self._infotext(p, st, plan)

    def before_process_batch(self, p, *args, **kwargs):
        st = getattr(p, "_spm_state", None)
        if st is None:
            return
        n = int(kwargs.get("batch_number", getattr(p, "iteration", 0)))
        bs = int(getattr(p, "batch_size", 1) or 1)
        prompts = kwargs.get("prompts")
        st.raw_prompts = list(prompts if prompts is not None else (p.all_prompts or [])[n * bs:(n + 1) * bs])
        hr = getattr(p, "all_hr_prompts", None)
        st.raw_hr_prompts = list(hr[n * bs:(n + 1) * bs]) if hr else []

    def process_batch(self, p, *args, **kwargs):
        self._apply(p, kwargs.get("prompts"))

    def process_before_every_sampling(self, p, *args, **kwargs):
        # Forge swaps forge_objects per batch and may load the model only now; A1111 re-checks cheaply.
        self._apply(p, None)

    def postprocess(self, p, processed, *args):
        state.runtime().clear()

    # --- helpers -----------------------------------------------------------------------------
    def _apply(self, p, stripped):
        st: GenerationState | None = getattr(p, "_spm_state", None)
        if st is None:
            return
        default = float(_opt("spm_default_weight", 1.0))
        if stripped is None:
            stripped = list(getattr(p, "prompts", None) or [])
        raw = list(st.raw_prompts) or list(stripped)
        clean = list(stripped)
        hr_clean = list(getattr(p, "hr_prompts", None) or [])
        if st.raw_hr_prompts and len(hr_clean) == len(st.raw_hr_prompts):
            raw += st.raw_hr_prompts
            clean += hr_clean
        plan = state.planner().plan(st.panel, raw, clean, default, st.weight_override)
        st.plan = plan
        self._report(p, st, plan)
        runtime = state.runtime()
        if not plan.active:
            runtime.clear()
            return
        model = getattr(p, "sd_model", None) or getattr(shared, "sd_model", None)
        try:
            att = runtime.attach(model)
        except (LookupError, ValueError) as e:  # no model, or one without SD UNet targets (e.g. Flux in Forge)
            _warn(p, [f"SPM: membranes not applied: {e}"])
            return
        steps = int(getattr(p, "steps", 20) or 20)
        hr_steps = getattr(p, "hr_second_pass_steps", None) or None
        step_set = sorted({steps, 2 * steps, 1000})
        hires = (None, hr_steps or steps) if raw else (None,)
        old = bool(_opt("use_old_scheduling", False))
        cache: dict[str, list[tuple[str, ...]]] = {}

        def groups_of(prompt: str) -> list[tuple[str, ...]]:
            if prompt not in cache:
                cache[prompt] = derived_groups(prompt, step_set, hires, old)
            return cache[prompt]

        def texts_of(prompt: str) -> set[str]:
            return {t for g in groups_of(prompt) for t in g}

        negatives = list(getattr(p, "negative_prompts", None) or []) + list(getattr(p, "hr_negative_prompts", None) or [])
        try:
            att.configure(plan, texts_of, st.metric, st.factor)
            att.ensure_recorded([g for prompt, _ in plan.prompts for g in groups_of(prompt)])
            att.ensure_recorded([g for n in dict.fromkeys(negatives) for g in groups_of(n)], negative=True)
            texts = [t for prompt, _ in plan.prompts for g in groups_of(prompt) for t in g]
            texts += [t for n in dict.fromkeys(negatives) for g in groups_of(n) for t in g]
            att.prepare_concepts(list(plan.membranes.values()), texts)
            prepare_response(att, list(plan.membranes.values()))  # the response metric's gates, before sampling
        except Exception as e:  # incompatible membrane (e.g. SD1 membrane on SDXL): warn, generate without
            runtime.clear()
            _warn(p, [f"SPM: membranes not applied: {e}"])
            return
        self._infotext(p, st, plan)

    def _report(self, p, st: GenerationState, plan) -> None:
        new = [w for w in plan.warnings if w not in st.warned]
        st.warned.update(new)
        _warn(p, new)

    def _infotext(self, p, st: GenerationState, plan) -> None:
        params = getattr(p, "extra_generation_params", None)
        if params is None or not _opt("spm_write_infotext", True):
            return
        if plan.active:
            params["SPM"] = plan.infotext()
            params["SPM transport"] = f"{st.metric} x{format_number(st.factor)}"
        else:
            params.pop("SPM", None)
            params.pop("SPM transport", None)


# the panel helpers are re-exported: API users and older tests import them from here
__all__ = ["METRIC_CHOICES", "SpmScript", "TITLE", "XYZ_FACTOR", "XYZ_WEIGHT", "panel_weights", "parse_transport_infotext",
           "sync_weights"]
