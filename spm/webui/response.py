"""The response transport in the WebUI (:mod:`spm.response`): its gates are built before sampling with the host's
trainer backend (A1111 or Forge), and rows are then measured inside the UNet hook with the membranes bypassed.

Kept apart from :mod:`spm.webui.runtime`: the trainer backends import :mod:`spm.webui.state`, which imports the
runtime, so the runtime must not import them."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..membrane import Membrane
from ..response import stored_calibration
from ..transport import uses_response

log = logging.getLogger("spm")


def response_resolution() -> int | None:
    """Settings → SPM's probe size of the response gate in pixels (None: the model's native size)."""
    from .panel import option

    try:
        v = int(float(option("spm_response_resolution", 0) or 0))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def make_responder(att: Any, resolution: int | None = None):
    """A :class:`spm.response.Responder` on ``att``'s model (the trainer's backend of its host) that bypasses
    ``att``'s membranes, or None with a warning where the model cannot run it."""
    from ..response import Responder
    from ..train.jobs import NoModelError

    try:
        if att.host == "forge":
            from .train_backend_forge import ForgeBackend as HostBackend
        else:
            from .train_backend_a1111 import A1111Backend as HostBackend
        backend = HostBackend(att.sd_model)
    except (NoModelError, ImportError, AttributeError, TypeError) as e:
        log.warning("SPM: the response gate cannot run on this model (%s); only the words part of the metric applies", e)
        return None
    return Responder(backend, att.stack.bypassed, lazy=False, resolution=resolution)


def prepare_response(att: Any, membranes: Sequence[Membrane]) -> None:
    """With the ``response`` metric on ``att``'s transport: the response gates of ``membranes``' concepts, built now
    (before sampling), since building one encodes text (random words, the concept's forms) and draws the concept's
    probes with the UNet; Forge may offload the text encoder while the UNet samples."""
    tr = att.transport
    if not uses_response(tr.metric) or not membranes:
        return
    size = response_resolution()
    if tr.responder is None or tr.responder.resolution != size:  # first use, or the setting changed: new probes
        if getattr(att, "_no_responder", False):  # this model cannot run it: said once, not at every generation
            return
        tr.responder = make_responder(att, size)
        if tr.responder is None:
            att._no_responder = True
            return
    todo = [c for m in membranes for c in m.info.concepts if c not in tr.responder.gates]
    if not todo:  # every gate built in an earlier generation
        return
    load = getattr(tr.responder.backend, "_load", None)  # Forge: the UNet on its device before it runs
    if load is not None:
        load()
    stored = {}  # a concept's first membrane with a stored calibration of it
    for m in membranes:
        for c in m.info.concepts:
            if c not in stored or stored[c] is None:
                stored[c] = stored_calibration(m, c)
    for concept in dict.fromkeys(todo):
        tr.responder.build(concept, stored.get(concept))


__all__ = ["make_responder", "prepare_response", "response_resolution"]
