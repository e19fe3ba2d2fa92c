"""Many membranes at once: ``python -m spm train --model M --jobs jobs.yaml``.

The jobs file (YAML or JSON) lists one entry per membrane::

    defaults:                 # optional: TrainConfig fields for every job
      iterations: 600
      robust: embedding       # optional: also erase adversarial text embeddings (slower; default: off)
    jobs:                     # (a bare list of entries works too)
      - name: circle          # optional; default: the output's stem
        targets: [circle]     # or "circle, ring"
        surrogate: ""         # optional
        preset: object        # optional: object, style, nudity (default: --preset)
        output: circle.safetensors   # relative to the jobs file's folder
        overrides: {lr: 0.001}       # optional: any TrainConfig field

A job's settings are, later winning: its preset, the file's ``defaults``, the training flags given on the
command line (``--iterations`` …), the entry's ``targets``/``surrogate``, its ``overrides``.

* **One process**: the jobs run in sequence on one device (the model is loaded once).
* **Several processes** (``accelerate launch --num_processes N -m spm train --jobs …`` or ``torchrun``):
  concept-parallel.  Each process (``RANK`` of ``WORLD_SIZE``) trains its own share of the jobs on its own
  device (``cuda:LOCAL_RANK``); the shares are fixed by the jobs file alone (longest jobs first, each to the
  least loaded rank), so every process agrees on them without talking to the others.
* ``--data-parallel``: all processes train each membrane together instead: the same initial membrane,
  a different x_t stream per rank, gradients averaged over the ranks (all-reduce, gloo on CPU, nccl on
  CUDA) before every optimizer step, and ``iterations / N`` steps per rank: the same number of x_t samples
  as one process, in ``N`` times fewer sequential steps (the learning rate is not rescaled).

**Summary.** ``jobs.json`` beside the jobs file (or ``--summary PATH``) gives each job's ``status``
(``pending``, ``running``, ``done``, ``skipped``, ``interrupted``, ``failed``), steps, seconds, final loss,
the trainer's erasure signal when it reports one, and the error of a failed job.  Every update is a
read-modify-write under a lock file and an atomic replace, so processes never lose each other's entries.

**Interrupting** (Ctrl-C or SIGTERM, first time) stops the running job at its next step; it is saved with its
resumable state, every finished membrane is already on disk, and the summary says which job stopped.  A
re-run skips the jobs that are done with the same settings (summary entry, or else the membrane's own
metadata) and resumes an interrupted one from its ``.trainstate``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .config import PRESETS, TrainConfig

log = logging.getLogger("spm")

ENTRY_KEYS = ("name", "targets", "surrogate", "preset", "output", "overrides")
STATUSES = ("pending", "running", "done", "skipped", "interrupted", "failed")
FINISHED = ("done", "skipped")


class JobsFileError(ValueError):
    """A jobs file that cannot be used; the message names the file, the entry and the field."""


@dataclass
class Job:
    index: int  # position in the jobs file (0-based)
    name: str
    output: Path
    config: TrainConfig
    preset: str

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- the jobs file ---------------------------------------------------------------------------------
def _read(path: Path) -> Any:
    if not path.is_file():
        raise JobsFileError(f"{path}: no such jobs file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobsFileError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}") from None


def load_jobs(path: str | Path, cli_overrides: dict[str, Any] | None = None, default_preset: str = "object") -> list[Job]:
    """Parse and validate a jobs file; raises :class:`JobsFileError` (one line) on the first bad entry."""
    path = Path(path)
    raw = _read(path)
    defaults: dict[str, Any] = {}
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"defaults", "jobs"})
        if unknown:
            raise JobsFileError(f"{path}: unknown top-level key {unknown[0]!r}; expected 'jobs' (and optionally 'defaults')")
        defaults = raw.get("defaults") or {}
        raw = raw.get("jobs")
        if not isinstance(defaults, dict):
            raise JobsFileError(f"{path}: 'defaults' must be a mapping of training settings")
    if not isinstance(raw, list) or not raw:
        raise JobsFileError(f"{path}: expected a non-empty list of jobs (or a mapping with a 'jobs' list)")
    names = {f.name for f in fields(TrainConfig)}
    bad_default = sorted(set(defaults) - names)
    if bad_default:
        raise JobsFileError(f"{path}: defaults.{bad_default[0]} is not a training setting")
    jobs: list[Job] = []
    seen_names: dict[str, int] = {}
    seen_out: dict[Path, int] = {}
    for i, entry in enumerate(raw):
        where = f"{path}: job {i + 1}"
        if not isinstance(entry, dict):
            raise JobsFileError(f"{where}: expected a mapping with targets and output, got {type(entry).__name__}")
        if "name" in entry:
            where += f" ({entry['name']})"
        unknown = [k for k in entry if k not in ENTRY_KEYS]
        if unknown:
            hint = " (training settings go under 'overrides')" if unknown[0] in names else ""
            raise JobsFileError(f"{where}: unknown field {unknown[0]!r}{hint}; expected {', '.join(ENTRY_KEYS)}")
        out = entry.get("output")
        if not isinstance(out, str) or not out.strip():
            raise JobsFileError(f"{where}: field 'output' is missing (the membrane file to write, .safetensors)")
        output = Path(out).expanduser()
        if not output.is_absolute():
            output = path.parent / output
        if output.suffix.lower() != ".safetensors":
            raise JobsFileError(f"{where}: field 'output' {out!r}: membranes are saved as .safetensors")
        name = entry.get("name", output.stem)
        if not isinstance(name, str) or not name.strip():
            raise JobsFileError(f"{where}: field 'name' must be a non-empty string")
        where = f"{path}: job {i + 1} ({name})"
        preset = entry.get("preset", default_preset) or "object"
        if preset not in PRESETS:
            raise JobsFileError(f"{where}: field 'preset' {preset!r}: choose one of {sorted(PRESETS)}")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise JobsFileError(f"{where}: field 'overrides' must be a mapping of training settings")
        bad = sorted(set(overrides) - names)
        if bad:
            raise JobsFileError(f"{where}: field 'overrides.{bad[0]}' is not a training setting")
        if "targets" not in entry and "targets" not in overrides:
            raise JobsFileError(f"{where}: field 'targets' is missing (the concepts to erase)")
        settings: dict[str, Any] = {**PRESETS[preset], **defaults, **(cli_overrides or {})}
        for key in ("targets", "surrogate"):
            if key in entry:
                settings[key] = entry[key]
        settings.update(overrides)
        targets = settings.get("targets")
        if isinstance(targets, str):
            settings["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
        try:
            cfg = TrainConfig(**settings)
            cfg.validate()
        except (TypeError, ValueError) as e:
            raise JobsFileError(f"{where}: {e}") from None
        if name in seen_names:
            raise JobsFileError(f"{where}: field 'name' repeats job {seen_names[name] + 1}; names must be unique")
        key = output.resolve()
        if key in seen_out:
            raise JobsFileError(f"{where}: field 'output' repeats job {seen_out[key] + 1}'s file")
        seen_names[name], seen_out[key] = i, i
        jobs.append(Job(i, name, output, cfg, preset))
    return jobs


def default_summary(jobs_file: str | Path) -> Path:
    p = Path(jobs_file)
    s = p.with_name("jobs.json")
    return s if s.resolve() != p.resolve() else p.with_name("jobs.summary.json")


# --- processes ---------------------------------------------------------------------------------------
def world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun / ``accelerate launch`` (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), else from an initialised ``torch.distributed``, else ``(0, 1, 0)``."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        return rank, size, int(env.get("LOCAL_RANK", rank))
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), dist.get_rank()
    except ImportError:
        pass
    return 0, 1, 0


def assign(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """Jobs per rank: longest first (iterations × pixels), each to the least loaded rank (ties: lower rank).
    Deterministic from the jobs alone, so every process computes the same shares."""
    def cost(j: Job) -> float:
        px = (j.config.resolution or 512) ** 2
        return j.config.iterations * px * (3 if j.config.schedule == "reference" else 1)

    shares: list[list[Job]] = [[] for _ in range(size)]
    load = [0.0] * size
    for j in sorted(jobs, key=lambda j: (-cost(j), j.index)):
        r = min(range(size), key=lambda k: (load[k], k))
        shares[r].append(j)
        load[r] += cost(j)
    return [sorted(s, key=lambda j: j.index) for s in shares]


# --- the summary ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed): ``fcntl.flock`` on POSIX, ``msvcrt`` on Windows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        except ImportError:  # Windows
            import msvcrt

            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(0.05)
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


class Summary:
    """``jobs.json``: read-modify-write under ``<summary>.lock``, written atomically (see the module docstring)."""

    def __init__(self, path: str | Path, jobs_file: str | Path, mode: str, size: int):
        self.path = Path(path)
        self.lock = self.path.with_name(self.path.name + ".lock")
        self.jobs_file, self.mode, self.size = str(jobs_file), mode, size

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and isinstance(data.get("jobs"), dict) else {}

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.read().get("jobs", {}).get(name)

    def update(self, updates: dict[str, dict[str, Any]], only_missing: bool = False) -> dict[str, Any]:
        with _locked(self.lock):
            data = self.read() or {"jobs": {}}
            jobs = data["jobs"]
            for name, fields_ in updates.items():
                if only_missing and name in jobs:
                    continue
                jobs[name] = {**jobs.get(name, {}), **_jsonable(fields_), "updated_utc": _now()}
            data.update({"jobs_file": self.jobs_file, "mode": self.mode, "processes": self.size, "updated_utc": _now()})
            data["counts"] = {s: sum(1 for e in jobs.values() if e.get("status") == s) for s in STATUSES}
            _atomic_write_text(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            return data


# --- stopping -----------------------------------------------------------------------------------------
class StopSignals:
    """First SIGINT/SIGTERM sets ``event`` (the running job stops at its next step and is saved); a second
    SIGINT raises ``KeyboardInterrupt`` as usual.  Installed only in the main thread; restored on exit."""

    def __init__(self, event: threading.Event):
        self.event = event
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print(f"spm: {signal.Signals(signum).name}: stopping after the current step (again: stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# --- data-parallel ------------------------------------------------------------------------------------
class _GradAverager:
    """Averages the membrane's gradients over the process group before every optimizer step (a global
    optimizer step pre-hook, so the trainer needs no change), and makes a stop request collective: every
    rank stops at the same step, or the others would wait for it in the next all-reduce."""

    def __init__(self, local_stop: Callable[[], bool]):
        import torch
        import torch.distributed as dist

        self.dist, self.torch = dist, torch
        self.local_stop = local_stop
        self.stop = False
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.handle = register_optimizer_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        torch = self.torch
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        flag = torch.tensor([1.0 if self.local_stop() else 0.0], device=grads[0].device, dtype=grads[0].dtype)
        flat = torch.cat([g.reshape(-1) for g in grads] + [flag])
        self.dist.all_reduce(flat)
        n = self.dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g) / n)
            offset += g.numel()
        self.stop = bool(flat[-1] > 0)
        return None

    def should_stop(self) -> bool:
        return self.stop

    def close(self) -> None:
        self.handle.remove()


def _dp_trainer_class():
    from .loop import Trainer

    class DataParallelTrainer(Trainer):
        """Every rank starts from the membrane of the job's own seed; ``cfg.seed`` (rank-shifted) drives x_t."""

        init_seed = 0

        def _new_membrane(self):
            cfg = self.cfg
            self.cfg = replace(cfg, seed=self.init_seed)
            try:
                return super()._new_membrane()
            finally:
                self.cfg = cfg

    return DataParallelTrainer


