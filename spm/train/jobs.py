"""Training jobs: validated requests, a sequential job queue, progress, the before/after check.

Host-agnostic (no Gradio, no WebUI imports).  The trainer tab and the HTTP API both go through
:class:`TrainService`:

* :func:`parse_request` turns a dict (JSON body, or the tab's fields) into a :class:`TrainRequest`, or raises
  :class:`RequestError` with an HTTP status and a message that says what to fix.
* :meth:`TrainService.submit` queues a job; one worker thread runs the jobs one after another, each under
  the service's ``lock`` (in the WebUI: ``modules.call_queue.queue_lock``, so no generation runs meanwhile).
  :meth:`TrainService.run` runs a job in the calling thread (the WebUI tab, whose handler already holds the
  queue lock through ``wrap_gradio_gpu_call``).
* A job asks the ``backend_provider`` for a :class:`spm.backend.Backend` when it starts (so the model loaded
  *then* is trained against), trains with :class:`spm.train.Trainer` (which saves the membrane with full
  metadata, atomically), then renders the before/after grid (target + control prompts, membrane off | on,
  same seeds) and saves it as ``NAME.preview.png`` beside the file.
* A job goes through named phases, each with its own fraction and ETA (:data:`PHASES`): loading the model,
  filling the latent pool (k/N denoising steps), training (step k/N), the before/after check (sampling step
  k/M), saving.  A :class:`Reporter` mirrors them elsewhere (the WebUI's ``shared.state``) and may ask to stop;
  the console gets a line at the start, about ten during the steps, one per phase, and one at the end or on
  an error (``SPM: …``, as the WebUI's own jobs print).
* A job's final status (done / failed / interrupted) is published only after the reporter has ended (the
  WebUI's state is reset) and the lock is released, so whoever sees "done" may start the next job at once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..tags import name_problem
from .config import CHOICES, PRESETS, TrainConfig, preset

log = logging.getLogger("spm")

DEFAULT_CONTROLS = ("a photo of a dog in a park", "a landscape painting of mountains")
STATUSES = ("queued", "running", "done", "failed", "interrupted")
SUFFIX = ".safetensors"
# phase → what the progress line calls it
PHASES = {"queued": "queued", "loading": "loading the model", "calibration": "calibrating Facilitated Transport",
          "neighbours": "finding the words the transport opens for",
          "synonyms": "finding the words the model draws as the target",
          "vocabulary": "finding the words the model draws as the target: reading the vocabulary",
          "gate": "calibrating the membrane gate", "response": "calibrating the response gate",
          "pool": "filling the latent pool", "probes": "drawing the erasure signal's held-out probes",
          "training": "training step", "signal": "measuring the erasure", "check": "before/after check", "saving": "saving"}
UNITS = {"pool": "denoising steps", "probes": "denoising steps", "gate": "prompts", "response": "prompts", "training": "steps",
         "check": "sampling steps", "synonyms": "words", "vocabulary": "words"}  # what a phase counts
CONSOLE_LINES = 10  # about this many progress lines per job in the console
# the before/after check, when preview_steps is left to the service: as many DDIM steps as the training's own
# UNet work pays for, within the range where DDIM images are recognisable and the WebUI's default sampling steps
CHECK_STEPS = (10, 20)


class RequestError(ValueError):
    """Bad input. ``status`` is the HTTP status the API answers with (400 bad value, 409 file exists)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class NoModelError(RuntimeError):
    """The host has no usable model (none loaded, or an architecture the trainer does not support)."""


