"""Training over HTTP, and the WebUI glue of the trainer (backend provider, progress in ``shared.state``).

Routes (:func:`add_routes`, host-agnostic, testable with FastAPI's ``TestClient``):

* ``POST /spm/v1/train`` — JSON ``{"name": …, "target": "a, b", "surrogate": "", "iterations": …, "lr": …,
  "la_strength": …, "anchors": …, "resolution": …, "seed": 0, "precision": "fp32", "save_every": 0}``
  (every field but ``name`` and ``target`` has a default; also ``preset``, ``la_mode``, ``control_prompts``,
  ``preview``, ``preview_steps``, ``overwrite``, ``keep_state``, ``lr_layers``, ``context_words``) → ``{"id": …, "status": "queued"}``.  Bad
  input → 400 with ``{"detail": message}``; an existing file without ``"overwrite": true`` → 409.
* ``GET /spm/v1/train/{id}`` — ``status`` (queued / running / done / failed / interrupted), ``step``,
  ``total``, ``loss``, ``output``, ``preview``, ``error``, ``message``, the current ``phase`` with
  ``phase_done`` / ``phase_total`` / ``phase_eta_s``, the ``progress`` line, and ``erasure`` (the trainer's
  verdict, when it gives one).  A final status appears only after the job released the WebUI's state and
  the queue lock.  Unknown id → 404.
* ``POST /spm/v1/train/{id}/interrupt`` — stop after the current step (the membrane so far is saved).
* ``GET /spm/v1/membranes`` — the membrane folder with each file's metadata.

Jobs run one at a time on the service's worker thread, each holding the service's lock — inside the WebUI
``modules.call_queue.queue_lock``, the lock every generation takes — so training and generation never overlap.
The request body is read as plain JSON (not a pydantic model) so the same code runs on A1111's
fastapi 0.94 / pydantic 1 and Forge's fastapi 0.112 / pydantic 2, with our own error messages.
"""

# (no ``from __future__ import annotations`` here: FastAPI must see the ``Request`` annotation as a class)

import logging
import threading
from typing import Any

from ..train.jobs import NoModelError, Reporter, RequestError, TrainJob, TrainService

log = logging.getLogger("spm")

PREFIX = "/spm/v1"


def add_routes(app, service: TrainService, prefix: str = PREFIX) -> None:
    """Add the training routes to a FastAPI ``app``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def post_train(request: Request):
        try:
            data = await request.json()
        except Exception:
            return JSONResponse({"detail": "the body must be JSON, e.g. {\"name\": \"circle\", \"target\": \"circle\"}"},
                                status_code=400)
        try:
            job = service.submit(data)
        except RequestError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        return {"id": job.id, "status": job.status}

    def get_train(job_id: str):
        job = service.get(job_id)
        if job is None:
            return JSONResponse({"detail": f"no training job with id {job_id!r} (ids are kept until restart)"},
                                status_code=404)
        return job.as_dict()

    def interrupt_train(job_id: str):
        job = service.get(job_id)
        if job is None:
            return JSONResponse({"detail": f"no training job with id {job_id!r}"}, status_code=404)
        return {"id": job.id, "interrupted": service.interrupt(job_id), "status": job.status}

    def get_membranes():
        return {"folder": str(service.folder), "membranes": service.membranes()}

    app.add_api_route(f"{prefix}/train", post_train, methods=["POST"], summary="Queue an SPM membrane training job")
    app.add_api_route(f"{prefix}/train/{{job_id}}", get_train, methods=["GET"], summary="An SPM training job's state")
    app.add_api_route(f"{prefix}/train/{{job_id}}/interrupt", interrupt_train, methods=["POST"],
                      summary="Interrupt an SPM training job after its current step")
    app.add_api_route(f"{prefix}/membranes", get_membranes, methods=["GET"], summary="The SPM membranes with metadata")


# --- WebUI glue --------------------------------------------------------------------------------------
def webui_backend():
    """A trainer backend for the WebUI's loaded model: Forge's or A1111's host (``NoModelError`` if none)."""
    from modules import shared

    from .runtime import is_forge

    sd_model = getattr(shared, "sd_model", None)
    if sd_model is None:
        raise NoModelError("no Stable Diffusion model is loaded; choose a checkpoint at the top of the page first")
    # A generation that raised (out of memory, the NaN check) never reached the script's postprocess, so its
    # membranes may still be on the UNet; the next generation would replace them, training must not see them.
    from . import state

    state.runtime().clear()
    if is_forge():
        from .train_backend_forge import NOT_LOADED, ForgeBackend, is_placeholder

        if is_placeholder(sd_model):  # Forge's stand-in until the first generation loads the real model
            raise NoModelError(NOT_LOADED)
        if getattr(sd_model, "forge_objects", None) is not None:
            return _with_response_size(ForgeBackend(sd_model))
    from .train_backend_a1111 import A1111Backend

    return _with_response_size(A1111Backend(sd_model))


def _with_response_size(backend):
    """The trainer stores the response gate's calibration at the probe size this WebUI's gate uses (Settings → SPM),
    so that generation here finds it applicable (spm.response.training_response)."""
    from .response import response_resolution

    backend.response_resolution = response_resolution()
    return backend