def _dp_agree(plan: str, job: Job, output: Path, rank: int) -> str:
    """Rank 0's plan for ``job``, on every rank.  A rank that must resume without its own copy (deleted, or
    never written) starts from rank 0's membrane and state (its x_t stream then repeats rank 0's)."""
    import shutil

    import torch.distributed as dist

    from .state import state_path

    box = [plan]
    dist.broadcast_object_list(box, src=0)
    plan = box[0]
    if plan == "resume" and rank != 0 and not (output.exists() and state_path(output).exists()):
        log.warning("SPM: rank %d has no copy of %s to resume; starting from rank 0's", rank, job.output.name)
        shutil.copyfile(job.output, output)
        shutil.copyfile(state_path(job.output), state_path(output))
    return plan


def _dp_output(job: Job, rank: int) -> Path:
    """Rank 0 writes the job's output; the other ranks keep their resumable copies beside it."""
    if rank == 0:
        return job.output
    return job.output.with_name(f".{job.output.stem}.dp-rank{rank}.safetensors")


# --- running ------------------------------------------------------------------------------------------
def _training_matches(output: Path, cfg: TrainConfig) -> tuple[bool, int, bool]:
    """``(same settings, steps done, interrupted)`` from the membrane file's own training metadata."""
    from ..checkpoint import MembraneFileError, load_membrane

    try:
        tr = load_membrane(output).info.training or {}
    except (MembraneFileError, OSError, ValueError):
        return False, 0, False
    want = _jsonable(cfg.to_dict())
    same = all(_jsonable(tr.get(k)) == v for k, v in want.items())
    steps = tr.get("steps_done")
    return same, int(steps) if isinstance(steps, int) else 0, bool(tr.get("interrupted"))