# --- requests ----------------------------------------------------------------------------------------
@dataclass
class TrainRequest:
    """One training job as the user asked for it.  ``None`` means "the preset's value"."""

    name: str
    target: list[str]
    surrogate: str = ""
    preset: str = "object"
    iterations: int | None = None
    lr: float | None = None
    la_strength: float | None = None
    la_mode: str | None = None
    anchors: int | None = None
    resolution: int | None = None  # px; None: the model's default
    seed: int = 0
    precision: str = "fp32"
    save_every: int = 0
    sample_every: int = 0  # sample grids (target + controls, off | on) every N steps during training; 0: none
    control_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROLS))
    preview: bool = True
    preview_steps: int | None = None  # None or 0: sized to the job (see CHECK_STEPS)
    overwrite: bool = False
    keep_state: bool = False  # keep NAME.safetensors.trainstate after a finished run (to extend it later)
    robust: bool | None = None  # robust training (TrainConfig.robust "embedding" / "off"); None: the default
    neighbours: bool | None = None  # also erase the words the transport opens for (TrainConfig.neighbours); None: default
    synonyms: str | None = None  # model synonyms: "off", "gate" or "erase" (TrainConfig.synonyms); None: the default
    contexts: int | None = None  # context prompts per target (TrainConfig.contexts; 0: off); None: the default
    lr_layers: str | None = None  # "gain" or "fixed" (TrainConfig.lr_layers: per-layer rates); None: the default
    context_words: str | None = None  # "mixed" or "function" (TrainConfig.context_words); None: the default

    def config(self) -> TrainConfig:
        """The :class:`TrainConfig`: the preset's values with this request's overrides."""
        over: dict[str, Any] = {"targets": list(self.target), "surrogate": self.surrogate, "seed": self.seed,
                                "precision": self.precision, "save_every": self.save_every,
                                "sample_every": self.sample_every}
        for key in ("iterations", "lr", "la_strength", "la_mode", "anchors", "resolution", "contexts"):
            v = getattr(self, key)
            if v is not None:
                over[key] = v
        if self.robust is not None:
            over["robust"] = "embedding" if self.robust else "off"
        if self.neighbours is not None:
            over["neighbours"] = bool(self.neighbours)
        if self.synonyms is not None:
            over["synonyms"] = self.synonyms
        if self.lr_layers is not None:
            over["lr_layers"] = self.lr_layers
        if self.context_words is not None:
            over["context_words"] = self.context_words
        cfg = preset(self.preset, **over)
        cfg.control_prompts = list(self.control_prompts)
        if self.preview_steps:
            cfg.preview_steps = self.preview_steps
        try:
            cfg.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_INT = ("iterations", "anchors", "resolution", "seed", "save_every", "sample_every", "preview_steps", "contexts")
_FLOAT = ("lr", "la_strength")
_STR = ("surrogate", "preset", "precision", "la_mode", "synonyms", "lr_layers", "context_words")
_BOOL = ("preview", "overwrite", "keep_state", "robust", "neighbours")
KNOWN = {f.name for f in fields(TrainRequest)}


def _as_int(key: str, v: Any) -> int:
    if isinstance(v, bool):
        raise RequestError(f"{key} must be an integer, not {v!r}")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise RequestError(f"{key} must be an integer, not {v!r}") from None
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise RequestError(f"{key} must be a whole number, not {v!r}")
        v = int(v)
    if not isinstance(v, int):
        raise RequestError(f"{key} must be an integer, not {type(v).__name__}")
    return v


