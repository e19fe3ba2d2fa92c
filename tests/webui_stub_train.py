"""Stand-ins for the WebUI modules the *trainer* needs, on top of :mod:`tests.webui_stub`.

Mirrors **AUTOMATIC1111 v1.10.1** (commit 82a973c0): ``modules/shared_state.py`` (``State``: begin/end,
interrupt, ``assign_current_image``, job_count/job_no/textinfo), ``modules/progress.py`` (task queue:
add_task_to_queue/start_task/finish_task/record_results), ``modules/call_queue.py`` (``queue_lock``,
``wrap_gradio_gpu_call`` → ``wrap_gradio_call`` → ``wrap_gradio_call_no_job``: the lock, the task id from
the first argument, ``extra_outputs + [error html]`` on exceptions, the stats appended to the last output),
``modules/devices.py`` (``autocast``, ``torch_gc``), and the surface of A1111's loaded SD1/SD2 model that
training uses: ``LatentDiffusion.alphas_cumprod`` (registered from the ``linear`` beta schedule as
``ldm.models.diffusion.ddpm`` does), ``parameterization``, ``num_timesteps``, ``decode_first_stage``,
``is_sdxl``/``is_sd1``/``is_sd2`` flags.

Forge (backend era, 2025-06): ``backend.memory_management.load_model_gpu``, ``KModel.predictor``
(``backend.modules.k_prediction.Prediction``: ``prediction_type`` "epsilon"/"v_prediction" and an
``alphas_cumprod`` buffer), ``ForgeDiffusionEngine.get_learned_conditioning`` and ``decode_first_stage`` under
``@torch.inference_mode()`` (so they return *inference tensors*, the first training blocker), Forge's
UNet parameters built under inference mode (as its loader leaves them), and Forge's
``BasicTransformerBlock.forward`` with its in-place ``x += …`` (the second blocker).
"""

from __future__ import annotations

import html
import sys
import threading
import time
import types
from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch import nn

from tests import webui_stub as stub

TRAIN_MODULES = ["modules.call_queue", "modules.progress", "modules.devices", "modules.shared_state",
                 "modules.sd_models", "backend.memory_management"]


# --- modules.shared_state --------------------------------------------------------------------------
class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None

    def __init__(self):
        self.log: list[tuple] = []  # (what, job) for tests

    def interrupt(self):
        self.interrupted = True

    def stop_generating(self):
        self.stopping_generation = True

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.current_latent = None
        self.current_image = None
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.log.append(("begin", job))

    def end(self):
        self.log.append(("end", self.job))
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1


def progress_and_eta(state: State, now: float | None = None) -> tuple[float, float | None]:
    """What ``modules/progress.py``'s ``progressapi`` tells the progress bar: the fraction from ``job_no /
    job_count`` plus ``sampling_step / sampling_steps`` of the current job, and the ETA extrapolated from the
    time since ``state.time_start`` (None while the fraction is 0)."""
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    progress = min(progress, 1)
    elapsed = (time.time() if now is None else now) - (state.time_start or time.time())
    return progress, (elapsed / progress - elapsed if progress > 0 else None)


# --- modules.progress ------------------------------------------------------------------------------
progress_state = types.SimpleNamespace(current_task=None, pending_tasks=OrderedDict(), finished_tasks=[], results={})


def start_task(id_task):
    progress_state.current_task = id_task
    progress_state.pending_tasks.pop(id_task, None)


def finish_task(id_task):
    if progress_state.current_task == id_task:
        progress_state.current_task = None
    progress_state.finished_tasks.append(id_task)


def record_results(id_task, res):
    progress_state.results[id_task] = res


def add_task_to_queue(id_job):
    progress_state.pending_tasks[id_job] = time.time()


