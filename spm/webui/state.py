"""Process-wide singletons of the WebUI glue: the membrane library, the planner and the runtime."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..library import Library
from .plan import Planner
from .runtime import Runtime

_library: Library | None = None
_planner: Planner | None = None
_runtime: Runtime | None = None


def membrane_dir() -> Path:
    """``--spm-dir`` if given, else ``models/spm`` under the WebUI's models path (created if missing)."""
    folder = None
    try:
        from modules import shared

        folder = getattr(getattr(shared, "cmd_opts", None), "spm_dir", None)
    except ImportError:
        pass
    if not folder:
        try:
            from modules import paths

            folder = os.path.join(paths.models_path, "spm")
        except ImportError:
            folder = os.path.join("models", "spm")
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # Library.refresh reports the problem
    return path


def library() -> Library:
    global _library, _planner
    folder = membrane_dir()
    if _library is None or _library.folder != folder:
        _library = Library(folder)
        _library.refresh()
        _planner = None
    return _library


def notify_membranes_changed() -> str:
    """A membrane was written, replaced or deleted (the trainer calls this after saving): rescan the folder now.

    Returns the new listing signature.  The panel and the cards pick the change up on their own —
    on the next page load, and in an open page when ``javascript/spm.js`` sees the signature of
    ``/spm/v1/names`` differ from what they show (tab switch, window focus, typing ``<spm:``)."""
    lib = library()
    lib.refresh()
    return lib.signature


def planner() -> Planner:
    global _planner
    lib = library()
    if _planner is None or _planner.library is not lib:
        _planner = Planner(lib)
    return _planner


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


def reset() -> None:
    """Detach everything and forget the singletons (Reload UI, tests)."""
    global _library, _planner, _runtime
    if _runtime is not None:
        _runtime.detach()
    _library = _planner = _runtime = None


def training_transport_neighbours(sd_model: Any, concepts: Sequence[str]) -> dict[str, list[str]]:
    """The words the runtime's transport on ``sd_model`` opens each concept for, under the default metric
    (:func:`spm.explain.neighbour_words`): the trainer erases them beside the concept."""
    from ..explain import neighbour_words

    return neighbour_words(runtime().attach(sd_model).transport, concepts)


def training_transport_candidates(sd_model: Any, concepts: Sequence[str], k: int, null: int, seed: int) -> dict:
    """The candidate and null words of the trainer's model-synonym scan on the runtime's transport for ``sd_model``
    (:func:`spm.explain.synonym_candidates`)."""
    from ..explain import synonym_candidates

    return synonym_candidates(runtime().attach(sd_model).transport, concepts, k, null, seed)


def training_transport_calibration(sd_model: Any, concepts: Sequence[str]) -> dict:
    """``spm_transport`` metadata for a membrane trained in the WebUI, calibrated with the transport that will
    score it at generation time (the runtime's, on ``sd_model``): the file then carries its calibration, and
    the first generation with it does not compute one (minutes on a CPU WebUI, where windows are encoded padded)."""
    from ..transport import calibration_metadata

    tr = runtime().attach(sd_model).transport
    return calibration_metadata(tr.concepts.get(list(concepts), tr.encode, tr.encoder_key), tr.phrases, tr.encode_ids)