def _as_float(key: str, v: Any) -> float:
    if isinstance(v, bool):
        raise RequestError(f"{key} must be a number, not {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise RequestError(f"{key} must be a number, not {v!r}") from None
    if not math.isfinite(f):
        raise RequestError(f"{key} must be a finite number, not {v!r}")
    return f


def check_train_name(name: Any) -> str:
    """A membrane file stem for training: non-empty, no path separator, valid as a ``<spm:NAME>`` tag."""
    if name is None or (isinstance(name, str) and not name.strip()):
        raise RequestError("name is missing: give the membrane a name (it is saved as NAME.safetensors)")
    if not isinstance(name, str):
        raise RequestError(f"name must be text, not {type(name).__name__}")
    name = name.strip()
    if "/" in name or "\\" in name:
        raise RequestError(f"name {name!r} contains a path separator; use a plain file name such as 'van_gogh' "
                           "(the membrane is saved in the membrane folder)")
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    problem = name_problem(name)
    if problem:
        raise RequestError(f"name {name!r}: {problem}")
    if name.startswith("."):
        raise RequestError(f"name {name!r} starts with '.', which would make a hidden file; choose another name")
    return name


def split_concepts(text: Any, key: str) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` → ``["a", "b"]`` (stripped, empties dropped)."""
    if text is None:
        return []
    if isinstance(text, str):
        parts = text.split(",")
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        parts = [p for t in text for p in t.split(",")]
    else:
        raise RequestError(f"{key} must be text (commas separate several prompts), not {type(text).__name__}")
    return [p.strip() for p in parts if p.strip()]


def parse_request(data: dict[str, Any]) -> TrainRequest:
    """Validate a request dict (the API's JSON body, the tab's fields) → :class:`TrainRequest`.

    Raises :class:`RequestError` (status 400) naming the field and what is allowed.
    """
    if not isinstance(data, dict):
        raise RequestError("the request must be a JSON object with at least 'name' and 'target'")
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(KNOWN))}")
    name = check_train_name(data.get("name"))
    target = split_concepts(data.get("target"), "target")
    if not target:
        raise RequestError("target is missing: name the concept(s) to erase, e.g. 'Van Gogh' "
                           "(commas separate several concepts)")
    kw: dict[str, Any] = {"name": name, "target": target}
    for key in _INT:
        if data.get(key) is not None:
            kw[key] = _as_int(key, data[key])
    for key in _FLOAT:
        if data.get(key) is not None:
            kw[key] = _as_float(key, data[key])
    for key in _STR:
        v = data.get(key)
        if v is not None:
            if not isinstance(v, str):
                raise RequestError(f"{key} must be text, not {type(v).__name__}")
            kw[key] = v.strip() if key != "surrogate" else v
    for key in _BOOL:
        v = data.get(key)
        if v is not None:
            if not isinstance(v, bool):
                raise RequestError(f"{key} must be true or false, not {v!r}")
            kw[key] = v
    if "control_prompts" in data and data["control_prompts"] is not None:
        kw["control_prompts"] = split_concepts(data["control_prompts"], "control_prompts")
    req = TrainRequest(**kw)
    # the checks users hit most, with messages in the request's own words
    if req.iterations is not None and req.iterations < 1:
        raise RequestError(f"iterations must be at least 1 (got {req.iterations})")
    if req.lr is not None and not req.lr > 0:
        raise RequestError(f"lr must be a positive number (got {req.lr})")
    if req.la_strength is not None and req.la_strength < 0:
        raise RequestError(f"la_strength must be >= 0 (got {req.la_strength})")
    if req.anchors is not None and req.anchors < 0:
        raise RequestError(f"anchors must be >= 0 (got {req.anchors})")
    if req.save_every < 0:
        raise RequestError(f"save_every must be >= 0 (0: only at the end; got {req.save_every})")
    if req.sample_every < 0:
        raise RequestError(f"sample_every must be >= 0 (0: no sample grids during training; got {req.sample_every})")
    if req.preview_steps is not None and req.preview_steps < 0:
        raise RequestError(f"preview_steps must be at least 1, or 0 to size the check to the job (got {req.preview_steps})")
    if req.resolution is not None and (req.resolution < 8 or req.resolution % 8):
        raise RequestError(f"resolution must be a multiple of 8 pixels, at least 8 (got {req.resolution}); "
                           "leave it empty for the model's default")
    if req.preset not in PRESETS:
        raise RequestError(f"preset {req.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    for key, allowed in CHOICES.items():  # the request's words for the config's fixed-choice settings
        v = getattr(req, key, None)
        if isinstance(v, str) and v not in allowed:
            raise RequestError(f"{key} {v!r} is unknown; choose one of {', '.join(allowed)}")
    req.config()  # the trainer's own checks, as a RequestError
    return req


def preset_values(name: str) -> dict[str, Any]:
    """The values a preset gives the tab's fields (the reference defaults plus the preset's changes)."""
    cfg = preset(name)
    return {"iterations": cfg.iterations, "lr": cfg.lr, "la_strength": cfg.la_strength, "la_mode": cfg.la_mode,
            "anchors": cfg.anchors, "robust": cfg.robust != "off", "neighbours": cfg.neighbours,
            "synonyms": cfg.synonyms, "contexts": cfg.contexts}


# --- jobs --------------------------------------------------------------------------------------------
@dataclass
class TrainJob:
    """State of one job; read by the tab and ``GET /spm/v1/train/{id}``."""

    id: str
    request: TrainRequest
    status: str = "queued"
    step: int = 0
    total: int = 0
    loss: float | None = None
    it_per_s: float = 0.0
    eta_s: float | None = None
    losses: list[float] = field(default_factory=list)
    output: str | None = None
    preview_file: str | None = None
    sample_file: str | None = None  # the latest in-training sample grid, if any
    error: str | None = None
    message: str = ""
    phase: str = "queued"  # a key of PHASES
    phase_done: int = 0
    phase_total: int = 0  # 0: no count (loading, saving)
    phase_started: float | None = None  # time.monotonic() when the phase began
    phase_eta_s: float | None = None
    # every phase the job went through, in order: {"phase", "label", "seconds"} (seconds None while it runs); a phase
    # entered again (the erasure check between training intervals) is one entry per visit
    phases: list[dict] = field(default_factory=list)
    erasure: dict | None = None  # the trainer's erasure check, when it made one (erased, signal, threshold, message)
    outcome: str | None = None  # the final status, set before the reporter ends; ``status`` follows after
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    queued_run: bool = False  # run by the queue worker (True) or in a caller that holds the lock (False)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished_ok(self) -> bool:
        return self.status in ("done", "interrupted")

    def interrupt(self) -> None:
        self.stop.set()

    def phase_text(self) -> str:
        """``training step 3/10``, ``filling the latent pool 12/46``, ``loading the model``."""
        label = PHASES.get(self.phase, self.phase)
        return f"{label} {self.phase_done}/{self.phase_total}" if self.phase_total > 1 else label  # 0/1: no count

    def progress_text(self, eta: bool = True) -> str:
        """While running: the phase, its count and (``eta``) its ETA, plus the loss and speed while training:
        ``training step 3/10 · loss 0.0012 · 2.50 it/s · ETA 0:03``.  After: ``step 10/10 · loss 0.0012 ·
        done``; a failed job says so.  In the WebUI, whose progress bar shows its own ETA, ``eta=False``."""
        if self.status == "queued" and self.outcome is None:
            return "queued"
        final = self.outcome or (self.status if self.status in ("done", "failed", "interrupted") else None)
        if final == "failed":
            where = f" at step {self.step}/{self.total}" if self.step else ""
            return f"failed{where} ({PHASES.get(self.phase, self.phase)})"
        bits = [f"step {self.step}/{self.total}" if final else self.phase_text()]
        if self.loss is not None and (final or self.phase in ("training", "check", "saving")):
            bits.append(f"loss {self.loss:.4g}")
        if self.it_per_s > 0 and (final or self.phase == "training"):
            bits.append(f"{self.it_per_s:.2f} it/s")
        if final:
            bits.append(final)
        elif eta and self.phase_eta_s is not None and math.isfinite(self.phase_eta_s):
            bits.append(f"ETA {format_seconds(self.phase_eta_s)}")
        return " · ".join(bits)

    def set_phase(self, phase: str, done: int = 0, total: int = 0, eta_s: float | None = None) -> bool:
        """Enter or advance a phase; the ETA is the phase's own (elapsed in it × left / done) unless given.
        True if the phase changed."""
        now = time.monotonic()
        changed = phase != self.phase
        if changed or self.phase_started is None:
            self.end_phase(now)
            self.phase, self.phase_started = phase, now
            self.phases.append({"phase": phase, "label": PHASES.get(phase, phase), "seconds": None})
        self.phase_done, self.phase_total = done, total
        if eta_s is None and total and done:
            eta_s = (now - self.phase_started) * (total - done) / done
        self.phase_eta_s = eta_s if (total and done) else None
        return changed

    def end_phase(self, now: float | None = None) -> None:
        """Close the running phase's entry in :attr:`phases` (its seconds); the job's end calls it for the last."""
        if self.phases and self.phases[-1]["seconds"] is None and self.phase_started is not None:
            now = time.monotonic() if now is None else now
            self.phases[-1]["seconds"] = round(max(0.0, now - self.phase_started), 3)

    def phase_summary(self) -> str:
        """Where the time went, each phase once in the order first entered with its visits summed:
        ``loading the model 0.4 s · drawing the erasure signal's held-out probes 12 s · training step 2:20 · …``;
        '' for a job that ended in its first phase (no model loaded: nothing to say)."""
        if len(self.phases) < 2:
            return ""
        total: dict[str, float] = {}  # insertion order: the order first entered
        for e in self.phases:
            if e["seconds"] is not None:
                total[e["label"]] = total.get(e["label"], 0.0) + float(e["seconds"])
        return " · ".join(f"{label} {seconds_text(sec)}" for label, sec in total.items())

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.request.name, "status": self.status, "step": self.step, "total": self.total,
                "loss": self.loss, "it_per_s": self.it_per_s, "eta_s": self.eta_s, "output": self.output,
                "preview": self.preview_file, "error": self.error, "message": self.message,
                "phase": self.phase, "phase_done": self.phase_done, "phase_total": self.phase_total,
                "phase_eta_s": self.phase_eta_s, "phases": [dict(e) for e in self.phases],
                "progress": self.progress_text(), "erasure": self.erasure,
                "request": self.request.as_dict()}


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def seconds_text(s: float) -> str:
    """A phase's duration for people: ``0.4 s``, ``12 s``, then ``2:20`` (:func:`format_seconds`) from a minute."""
    if s < 10:
        return f"{s:.1f} s"
    return f"{s:.0f} s" if s < 60 else format_seconds(s)


def erasure_text(erasure: dict | None) -> str:
    """``erased (signal 0.012, threshold 0.05): …`` from a :class:`TrainResult`'s ``erasure``; '' if none."""
    if not isinstance(erasure, dict):
        return ""
    msg = str(erasure.get("message") or "").strip()
    sig = erasure.get("signal")
    if isinstance(sig, float) and math.isnan(sig):  # stopped before any check: no verdict, only why
        return msg or "erasure not measured"
    verdict = "erased" if erasure.get("erased") else "not erased"
    nums = []
    for key in ("signal", "threshold"):
        v = erasure.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            nums.append(f"{key} {v:.3g}")
    text = verdict + (f" ({', '.join(nums)})" if nums else "")
    if msg.startswith(verdict + ":"):  # the trainer's message opens with the verdict itself: say it once
        msg = msg[len(verdict) + 1:].strip()
    return f"{text}: {msg}" if msg else text


def console(message: str) -> None:
    """One line on the console, as the WebUI's own jobs report (``SPM: …``)."""
    print(f"SPM: {message}", flush=True)


class Reporter:
    """Mirrors a job's progress somewhere else.  The default does nothing.

    ``begin`` when the job starts, ``phase`` whenever its phase or the phase's count changes (every phase,
    training steps included), ``update`` after each training step (with the trainer's :class:`Progress`),
    ``end`` after the job (``job.outcome`` is its final status; ``job.status`` is published after ``end``)."""

    def begin(self, job: TrainJob) -> None:
        pass

    def phase(self, job: TrainJob) -> None:
        pass

    def update(self, job: TrainJob, progress: Any) -> None:
        pass

    def end(self, job: TrainJob) -> None:
        pass

    def should_stop(self) -> bool:
        return False


BackendProvider = Callable[[], Any]


def output_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}{SUFFIX}"


def preview_path(output: Path) -> Path:
    return output.with_name(output.name[: -len(SUFFIX)] + ".preview.png")


class TrainService:
    """Runs training jobs one at a time (see the module docstring).

    ``backend_provider()`` returns a Backend or raises :class:`NoModelError` (any exception fails the job
    with its message).  ``lock`` is held while a job runs.  ``on_saved(path)`` is called after a membrane is
    written (the WebUI refreshes its membrane list there).  Finished jobs are kept (the newest ``keep``).
    ``config_overrides``: :class:`TrainConfig` settings applied to every job (settings the form does not
    offer, e.g. ``{"max_denoising_steps": 10}`` for a small model).
    """

    def __init__(self, backend_provider: BackendProvider, folder: str | Path, *, lock: Any = None,
                 reporter: Reporter | None = None, on_saved: Callable[[Path], None] | None = None, keep: int = 100,
                 config_overrides: dict[str, Any] | None = None, log_line: Callable[[str], None] | None = console):
        self.backend_provider = backend_provider
        self.config_overrides = dict(config_overrides or {})
        TrainConfig(targets=["x"]).with_(**self.config_overrides).validate()  # a typo fails here, not per job
        self._folder = folder
        self.lock = lock if lock is not None else threading.Lock()
        self.reporter = reporter or Reporter()
        self.on_saved = on_saved
        self.log_line = log_line
        self.keep = keep
        self.jobs: OrderedDict[str, TrainJob] = OrderedDict()
        self._queue: list[TrainJob] = []
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self.current: TrainJob | None = None

    @property
    def folder(self) -> Path:
        f = self._folder() if callable(self._folder) else self._folder
        return Path(f)

    # --- creating jobs -----------------------------------------------------------------------------
    def create(self, data: dict[str, Any] | TrainRequest) -> TrainJob:
        """Validate and register a job (not queued). Refuses to clobber an existing file unless ``overwrite``."""
        req = data if isinstance(data, TrainRequest) else parse_request(data)
        self.check_output(req)
        job = TrainJob(id=uuid.uuid4().hex[:12], request=req)
        job.total = self.config_for(req).iterations
        with self._cv:
            self.jobs[job.id] = job
            while len(self.jobs) > self.keep:
                old = next(iter(self.jobs))
                if self.jobs[old].status in ("queued", "running"):
                    break
                self.jobs.pop(old)
        return job

    def config_for(self, req: TrainRequest) -> TrainConfig:
        cfg = req.config()
        if self.config_overrides:
            cfg = cfg.with_(**self.config_overrides)
            try:
                cfg.validate()
            except ValueError as e:
                raise RequestError(str(e)) from None
        return cfg

    def check_output(self, req: TrainRequest) -> Path:
        out = output_path(self.folder, req.name)
        if out.exists() and not req.overwrite:
            raise RequestError(f"{out.name} already exists in {self.folder}; choose another name or allow "
                               "overwriting (tick 'Overwrite' / send \"overwrite\": true)", status=409)
        return out

    def submit(self, data: dict[str, Any] | TrainRequest) -> TrainJob:
        """Validate, queue and return the job; the worker thread runs it when its turn comes."""
        job = self.create(data)
        with self._cv:
            self._queue.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="spm-train-worker", daemon=True)
                self._worker.start()
            self._cv.notify_all()
        return job

    def get(self, job_id: str) -> TrainJob | None:
        return self.jobs.get(job_id)

    def interrupt(self, job_id: str | None = None) -> bool:
        """Ask the running job (or ``job_id``, also while queued) to stop. True if there was one."""
        job = self.jobs.get(job_id) if job_id else self.current
        if job is None or job.status not in ("queued", "running"):
            return False
        job.interrupt()
        return True

    def _work(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._worker = None
                    return
                job = self._queue.pop(0)
            self.run(job)

    # --- running -----------------------------------------------------------------------------------
    def run(self, job: TrainJob, *, take_lock: bool = True) -> TrainJob:
        """Run ``job`` in this thread (under the lock unless the caller holds it already).

        The final status is published after the reporter has ended and the lock is released."""
        ctx = self.lock if take_lock else contextlib.nullcontext()
        job.queued_run = take_lock
        final: dict[str, Any] = {}
        try:
            with ctx:
                final = self._run(job)
        finally:
            job.finished = time.time()
            job.message = final.get("message", job.message)
            job.error = final.get("error", job.error)
            job.status = final.get("status") or job.outcome or "failed"
            job.done_event.set()  # whoever waits may start the next job at once
        return job

    def _stopping(self, job: TrainJob) -> bool:
        """Interrupt was asked for: the job's own flag (the API, the tab) or the host's (the WebUI's button)."""
        return job.stop.is_set() or bool(self.reporter.should_stop())

    def _say(self, job: TrainJob, text: str) -> None:
        if self.log_line is not None:
            try:
                self.log_line(f"{job.request.name}: {text}")
            except Exception:  # a closed console must not fail the job
                pass

    def _say_phases(self, job: TrainJob) -> None:
        """The console line before the job's last: the time each phase took (the running one closed here)."""
        job.end_phase()
        summary = job.phase_summary()
        if summary:
            self._say(job, f"time per phase: {summary}")

    def _phase(self, job: TrainJob, phase: str, done: int = 0, total: int = 0, eta_s: float | None = None,
               message: str | None = None) -> None:
        if job.set_phase(phase, done, total, eta_s):
            if message is not None:
                job.message = message
            if phase not in ("training", "loading"):
                unit = UNITS.get(phase)
                self._say(job, f"{PHASES[phase]}: {total} {unit}" if (unit and total) else PHASES[phase])
        self.reporter.phase(job)

    def _run(self, job: TrainJob) -> dict[str, Any]:
        """The job; returns its final ``status``, ``message`` and ``error`` (published by :meth:`run`)."""
        req = job.request
        if job.stop.is_set():
            job.outcome = "interrupted"
            return {"status": "interrupted", "message": "interrupted before it started"}
        job.status, job.started = "running", time.time()
        self.current = job
        backend = None
        final: dict[str, Any] = {}
        t0 = time.monotonic()
        try:
            self.reporter.begin(job)
            self._phase(job, "loading", message="loading the model")
            out = self.check_output(req)
            cfg = self.config_for(req)
            self._say(job, f"training on {', '.join(req.target)}" + (f" -> {req.surrogate!r}" if req.surrogate else "")
                      + f": {cfg.iterations} steps at lr {cfg.lr:g}, preset {req.preset}, into {out}")
            backend = self.backend_provider()
            if backend is None:
                raise NoModelError("no model is loaded; load a Stable Diffusion checkpoint first")
            from ..naming import find_targets

            if not find_targets(backend.unet):
                raise NoModelError(f"the loaded model ({getattr(backend, 'architecture', '?')}) has no transformer "
                                   "blocks SPM can attach to; this architecture is not supported")
            out.parent.mkdir(parents=True, exist_ok=True)
            session = getattr(backend, "session", None)
            with (session() if callable(session) else contextlib.nullcontext()):
                result = self._train(job, backend, cfg, out)
                if self.on_saved is not None and result.path is not None:
                    try:
                        self.on_saved(result.path)
                    except Exception as e:  # the file is saved; a failed list refresh must not fail the job
                        log.warning("SPM: refreshing the membrane list failed: %s", e)
                # an interrupted job stops here: Interrupt means now, not after a before/after render
                if (req.preview and job.step > 0 and req.control_prompts is not None and not result.interrupted
                        and not self._stopping(job)):
                    prompts = list(req.target)[:1] + list(req.control_prompts)
                    steps = req.preview_steps or check_steps(result, len(prompts))
                    self._phase(job, "check", 0, steps, message="rendering the before/after check")

                    def check_progress(done: int, total: int) -> None:
                        self._phase(job, "check", done, total)

                    grid = before_after(backend, result.membrane, prompts, steps=steps, resolution=cfg.resolution,
                                        seeds=(cfg.seed,), progress=check_progress)
                    pp = preview_path(out)
                    grid.save(pp)
                    job.preview_file = str(pp)
            job.output = str(out)
            job.erasure = getattr(result, "erasure", None)
            status = "interrupted" if result.interrupted else "done"
            verb = f"interrupted at step {job.step}; the membrane trained so far is" if result.interrupted else "saved"
            message = f"{verb} in {out}" + (f" (before/after check: {Path(job.preview_file).name})"
                                            if job.preview_file else "")
            skipped = list(getattr(result, "skipped", None) or [])
            if skipped and req.preview and req.control_prompts is not None:
                skipped.append("the before/after check")
            if skipped:  # Interrupt after the last step: the membrane is complete, what came after it is not
                listed = skipped[0] if len(skipped) == 1 else f"{', '.join(skipped[:-1])} and {skipped[-1]}"
                message += f" (Interrupt skipped {listed})"
            verdict = erasure_text(job.erasure)
            if verdict:
                message += f"; {verdict}"
            final = {"status": status, "message": message}
            self._say_phases(job)
            self._say(job, f"{status} after {job.step}/{job.total} steps in {format_seconds(time.monotonic() - t0)}"
                      f": {message}")
        except Exception as e:  # any failure becomes the job's error message, never a crash of the worker
            error = str(e) or type(e).__name__
            final = {"status": "failed", "error": error, "message": f"failed: {error}"}
            self._say_phases(job)
            self._say(job, f"failed ({PHASES.get(job.phase, job.phase)}): {error}")
            if not isinstance(e, (RequestError, NoModelError, ValueError)):
                log.error("SPM: training %s failed:\n%s", req.name, traceback.format_exc())
        finally:
            job.end_phase()
            job.outcome = final.get("status", "failed")
            job.message = final.get("message", job.message)
            if "error" in final:
                job.error = final["error"]
            backend = None
            self.current = None
            free_memory()
            try:
                self.reporter.end(job)
            except Exception as e:  # the job's result stands; the reporter's failure is only logged
                log.warning("SPM: ending the progress report failed: %s", e)
        return final

    def _train(self, job: TrainJob, backend, cfg: TrainConfig, out: Path):
        from .loop import Trainer

        every = max(1, math.ceil(cfg.iterations / CONSOLE_LINES))

        def callback(p) -> None:
            job.step, job.total, job.loss = p.step, p.total, float(p.loss)
            job.it_per_s, job.eta_s = float(p.it_per_s), float(p.eta_s)
            job.losses.append(float(p.loss))
            if p.preview_path is not None:
                job.sample_file = str(p.preview_path)
            eta = job.eta_s if math.isfinite(job.eta_s) else None
            self._phase(job, "training", p.step, p.total, eta, message="training")
            self.reporter.update(job, p)
            if p.step % every == 0 or p.step == p.total:
                self._say(job, job.progress_text())

        def on_phase(ph) -> None:
            # the phase's own label (PHASES), except where the message says more or less
            message = {"training": "training", "saving": f"saving {out.name}"}.get(ph.name, PHASES.get(ph.name))
            self._phase(job, ph.name, ph.done, ph.total, message=message)

        trainer = Trainer(backend, cfg, out, callback=callback, should_stop=lambda: self._stopping(job), progress_bar=False,
                          name=job.request.name, on_phase=on_phase, keep_state=job.request.keep_state)
        return trainer.train()

    # --- the folder ----------------------------------------------------------------------------------
    def membranes(self) -> list[dict[str, Any]]:
        """The membranes in the folder with their metadata (header only)."""
        from ..library import Library

        lib = Library(self.folder)
        entries = lib.refresh()
        return [e.as_dict() for e in entries]


def check_steps(result: Any, prompts: int, seeds: int = 1) -> int:
    """DDIM steps of the before/after check when the request leaves them open: about as many UNet rows as the
    training itself used (``result.cost["ufe"]``), within :data:`CHECK_STEPS`.  One step of the check costs
    two rows (without | with the membrane) per prompt and seed, plus their unconditional rows."""
    lo, hi = CHECK_STEPS
    ufe = (getattr(result, "cost", None) or {}).get("ufe")
    if not isinstance(ufe, (int, float)) or ufe <= 0:
        return hi
    per_step = 4 * prompts * seeds
    return int(min(hi, max(lo, math.ceil(ufe / per_step))))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the before/after check --------------------------------------------------------------------------
@torch.no_grad()
def before_after(backend, membrane, prompts: list[str], *, seeds: tuple[int, ...] = (0,), steps: int = 20,
                 guidance: float = 7.5, resolution: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
    """A PIL grid: one row per prompt; columns = each seed without the membrane, then each seed with it.

    Same seeds with and without, so the only difference is the membrane.  Uses the trainer's DDIM sampler
    over the Backend protocol (works on every host).  The membrane is attached for the call only.
    """
    from ..attach import MembraneStack
    from .sampling import sample_images

    if not prompts:
        raise ValueError("before_after needs at least one prompt")
    stack = MembraneStack(backend.unet)
    was = membrane.training
    membrane.eval()
    try:
        stack.add(membrane, 1.0)
        enc = backend.encode(prompts)
        uncond = backend.encode([""])
        n = len(seeds)
        rows = enc.rows([i for i in range(len(prompts)) for _ in range(2 * n)])
        strengths = [s for _ in prompts for s in [0.0] * n + [1.0] * n]
        seed_list = [s for _ in prompts for _ in range(2) for s in seeds]
        images = sample_images(backend, stack, rows, uncond, strengths, seed_list, steps, guidance, resolution,
                               progress=progress)
    finally:
        stack.detach()
        membrane.train(was)
    return labelled_grid(images, prompts, n)


def labelled_grid(images: torch.Tensor, prompts: list[str], per_side: int, min_cell: int = 96):
    """``[len(prompts)·2·per_side, 3, H, W]`` in [0, 1] → a PIL grid with a header and a label per row."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    cols = 2 * per_side
    label_w, head_h = 160, 24
    canvas = Image.new("RGB", (label_w + cols * cw, head_h + len(prompts) * ch), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w + 4, 8), "without membrane", fill="black")
    draw.text((label_w + per_side * cw + 4, 8), "with membrane", fill="black")
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(arr[i]).resize((cw, ch), Image.NEAREST)
        canvas.paste(tile, (label_w + c * cw, head_h + r * ch))
    for r, p in enumerate(prompts):
        text = p if len(p) <= 24 else p[:21] + "..."  # ASCII: PIL's default font has no ellipsis glyph
        draw.text((4, head_h + r * ch + ch // 2 - 6), text, fill="black")
    return canvas


# --- the loss plot -----------------------------------------------------------------------------------
def loss_plot(losses: list[float], width: int = 480, height: int = 200):
    """A PIL line plot of the loss per step (and its running mean), drawn without matplotlib."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 8, 8, height - 20
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    vals = [v for v in losses if v is not None and math.isfinite(v)]
    if not vals:
        d.text((left + 8, top + 8), "loss: no steps yet", fill="black")
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 1e-6, hi + 1e-6
    d.text((2, top + 20), f"{hi:.3g}", fill="black")  # below the corner a UI may cover with its label
    d.text((2, bottom - 10), f"{lo:.3g}", fill="black")
    d.text((left, bottom + 4), "1", fill="black")
    d.text((right - 40, bottom + 4), f"{len(losses)}", fill="black")
    d.text((left + (right - left) // 2 - 40, bottom + 4), "step / loss", fill="black")

    def pts(series: list[float]) -> list[tuple[float, float]]:
        k = len(series)
        out = []
        for i, v in enumerate(series):
            x = left + (right - left) * (i / (k - 1) if k > 1 else 0.5)
            y = bottom - (bottom - top) * (v - lo) / (hi - lo)
            out.append((x, y))
        return out

    raw = [v if (v is not None and math.isfinite(v)) else lo for v in losses]
    p = pts(raw)
    if len(p) > 1:
        d.line(p, fill=(120, 160, 230), width=1)
    else:
        d.ellipse([p[0][0] - 2, p[0][1] - 2, p[0][0] + 2, p[0][1] + 2], fill=(120, 160, 230))
    win = max(1, len(raw) // 20)
    if win > 1:
        mean, acc = [], 0.0
        for i, v in enumerate(raw):
            acc += v
            if i >= win:
                acc -= raw[i - win]
            mean.append(acc / min(i + 1, win))
        d.line(pts(mean), fill=(200, 40, 40), width=2)
    return img


__all__ = ["CHECK_STEPS", "DEFAULT_CONTROLS", "PHASES", "NoModelError", "Reporter", "RequestError", "STATUSES", "TrainJob", "TrainRequest",
           "TrainService", "before_after", "check_steps", "check_train_name", "console", "erasure_text", "labelled_grid", "loss_plot", "output_path",
           "parse_request", "preset_values", "preview_path", "split_concepts"]
