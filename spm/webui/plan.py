"""What one batch of a WebUI generation should do: which membranes, and each prompt's own weights.

No WebUI imports: this is the host-agnostic part of the glue, driven by the script with the panel's
settings, the batch's raw prompts (tags included) and the WebUI's stripped prompts.

Rules (also in the README section):

* the panel's membranes apply to every prompt with the panel weight;
* a prompt's own ``<spm:NAME:W>`` tags add membranes for that prompt only, and a tag overrides the panel
  weight of its membrane for that prompt;
* an X/Y/Z ``[SPM] weight`` value replaces every weight (panel and tags);
* an unknown name or a malformed tag is skipped with a warning; generation continues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..library import Library, LibraryError
from ..membrane import Membrane
from ..tags import format_weight_list, strip_tags, tag_weights

log = logging.getLogger("spm")


@dataclass
class BatchPlan:
    """Membranes of one batch and the weights of each of its prompts."""

    membranes: dict[str, Membrane] = field(default_factory=dict)  # canonical name → membrane
    panel: dict[str, float] = field(default_factory=dict)  # weights for rows of no known prompt
    prompts: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # (stripped prompt, weights)
    warnings: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.membranes)

    def summary(self) -> dict[str, float]:
        """``{name: weight}`` for the infotext: the panel weight, else the largest weight any prompt gives."""
        out: dict[str, float] = {}
        for name in self.membranes:
            if name in self.panel:
                out[name] = self.panel[name]
            else:
                ws = [w[name] for _, w in self.prompts if name in w]
                out[name] = max(ws) if ws else 0.0
        return out

    def infotext(self) -> str:
        return format_weight_list(self.summary())


class Planner:
    """Resolves names against a :class:`~spm.library.Library` and loads membranes, collecting warnings."""

    def __init__(self, library: Library):
        self.library = library

    def _load(self, name: str, plan: BatchPlan, where: str) -> str | None:
        try:
            canonical = self.library.canonical_name(name)
            if canonical not in plan.membranes:
                plan.membranes[canonical] = self.library.load(canonical)
            return canonical
        except LibraryError as e:
            plan.warnings.append(f"SPM: {where} {name!r} skipped: {e}")
            return None

    def plan(self, panel: dict[str, float], raw_prompts: list[str], stripped: list[str] | None = None,
             default_weight: float = 1.0, weight_override: float | None = None) -> BatchPlan:
        """One batch. ``raw_prompts`` still carry their tags; ``stripped`` are the WebUI's tag-free prompts."""
        plan = BatchPlan()
        for name, w in panel.items():
            canonical = self._load(name, plan, "membrane")
            if canonical is not None:
                plan.panel[canonical] = float(w) if weight_override is None else float(weight_override)
        if stripped is None or len(stripped) != len(raw_prompts):
            stripped = [strip_tags(p) for p in raw_prompts]
        for raw, clean in zip(raw_prompts, stripped):
            tags, problems = tag_weights(raw, default_weight)
            plan.warnings.extend(f"SPM: {p.message}" for p in problems)
            weights = dict(plan.panel)
            for name, w in tags.items():
                canonical = self._load(name, plan, "tag")
                if canonical is not None:
                    weights[canonical] = float(w) if weight_override is None else float(weight_override)
            plan.prompts.append((clean, weights))
        plan.warnings = list(dict.fromkeys(plan.warnings))
        return plan


__all__ = ["BatchPlan", "Planner"]