# --- modules.call_queue ----------------------------------------------------------------------------
class WatchedLock:
    """A ``threading.Lock`` (A1111 1.10's ``queue_lock``; not re-entrant) that also tells a test how many
    threads are blocked waiting for it, so a test can wait for "the job is queued at the lock" instead of
    sleeping and hoping."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self.waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        with self._cv:
            self.waiting += 1
            self._cv.notify_all()
        try:
            return self._lock.acquire(True, timeout)
        finally:
            with self._cv:
                self.waiting -= 1
                self._cv.notify_all()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def wait_for_waiters(self, n: int, timeout: float = 120) -> bool:
        """Block until ``n`` threads wait for the lock; False after ``timeout`` s (a deadlock guard)."""
        with self._cv:
            return self._cv.wait_for(lambda: self.waiting >= n, timeout)


queue_lock = WatchedLock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        shared = sys.modules["modules.shared"]
        if args and type(args[0]) is str and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            add_task_to_queue(id_task)
        else:
            id_task = None
        with queue_lock:
            shared.state.begin(job=id_task)
            start_task(id_task)
            try:
                res = func(*args, **kwargs)
                record_results(id_task, res)
            finally:
                finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    def f(*args, **kwargs):
        shared = sys.modules["modules.shared"]
        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
        return res

    return wrap_gradio_call_no_job(f, extra_outputs, add_stats)


def wrap_gradio_call_no_job(func, extra_outputs=None, add_stats=False):
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            if extra_outputs_array is None:
                extra_outputs_array = [None, '']
            res = extra_outputs_array + [f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
        if not add_stats:
            return tuple(res)
        res[-1] += "<div class='performance'><p class='time'>Time taken: 0.0 sec.</p></div>"  # last item is HTML
        return tuple(res)

    return f


# --- the A1111 model surface used by training ------------------------------------------------------
def ldm_alphas_cumprod(n: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """``ldm.modules.diffusionmodules.util.make_beta_schedule("linear")`` → ᾱ, as ``register_schedule`` keeps it."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


class TinyFirstStage(nn.Module):
    """A stand-in decoder: latents [B, 4, h, w] → images [B, 3, 2h, 2w] in about [-1, 1].  Its ``encoder``
    has ``num_resolutions`` as ldm's ``Encoder`` (2 levels: downscale 2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(4, 3, 1)
        self.encoder = types.SimpleNamespace(num_resolutions=2)

    def decode(self, z):
        return torch.tanh(nn.functional.interpolate(self.conv(z), scale_factor=2, mode="nearest"))


class A1111Model(stub.LatentDiffusion):
    """``stub.LatentDiffusion`` plus the schedule and decoder a loaded A1111 SD1/SD2 model has."""

    def __init__(self, unet, clip, parameterization: str = "eps"):
        super().__init__(unet, clip, sdxl=False)
        self.parameterization = parameterization
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())
        self.num_timesteps = 1000
        self.scale_factor = 0.18215
        self.first_stage_model = TinyFirstStage()
        self.is_sd1, self.is_sd2, self.is_sdxl = parameterization == "eps", parameterization == "v", False

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


class SgmModel(nn.Module):
    """A1111's SDXL surface (``sgm.models.diffusion.DiffusionEngine`` after ``sd_models_xl.extend_sdxl``):
    dict conditioning {crossattn, vector}; ``apply_model(x, t, cond)`` → ``OpenAIWrapper``:
    ``diffusion_model(x, timesteps=t, context=cond['crossattn'], y=cond['vector'])``."""

    def __init__(self, diffusion_model, clip, vector_dim: int = 8):
        super().__init__()
        self.model = stub.DiffusionWrapper(diffusion_model)
        self.cond_stage_model = clip
        self.is_sdxl, self.is_sd1, self.is_sd2 = True, False, False
        self.parameterization = "eps"
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())
        self.vector_dim = vector_dim
        self.first_stage_model = TinyFirstStage()
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny-xl")

    def get_learned_conditioning(self, batch):
        z = self.cond_stage_model(batch)
        width = getattr(batch, "width", 1024) or 1024
        vec = torch.cat([z.mean(1)[:, : self.vector_dim - 1], torch.full((len(batch), 1), float(width) / 1024)], 1)
        return {"crossattn": z, "vector": vec}

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond.get("crossattn"), y=cond.get("vector"))

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z)


# --- Forge ------------------------------------------------------------------------------------------
class Prediction(nn.Module):
    """``backend.modules.k_prediction.Prediction`` (the parts training reads)."""

    def __init__(self, prediction_type: str = "epsilon"):
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())


class ForgeTransformerBlock(nn.Module):
    """``backend.nn.unet.BasicTransformerBlock.forward``'s residual structure, with its in-place adds."""

    def __init__(self, dim: int = 16, ctx: int = 32):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = nn.Linear(dim, dim)
        self.attn2 = nn.Linear(ctx, dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x, context):
        n = self.attn1(self.norm1(x))
        x += n
        n = self.norm2(x) * self.attn2(context).mean(1, keepdim=True)
        x += n
        x = self.ff(self.norm3(x)) + x
        return x