class WebUIReporter(Reporter):
    """Progress in ``shared.state`` (the WebUI's progress bar, ``/internal/progress``, live preview) and its
    Interrupt button.

    The WebUI computes the bar's fraction and its ETA itself (``modules/progress.py``): fraction =
    ``job_no / job_count`` (+ ``sampling_step / sampling_steps`` of the current job), ETA = the time since
    ``time_start`` × (1 − fraction) / fraction.  So every phase of a training job (loading, filling the latent
    pool k/N, training step k/N, before/after check k/M, saving) starts its own count: ``job_count`` = the
    phase's total, ``job_no`` = done, ``time_start`` = when the phase began.  The bar then shows the phase's
    own fraction and one ETA, the WebUI's, right for that phase; ``textinfo`` names the phase and carries no
    ETA of ours.  A phase without a count (loading, the final erasure check, saving), or a counted one at 0/N, sets
    ``job_count`` 0: the bar shows 0 % and neither progress API predicts an ETA.  The loss plot is the live
    preview (the tab shows it in its "Loss" box)."""

    def __init__(self, preview_every_s: float = 2.0):
        self.preview_every_s = preview_every_s
        self._last = 0.0
        self._phase: str | None = None

    @staticmethod
    def _state():
        from modules import shared

        return shared.state

    def begin(self, job: TrainJob) -> None:
        st = self._state()
        if job.queued_run and callable(getattr(st, "begin", None)):
            st.begin(job="spm-train")  # an API job: nobody else set the state up (the tab's wrapper does)
        st.job = "SPM training"
        st.textinfo = f"SPM {job.request.name}: starting"
        self._phase = None
        self._last = 0.0

    def phase(self, job: TrainJob) -> None:
        import time

        st = self._state()
        if job.phase != self._phase:
            self._phase = job.phase
            st.time_start = time.time()  # the WebUI's ETA counts from here: this phase's own
        # a phase without a real count (loading, the single erasure check, saving), and a counted one before its
        # first piece of work is done, sets no job count: the WebUI's /sdapi/v1/progress divides the elapsed time
        # by (0.01 + job_no / job_count), which at 0/N predicts ~99× the elapsed time; with job_count 0 it reports
        # no ETA, as /internal/progress (the bar) does at 0/N
        counted = job.phase_total > 1 and job.phase_done > 0
        st.job_count = job.phase_total if counted else 0
        st.job_no = min(job.phase_done, job.phase_total) if counted else 0
        st.sampling_step, st.sampling_steps = 0, 0
        st.textinfo = f"SPM {job.request.name}: {job.progress_text(eta=False)}"

    def update(self, job: TrainJob, progress: Any) -> None:
        import time

        st = self._state()
        now = time.monotonic()
        if now - self._last >= self.preview_every_s or job.step == job.total:
            self._last = now
            from ..train.jobs import loss_plot

            assign = getattr(st, "assign_current_image", None)
            if callable(assign):  # drawn in the tab's "Loss" box (sample grids are saved in NAME.samples/)
                assign(loss_plot(job.losses))

    def end(self, job: TrainJob) -> None:
        st = self._state()
        st.textinfo = f"SPM {job.request.name}: {job.outcome or job.status}"
        if job.queued_run and callable(getattr(st, "end", None)):
            st.end()

    def should_stop(self) -> bool:
        st = self._state()
        return bool(getattr(st, "interrupted", False) or getattr(st, "stopping_generation", False))


_service: TrainService | None = None
_service_lock = threading.Lock()


def _refresh_library(path) -> None:
    from . import state

    state.library().refresh()


def webui_service() -> TrainService:
    """The process-wide service: the WebUI's queue lock, its model, ``--spm-dir``, ``shared.state`` progress."""
    global _service
    with _service_lock:
        if _service is None:
            from modules import call_queue

            from . import state

            _service = TrainService(webui_backend, state.membrane_dir, lock=call_queue.queue_lock,
                                    reporter=WebUIReporter(), on_saved=_refresh_library)
        return _service


def reset_service() -> None:
    """Forget the service (Reload UI, tests); a running job finishes on its own thread."""
    global _service
    with _service_lock:
        if _service is not None and _service.current is not None:
            _service.current.interrupt()
        _service = None


def on_app_started(demo, app) -> None:
    """``script_callbacks.on_app_started``: add the routes (``demo`` is None under ``--nowebui``)."""
    add_routes(app, webui_service())




def on_ui_tabs():
    """``script_callbacks.on_ui_tabs``: the "SPM Trainer" tab, wired to the WebUI's queue and progress."""
    from modules import call_queue, shared

    from ..ui.trainer_tab import build_trainer_tab

    tab = build_trainer_tab(service=webui_service(), wrap=call_queue.wrap_gradio_gpu_call,
                            on_interrupt=lambda: shared.state.interrupt())
    return [(tab, "SPM Trainer", "spm_trainer")]


__all__ = ["PREFIX", "WebUIReporter", "add_routes", "on_app_started", "on_ui_tabs", "reset_service", "webui_backend",
           "webui_service"]