def plan_job(job: Job, cfg: TrainConfig, output: Path, entry: dict | None, overwrite: bool) -> str:
    """``skip``, ``resume``, ``fresh`` or an error message (a string starting with ``error:``)."""
    from .state import state_path

    if not output.exists():
        return "fresh"
    if entry and entry.get("status") in FINISHED and entry.get("config_hash") == job.config_hash:
        return "skip"
    same, steps, interrupted = _training_matches(output, cfg)
    if same and steps >= cfg.iterations and not interrupted:
        return "skip"
    if same and state_path(output).exists():
        return "resume"
    if overwrite:
        return "fresh"
    return (f"error: {output} exists from another run or with other settings; pass --overwrite to retrain it "
            "(or delete it)")


def run_jobs(jobs: Sequence[Job], backend_factory: Callable[[], Any], summary: Summary, *, rank: int = 0,
             size: int = 1, data_parallel: bool = False, overwrite: bool = False,
             should_stop: Callable[[], bool] | None = None, progress_bar: bool = False,
             on_progress: Callable[[Job, Any], None] | None = None, device_name: str = "") -> list[dict[str, Any]]:
    """Train this rank's jobs (all jobs in data-parallel mode); returns this process's report per job."""
    from .loop import Trainer

    mine = list(jobs) if data_parallel else assign(jobs, size)[rank]
    writer = (rank == 0) if data_parallel else True
    if writer:
        summary.update({j.name: {"status": "pending", "index": j.index, "output": str(j.output),
                                 "targets": j.config.targets, "preset": j.preset, "config_hash": j.config_hash,
                                 "iterations": j.config.iterations, "rank": None if data_parallel else rank}
                        for j in mine}, only_missing=True)
    stop_event = threading.Event()

    def stopped() -> bool:
        return stop_event.is_set() or (should_stop is not None and bool(should_stop()))

    averager = _GradAverager(stopped) if data_parallel and size > 1 else None
    backend = None
    reports: list[dict[str, Any]] = []
    interrupted = False
    try:
        with StopSignals(stop_event):
            for job in mine:
                if (averager.should_stop() if averager else stopped()):
                    interrupted = True
                    break
                cfg, output = job.config, job.output
                if data_parallel and size > 1:
                    cfg = replace(cfg, iterations=math.ceil(cfg.iterations / size), seed=cfg.seed + rank)
                    output = _dp_output(job, rank)
                entry = summary.entry(job.name)
                plan = plan_job(job, cfg, output, entry, overwrite)
                if averager is not None:  # every rank must train, skip or resume together: rank 0 decides
                    plan = _dp_agree(plan, job, output, rank)
                base = {"output": str(job.output), "targets": cfg.targets, "preset": job.preset,
                        "config_hash": job.config_hash, "iterations": job.config.iterations, "index": job.index,
                        "rank": None if data_parallel else rank, "device": device_name}
                if data_parallel and size > 1:
                    base["data_parallel"] = {"processes": size, "iterations_per_process": cfg.iterations}
                if plan == "skip":
                    rep = {**base, "status": "skipped", "error": None}
                    if entry:  # keep what the run that trained it measured
                        rep.update({k: entry[k] for k in ("steps", "seconds", "final_loss", "erasure") if k in entry})
                    reports.append(rep)
                    if writer:
                        summary.update({job.name: rep})
                    continue
                if plan.startswith("error:"):
                    rep = {**base, "status": "failed", "error": plan[len("error: "):]}
                    reports.append(rep)
                    if writer:
                        summary.update({job.name: rep})
                    continue
                resumed = plan == "resume"
                if backend is None:
                    backend = backend_factory()  # a model that cannot be loaded stops everything (the caller reports it)
                if writer:
                    summary.update({job.name: {**base, "status": "running", "started_utc": _now(), "error": None}})
                t0 = time.perf_counter()
                try:
                    if averager is not None:
                        cls = _dp_trainer_class()
                        trainer = cls(backend, cfg, output, should_stop=averager.should_stop,
                                      progress_bar=progress_bar and rank == 0, resume=resumed, name=job.name,
                                      callback=(lambda p, j=job: on_progress(j, p)) if on_progress else None)
                        trainer.init_seed = job.config.seed
                    else:
                        trainer = Trainer(backend, cfg, output, should_stop=stopped, progress_bar=progress_bar,
                                          resume=resumed, name=job.name,
                                          callback=(lambda p, j=job: on_progress(j, p)) if on_progress else None)
                    res = trainer.train()
                except KeyboardInterrupt:
                    rep = {**base, "status": "interrupted", "seconds": round(time.perf_counter() - t0, 2),
                           "error": "interrupted before the first step"}
                    reports.append(rep)
                    if writer:
                        summary.update({job.name: rep})
                    interrupted = True
                    break
                except Exception as e:  # one bad job must not cost the others
                    msg = " ".join(f"{type(e).__name__}: {e}".split())
                    log.error("SPM: job %s failed: %s", job.name, msg)
                    rep = {**base, "status": "failed", "seconds": round(time.perf_counter() - t0, 2), "error": msg}
                    reports.append(rep)
                    if writer:
                        summary.update({job.name: rep})
                    continue
                status = "interrupted" if res.interrupted else "done"
                rep = {**base, "status": status, "steps": res.steps, "seconds": round(res.seconds, 2),
                       "final_loss": res.history[-1]["loss"] if res.history else None,
                       "erasure": getattr(res, "erasure", None), "resumed_from": None, "error": None,
                       "finished_utc": _now(),
                       "seconds_per_iteration": (res.cost or {}).get("seconds_per_iteration")}
                if resumed and res.history:
                    rep["resumed_from"] = res.history[0]["step"] - 1
                elif resumed:
                    rep["resumed_from"] = res.steps
                reports.append(rep)
                if writer:
                    summary.update({job.name: rep})
                if status == "done" and data_parallel and rank != 0:
                    _remove_private(output)
                if res.interrupted:
                    interrupted = True
                    break
    finally:
        if averager is not None:
            averager.close()
    if interrupted:
        done = {r_["index"] for r_ in reports}
        for job in mine:
            if job.index not in done:
                reports.append({"index": job.index, "output": str(job.output), "status": "pending", "rank": rank})
    return reports