def forge_engine(unet: nn.Module, clip, prediction_type: str = "epsilon"):
    """A Forge ``ForgeDiffusionEngine`` around ``unet`` (made Forge-like with :func:`stub.forgeify`), whose
    parameters are inference tensors and whose conditioning and decoding run under inference mode."""
    stub.forgeify(unet)
    with torch.inference_mode():
        for mod in unet.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    engine = stub.ForgeDiffusionEngine(unet, clip)
    engine.forge_objects.vae = types.SimpleNamespace(downscale_ratio=2)  # backend.patcher.vae.VAE
    kmodel = engine.forge_objects.unet.model
    kmodel.predictor = Prediction(prediction_type)
    first_stage = TinyFirstStage()
    orig_cond = engine.get_learned_conditioning

    def get_learned_conditioning(prompt):
        with torch.inference_mode():
            return orig_cond(prompt)

    @torch.inference_mode()
    def decode_first_stage(x):
        return first_stage.decode(x)

    engine.get_learned_conditioning = get_learned_conditioning
    engine.decode_first_stage = decode_first_stage
    engine.forge_objects_original.unet.model.predictor = kmodel.predictor
    return engine


class FakeInitialModel:
    """Forge's ``modules.sd_models.FakeInitialModel`` (backend era): the placeholder ``model_data.sd_model``
    (so ``shared.sd_model``) holds from start-up until the first generation loads the real model.  It exists
    for other extensions' token counters: ``cond_stage_model`` None, ``chunk_length`` 75,
    ``get_prompt_lengths_on_ui``; there is no ``forge_objects`` and no ``model``."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt):
        import math

        r = len(prompt.strip("!,. ").replace(" ", ",").replace(".", ",").replace("!", ",").split(","))
        return r, math.ceil(max(r, 1) / self.chunk_length) * self.chunk_length


loaded_models: list = []


def load_model_gpu(model):
    loaded_models.append(model)


# --- installation -------------------------------------------------------------------------------------
def install(tmp_path, *, forge: bool = False) -> types.SimpleNamespace:
    """:func:`tests.webui_stub.install` plus the trainer's modules; ``shared.state`` is a fresh :class:`State`."""
    env = stub.install(tmp_path, forge=forge)
    progress_state.current_task = None
    progress_state.pending_tasks.clear()
    progress_state.finished_tasks.clear()
    progress_state.results.clear()
    loaded_models.clear()
    root = sys.modules["modules"]
    env.callbacks.on_ui_tabs = stub._add("ui_tabs")
    cq = stub._module("modules.call_queue")
    cq.queue_lock = WatchedLock()
    cq.wrap_gradio_gpu_call, cq.wrap_gradio_call, cq.wrap_queued_call = wrap_gradio_gpu_call, wrap_gradio_call, wrap_queued_call
    globals()["queue_lock"] = cq.queue_lock
    pr = stub._module("modules.progress")
    pr.start_task, pr.finish_task, pr.record_results, pr.add_task_to_queue = start_task, finish_task, record_results, add_task_to_queue
    dev = stub._module("modules.devices")
    dev.autocast = lambda disable=False: nullcontext()
    dev.torch_gc = lambda: None
    dev.device = torch.device("cpu")
    ss = stub._module("modules.shared_state")
    ss.State = State
    env.shared.state = State()
    for name in ("call_queue", "progress", "devices", "shared_state"):
        setattr(root, name, sys.modules[f"modules.{name}"])
    if forge:
        sm = stub._module("modules.sd_models")  # Forge's model slot starts with the placeholder, not None
        sm.FakeInitialModel = FakeInitialModel
        sm.model_data = types.SimpleNamespace(sd_model=FakeInitialModel())
        root.sd_models = sm
        env.shared.sd_model = sm.model_data.sd_model
        mm = stub._module("backend.memory_management")
        mm.load_model_gpu = load_model_gpu
        sys.modules["backend"].memory_management = mm
    env.call_queue = cq
    return env


def uninstall() -> None:
    for name in TRAIN_MODULES:
        sys.modules.pop(name, None)
    stub.uninstall()
    for name in [n for n in sys.modules if n.startswith("spm.webui.") and n.split(".")[-1] in
                 ("train_api", "train_backend_a1111", "train_backend_forge")]:
        sys.modules.pop(name, None)
