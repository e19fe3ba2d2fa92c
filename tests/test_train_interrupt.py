"""Training stopped at every phase (issue #7, bad input): ``should_stop`` and Ctrl-C (``KeyboardInterrupt``).

Phases of :meth:`spm.train.loop.Trainer.train` with the latent pool (the default schedule): the pool
warm-up (``max_denoising_steps − 1`` batched CFG calls before the first iteration), then per iteration an
OFF call and an ON call with gradient, and every ``save_every`` steps a checkpoint (the membrane, then its
``.trainstate``), and at the end the final save.  Whatever the moment, what is on disk must be a complete,
loadable membrane (or nothing) and never a half-written file, the previous file must survive an interrupted
save, and ``resume`` must finish the run.

Every save goes through :func:`safetensors.torch.save_file` (inside :func:`spm.checkpoint.atomic_save`); the
tests wrap it to (1) check at each save that the file already on disk loads completely and (2) simulate a
Ctrl-C in the middle of a write (a truncated temp file, then ``KeyboardInterrupt``).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from spm.checkpoint import MembraneFileError, load_membrane
from spm.hosts.diffusers import DiffusersBackend
from spm.train import TrainConfig, Trainer
from spm.train.signal import probe_levels
from spm.train.state import load_state, state_path
from tests.test_train_models import tiny_sd_pipe

pytestmark = pytest.mark.usefixtures("one_thread")

ITERS, SAVE_EVERY = 5, 2  # checkpoints at steps 2 and 4, the final save at 5
# pool of 2 over 5 DDIM steps: the warm-up is 3 batched UNet calls
# without context prompts, whose pair check and probes would add UNet calls before the warm-up and a grad call per
# step that the call counts below do not expect (their interrupt and resume: test_train.py)
CFG = TrainConfig(targets=["circle"], iterations=ITERS, save_every=SAVE_EVERY, anchors=1, pool_size=2,
                  max_denoising_steps=5, lr=3e-3, lr_scheduler="constant", lr_warmup_steps=0, contexts=0)
FILL_CALLS = 3
# before the warm-up: the erasure signal's held-out probes, one batched UNet call per DDIM step down to the lowest
# probe level (the surrogate "" needs no call of its own)
PROBE_CALLS = max(probe_levels(CFG.max_denoising_steps, CFG.signal_levels)) + 1


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend(tiny_sd_pipe())


class Saves:
    """Wraps ``safetensors.torch.save_file``: checks the files on disk at every save; interrupts chosen writes."""

    def __init__(self, out, interrupt_at=()):
        self.out = out
        self.interrupt_at = set(interrupt_at)  # 1-based save_file calls to cut short with KeyboardInterrupt
        self.calls = 0
        self.on_disk: list[int | None] = []  # steps_done of the membrane on disk when each save began
        self.real = safetensors.torch.save_file

    def __call__(self, tensors, filename, metadata=None):
        self.calls += 1
        self.on_disk.append(load_membrane(self.out).info.training["steps_done"] if self.out.exists() else None)
        if state_path(self.out).exists():  # the state beside it is complete too
            with safetensors.safe_open(str(state_path(self.out)), "pt") as f:
                json.loads(f.metadata()["spm_trainstate"])
        self.real(tensors, filename, metadata=metadata)
        if self.calls in self.interrupt_at:
            with open(filename, "r+b") as f:  # half-written when Ctrl-C arrives
                f.truncate(max(1, f.seek(0, 2) // 2))
            raise KeyboardInterrupt


def disk_steps(out) -> tuple[int, int | None]:
    """(steps_done of the membrane, step of its .trainstate) — both files load completely.  A finished run
    deletes its state (None)."""
    m = load_membrane(out)
    if not state_path(out).exists():
        return m.info.training["steps_done"], None
    params = [p for p in m.parameters() if p.requires_grad]
    with safetensors.safe_open(str(state_path(out)), "pt") as f:  # the trainer's groups (per-layer rates)
        sizes = [len(g["params"]) for g in json.loads(f.metadata()["spm_trainstate"])["param_groups"]]
    assert sum(sizes) == len(params)
    # groups of the saved sizes (which parameter is in which does not matter to this check: the state loads or not)
    cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    opt = torch.optim.AdamW([{"params": params[a:b]} for a, b in zip(cuts, cuts[1:])])
    meta = load_state(state_path(out), opt, torch.Generator())
    return int(m.info.training["steps_done"]), int(meta["step"])


def no_temp_files(folder) -> bool:
    return not list(folder.glob(".*.tmp"))


class UNetCalls:
    """A pre-hook on the UNet (registered before the trainer's) counting calls, optionally raising at one."""

    def __init__(self, unet, raise_at=None, grad_only=False):
        self.n = self.grad_n = 0
        self.raise_at, self.grad_only = raise_at, grad_only
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1
        self.grad_n += torch.is_grad_enabled()
        count = self.grad_n if self.grad_only else self.n
        if self.raise_at is not None and count == self.raise_at and (torch.is_grad_enabled() or not self.grad_only):
            raise KeyboardInterrupt

    def close(self):
        self.handle.remove()


# (id, how: "stop" = should_stop / "ctrl-c", when, expected steps at the stop, expected saves during the run)
CASES = [
    # should_stop, polled at the top of every iteration and (the fix) before each UNet call of the warm-up
    ("stop-in-probes", "stop", "in-probes", 0),  # polled before each UNet call of the probes too
    ("stop-warm-up", "stop", "in-warm-up", 0),
    ("stop-iteration-0", "stop", "at-once", 0),
    ("stop-middle", "stop", "step>=3", 3),
    ("stop-before-checkpoint", "stop", "step>=1", 1),
    ("stop-after-checkpoint", "stop", "step>=2", 2),
    ("stop-last-step", "stop", "step>=5", 5),  # nothing left to stop: a normal finish
    # Ctrl-C
    ("ctrl-c-probes", "ctrl-c", "unet-call-2", 0),
    ("ctrl-c-warm-up", "ctrl-c", f"unet-call-{PROBE_CALLS + 2}", 0),
    ("ctrl-c-iteration-0", "ctrl-c", "first-grad-call", 0),
    ("ctrl-c-middle", "ctrl-c", "callback-3", 3),
    ("ctrl-c-before-checkpoint", "ctrl-c", "grad-call-2", 1),  # inside step 2, whose end would save
    ("ctrl-c-in-checkpoint-membrane", "ctrl-c", "save-3", 4),  # writing the membrane of step 4
    ("ctrl-c-in-checkpoint-state", "ctrl-c", "save-4", 4),  # writing the .trainstate of step 4
    ("ctrl-c-last-step", "ctrl-c", "callback-5", 5),
]


@pytest.mark.parametrize("how, when, steps", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_interrupt_leaves_a_loadable_membrane_and_resume_finishes(backend, tmp_path, monkeypatch, how, when, steps):
    out = tmp_path / "c.safetensors"
    seen: list[int] = []
    calls = UNetCalls(backend.unet, raise_at=int(when.split("-")[-1]) if when.startswith("unet-call") else
                      (int(when.split("-")[-1]) if when.startswith("grad-call") else (1 if when == "first-grad-call" else None)),
                      grad_only=when.startswith(("grad-call", "first-grad")))
    saves = Saves(out, interrupt_at=[int(when.split("-")[1])] if when.startswith("save-") else [])
    monkeypatch.setattr(safetensors.torch, "save_file", saves)

    def callback(p):
        seen.append(p.step)
        if when.startswith("callback-") and p.step == int(when.split("-")[1]):
            raise KeyboardInterrupt

    def should_stop():
        if when == "at-once":
            return True
        if when == "in-probes":
            return calls.n >= 2  # the probes' second UNet call is about to run
        if when == "in-warm-up":
            return calls.n >= PROBE_CALLS + 2  # the warm-up's second UNet call is about to run
        if when.startswith("step>="):
            return bool(seen) and seen[-1] >= int(when[6:])
        return False

    try:
        res = Trainer(backend, CFG, out, progress_bar=False, callback=callback,
                      should_stop=should_stop if how == "stop" else None).train()
    finally:
        calls.close()
    assert res.steps == steps and res.interrupted == (steps < ITERS or how == "ctrl-c")
    if when == "in-probes":
        assert calls.n == 2 and seen == []  # stopped inside the probes (before their third call), not after them
    if when == "in-warm-up":
        assert calls.n == PROBE_CALLS + 2 and seen == []  # stopped inside the warm-up (before its third call)
    if when == "at-once":
        assert calls.n == 0
    assert disk_steps(out) == (steps, steps if res.interrupted else None)  # a finished run keeps no state
    assert all(s is None or 0 <= s <= steps for s in saves.on_disk)  # every save found a complete file (or none)
    assert no_temp_files(tmp_path)
    assert not backend.unet._forward_hooks and not backend.unet._forward_pre_hooks
    assert load_membrane(out).info.training["interrupted"] == res.interrupted

    # resume (a plain run: no more interruptions) finishes the remaining steps from there
    monkeypatch.setattr(safetensors.torch, "save_file", saves.real)
    seen.clear()
    if not res.interrupted:  # nothing to resume: the finished run deleted its state
        with pytest.raises(MembraneFileError, match="keep_state"):
            Trainer(backend, CFG, out, resume=True, progress_bar=False).train()
        return
    more = Trainer(backend, CFG, out, resume=True, progress_bar=False, callback=lambda p: seen.append(p.step)).train()
    assert more.steps == ITERS and not more.interrupted and seen == list(range(steps + 1, ITERS + 1))
    assert disk_steps(out) == (ITERS, None)
    assert no_temp_files(tmp_path)


def test_ctrl_c_in_a_checkpoint_keeps_the_previous_file(backend, tmp_path, monkeypatch):
    """Ctrl-C while the step-4 checkpoint is written, and again while the final save is written: the
    trainer gives up (the KeyboardInterrupt reaches the caller) and the step-2 checkpoint is what remains."""
    out = tmp_path / "c.safetensors"
    saves = Saves(out, interrupt_at=[3, 4])  # 1, 2: checkpoint 2; 3: membrane of step 4; 4: the final membrane
    monkeypatch.setattr(safetensors.torch, "save_file", saves)
    with pytest.raises(KeyboardInterrupt):
        Trainer(backend, CFG, out, progress_bar=False).train()
    assert saves.on_disk == [None, 2, 2, 2]
    assert disk_steps(out) == (2, 2) and no_temp_files(tmp_path)
    assert not backend.unet._forward_hooks and not backend.unet._forward_pre_hooks
    monkeypatch.setattr(safetensors.torch, "save_file", saves.real)
    res = Trainer(backend, CFG, out, resume=True, progress_bar=False).train()
    assert res.steps == ITERS and disk_steps(out) == (ITERS, None)


def test_ctrl_c_between_membrane_and_state_resumes_from_the_membrane(backend, tmp_path, monkeypatch):
    """The membrane is written before its ``.trainstate``: Ctrl-C in the state of checkpoint 4 and again in
    the final state leaves the step-4 membrane beside the step-2 state.  Resume continues from the
    membrane's 4 steps (not from the state's 2, which would train steps 3–4 twice)."""
    out = tmp_path / "c.safetensors"
    saves = Saves(out, interrupt_at=[4, 6])  # 3: membrane 4; 4: its state; 5: final membrane (4); 6: final state
    monkeypatch.setattr(safetensors.torch, "save_file", saves)
    with pytest.raises(KeyboardInterrupt):
        Trainer(backend, CFG, out, progress_bar=False).train()
    assert disk_steps(out) == (4, 2) and no_temp_files(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", saves.real)
    seen: list[int] = []
    res = Trainer(backend, CFG, out, resume=True, progress_bar=False, callback=lambda p: seen.append(p.step)).train()
    assert seen == [5] and res.steps == ITERS and disk_steps(out) == (ITERS, None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_sd_pipe().save_pretrained(str(d))
    return d


def test_cli_ctrl_c_then_resume(model_dir, tmp_path, monkeypatch, capsys):
    from spm import cli
    from spm.train import loop

    out = tmp_path / "c.safetensors"
    args = ["train", "--model", str(model_dir), "--target", "circle", "-o", str(out), "--iterations", str(ITERS),
            "--save-every", str(SAVE_EVERY), "--pool-size", "2", "--max-denoising-steps", "5", "--anchors", "1",
            "--device", "cpu"]
    real = loop.objective_step
    n = {"calls": 0}

    def step(*a, **kw):
        n["calls"] += 1
        if n["calls"] == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "objective_step", step)
    assert cli.main(args) == 130
    captured = capsys.readouterr()
    assert json.loads(captured.out)["steps"] == 3 and "--resume" in captured.err
    assert disk_steps(out) == (3, 3) and no_temp_files(tmp_path)
    monkeypatch.setattr(loop, "objective_step", real)
    assert cli.main(args + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == ITERS
    assert disk_steps(out) == (ITERS, None)  # finished: the state is gone ...
    assert cli.main(args + ["--resume", "--iterations", str(ITERS + 2)]) == 2  # nothing to extend: one line
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--keep-state" in err and "Traceback" not in err
    assert cli.main(args + ["--overwrite", "--keep-state"]) == 0  # ... unless asked to keep it
    assert disk_steps(out) == (ITERS, ITERS)