def _remove_private(output: Path) -> None:
    from .state import state_path

    for p in (output, state_path(output)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --- command line ---------------------------------------------------------------------------------------
def cli_overrides(args) -> dict[str, Any]:
    """The training flags given on the command line, as TrainConfig fields (flags are named after them)."""
    over: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.name in ("targets", "control_prompts", "dynamic_resolution", "schedule"):
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            over[f.name] = v
    if getattr(args, "control", None):
        over["control_prompts"] = list(args.control)
    if getattr(args, "dynamic_resolution", False):
        over["dynamic_resolution"] = True
    if getattr(args, "reference_schedule", False):
        over["schedule"] = "reference"
    return over


def _device(requested: str | None, local_rank: int, size: int) -> str:
    import torch

    if requested is None and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"  # accelerate launch --cpu
    if requested is None:
        return f"cuda:{local_rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and size > 1:
        return f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    return requested


def main(args) -> int:
    """``python -m spm train --jobs FILE`` (called by :mod:`spm.cli`)."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    rank, size, local_rank = world()
    if getattr(args, "target", None) or getattr(args, "output", None):
        print("error: --jobs takes targets and outputs from the jobs file; drop --target/-o", file=sys.stderr)
        return 2
    try:
        jobs = load_jobs(args.jobs, cli_overrides(args), getattr(args, "preset", None) or "object")
    except JobsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dp = bool(getattr(args, "data_parallel", False)) and size > 1
    mode = "data-parallel" if dp else ("concept-parallel" if size > 1 else "sequential")
    summary = Summary(args.summary or default_summary(args.jobs), args.jobs, mode, size)
    if summary.path.resolve() == Path(args.jobs).resolve():
        print(f"error: --summary {args.summary} is the jobs file itself; choose another file", file=sys.stderr)
        return 2
    device = _device(getattr(args, "device", None), local_rank, size)
    if dp:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))

    def backend_factory():
        from ..hosts.diffusers import DiffusersBackend, load_pipeline

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[getattr(args, "model_dtype", "fp32")]
        pipe = load_pipeline(args.model, config=getattr(args, "config", None), device=device, dtype=dtype)
        return DiffusersBackend(pipe)

    try:
        reports = run_jobs(jobs, backend_factory, summary, rank=rank, size=size, data_parallel=dp,
                           overwrite=bool(getattr(args, "overwrite", False)), progress_bar=size == 1,
                           device_name=device)
    except (FileNotFoundError, ValueError) as e:  # the model could not be loaded: nothing was trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dp:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    print(json.dumps({"rank": rank, "processes": size, "mode": mode, "summary": str(summary.path),
                      "jobs": [{k: r.get(k) for k in ("output", "status", "steps", "seconds", "error")} for r in reports]},
                     indent=2))
    statuses = {r["status"] for r in reports}
    if "interrupted" in statuses or "pending" in statuses:
        print(f"interrupted: finished membranes are saved; run the same command again to resume ({summary.path})",
              file=sys.stderr)
        return 130
    return 1 if "failed" in statuses else 0


__all__ = ["Job", "JobsFileError", "Summary", "assign", "cli_overrides", "config_hash", "default_summary", "load_jobs",
           "main", "plan_job", "run_jobs", "world"]
