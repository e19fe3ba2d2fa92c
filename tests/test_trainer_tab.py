"""The trainer job service (spm/train/jobs.py) and handlers (spm/ui/trainer_tab.py) on a tiny random SD1 pipeline."""

from __future__ import annotations

import functools
import json
import threading

import pytest
import torch

from spm.checkpoint import load_membrane
from spm.train import jobs
from spm.train.config import PRESETS, TrainConfig
from spm.train.jobs import NoModelError, RequestError, TrainService, parse_request

pytestmark = pytest.mark.usefixtures("one_thread")


FAST_CFG = {"max_denoising_steps": 4, "pool_size": 2}  # x_t after at most 3 DDIM steps, 2 trajectories


@functools.lru_cache(maxsize=1)
def tiny_backend():
    """One tiny random SD1 pipeline's backend, shared by the trainer-UI test modules (building one takes seconds)."""
    from spm.hosts.diffusers import DiffusersBackend
    from tests.test_train_models import tiny_sd_pipe

    return DiffusersBackend(tiny_sd_pipe())


@pytest.fixture
def backend():
    return tiny_backend()


def service(backend, folder, **kw):
    return TrainService(lambda: backend, folder, config_overrides=FAST_CFG, **kw)


def fast(**kw):
    """A request that trains in about a second on the tiny pipeline."""
    return {"name": "circle", "target": "a red circle", "iterations": 3, "preview_steps": 2, "anchors": 1, **kw}


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, \
        {n: p.requires_grad for n, p in module.named_parameters()}


# --- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, fragment", [
    ({"name": "x"}, "target is missing"),
    ({"name": "x", "target": " , "}, "target is missing"),
    ({"target": "cat"}, "name is missing"),
    ({"name": "  ", "target": "cat"}, "name is missing"),
    ({"name": "a/b", "target": "cat"}, "path separator"),
    ({"name": "a\\b", "target": "cat"}, "path separator"),
    ({"name": "..", "target": "cat"}, "'..'"),
    ({"name": "x", "target": "cat", "iterations": -5}, "iterations must be at least 1"),
    ({"name": "x", "target": "cat", "iterations": 2.5}, "whole number"),
    ({"name": "x", "target": "cat", "iterations": True}, "integer"),
    ({"name": "x", "target": "cat", "lr": 0}, "lr must be a positive"),
    ({"name": "x", "target": "cat", "lr": "fast"}, "lr must be a number"),
    ({"name": "x", "target": "cat", "precision": "fp64"}, "precision"),
    ({"name": "x", "target": "cat", "preset": "cars"}, "preset"),
    ({"name": "x", "target": "cat", "resolution": 500}, "multiple of 8"),
    ({"name": "x", "target": "cat", "anchors": -1}, "anchors"),
    ({"name": "x", "target": "cat", "sample_every": -2}, "sample_every"),
    ({"name": "x", "target": "cat", "overwrite": "yes"}, "true or false"),
    ({"name": "x", "target": "cat", "steps": 3}, "unknown field"),
    ({"name": "x", "target": 5}, "target must be text"),
])
def test_bad_requests_name_the_problem(data, fragment):
    with pytest.raises(RequestError) as e:
        parse_request(data)
    assert fragment in str(e.value)
    assert e.value.status == 400


def test_request_defaults_and_overrides_follow_the_preset():
    r = parse_request({"name": "van_gogh.safetensors", "target": "Van Gogh, starry night", "preset": "style",
                       "iterations": "12", "resolution": 0.0 or None})
    assert r.name == "van_gogh" and r.target == ["Van Gogh", "starry night"]
    cfg = r.config()
    assert isinstance(cfg, TrainConfig)
    assert cfg.iterations == 12  # override
    assert cfg.anchors == PRESETS["style"]["anchors"] and cfg.la_budget == PRESETS["style"]["la_budget"]
    assert cfg.lr == TrainConfig().lr and cfg.la_strength == TrainConfig().la_strength  # reference defaults
    assert jobs.preset_values("nudity")["iterations"] == PRESETS["nudity"]["iterations"]


def test_service_overrides_are_checked_once():
    with pytest.raises(TypeError):
        TrainService(lambda: None, ".", config_overrides={"max_denoise_steps": 4})
    with pytest.raises(ValueError, match="pool_size"):
        TrainService(lambda: None, ".", config_overrides={"pool_size": 0})
    svc = TrainService(lambda: None, ".", config_overrides=FAST_CFG)
    assert svc.config_for(parse_request(fast())).max_denoising_steps == 4


# --- running jobs ------------------------------------------------------------------------------------
def test_a_job_saves_the_membrane_with_metadata_and_a_before_after_grid(backend, tmp_path):
    before, grads = snapshot(backend.unet)
    seen = []
    svc = service(backend, tmp_path)
    job = svc.create(fast(control_prompts="a blue square, a green triangle"))
    job_total = job.total
    orig_update = svc.reporter.update
    svc.reporter.update = lambda j, p: (seen.append((p.step, p.total)), orig_update(j, p))
    svc.run(job)
    assert job.status == "done", job.error
    assert job_total == 3 and seen == [(1, 3), (2, 3), (3, 3)]
    out = tmp_path / "circle.safetensors"
    assert job.output == str(out) and out.exists()
    assert str(out) in job.message
    m = load_membrane(out)
    assert m.info.concepts == ["a red circle"]
    assert m.info.training["iterations"] == 3 and m.info.training["steps_done"] == 3
    assert len(job.losses) == 3 and all(v == v for v in job.losses)
    # before/after: 3 prompts (target + 2 controls) x (off, on) x 1 seed, a header row and a label column
    prev = tmp_path / "circle.preview.png"
    assert job.preview_file == str(prev)
    from PIL import Image

    with Image.open(prev) as im:
        w, h = im.size
    cell = 96  # 16 px images are scaled up to at least 96 px
    assert (w, h) == (160 + 2 * cell, 24 + 3 * cell)
    # the checkpoint is untouched, bit for bit, and requires_grad is as before
    after, grads_after = snapshot(backend.unet)
    assert grads == grads_after
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not backend.unet._forward_hooks and not backend.unet._forward_pre_hooks


def test_a_finished_job_keeps_no_membrane_alive(backend, tmp_path):
    import gc

    from spm.attach import MembraneStack
    from spm.membrane import Membrane

    def alive():
        gc.collect()
        return sum(isinstance(o, (Membrane, MembraneStack)) for o in gc.get_objects())

    n = alive()
    svc = service(backend, tmp_path)
    job = svc.run(svc.create(fast()))
    assert job.status == "done" and svc.current is None
    assert alive() == n


def test_existing_file_is_never_clobbered_without_overwrite(backend, tmp_path):
    svc = service(backend, tmp_path)
    (tmp_path / "circle.safetensors").write_bytes(b"precious")
    with pytest.raises(RequestError) as e:
        svc.create(fast(preview=False))
    assert e.value.status == 409 and "already exists" in str(e.value)
    assert (tmp_path / "circle.safetensors").read_bytes() == b"precious"
    job = svc.run(svc.create(fast(preview=False, overwrite=True)))
    assert job.status == "done"
    assert load_membrane(tmp_path / "circle.safetensors").info.concepts == ["a red circle"]


def test_sample_previews_during_training(backend, tmp_path):
    svc = service(backend, tmp_path)
    seen = []
    svc.reporter.update = lambda j, p: seen.append((p.step, p.preview is not None, j.sample_file))
    job = svc.run(svc.create(fast(iterations=4, sample_every=2, preview=False, control_prompts="a dog")))
    assert job.status == "done"
    assert [(s, has) for s, has, _ in seen] == [(1, False), (2, True), (3, False), (4, True)]
    assert seen[1][2] == str(tmp_path / "circle.samples" / "step_000002.png")
    assert job.sample_file == str(tmp_path / "circle.samples" / "step_000004.png")
    from spm.ui import trainer_tab as tt

    assert tt.job_outputs(job)[2].size[0] > 0  # the tab shows the latest grid while training


def test_interrupt_stops_after_the_current_step_and_saves(backend, tmp_path):
    """Interrupt means now: the membrane trained so far is saved at once, without the gate's calibration or the
    before/after render that a finished job pays for (minutes each in a CPU WebUI)."""
    svc = service(backend, tmp_path)
    job = svc.create(fast(iterations=50, control_prompts="a dog"))
    phases: list[str] = []

    class StopAtTwo(jobs.Reporter):
        def phase(self, j):
            phases.append(j.phase)

        def update(self, j, p):
            if p.step == 2:
                svc.interrupt()

    svc.reporter = StopAtTwo()
    svc.run(job)
    assert job.status == "interrupted" and job.step == 2
    assert "interrupted at step 2" in job.message
    assert "gate" not in phases and "check" not in phases and "saving" in phases and job.preview_file is None
    m = load_membrane(tmp_path / "circle.safetensors")
    assert m.info.training["steps_done"] == 2 and m.info.training["interrupted"] is True
    assert "gate" not in (m.info.transport or {})


def test_reporter_can_stop_a_job(backend, tmp_path):
    class Stop(jobs.Reporter):
        def should_stop(self):
            return True

    svc = service(backend, tmp_path, reporter=Stop())
    job = svc.run(svc.create(fast(preview=False)))
    assert job.status == "interrupted" and job.step == 0


def test_no_model_and_unsupported_architecture_fail_with_a_message(tmp_path):
    def none_loaded():
        raise NoModelError("no model is loaded; load a checkpoint first")

    job = TrainService(none_loaded, tmp_path).run(TrainService(none_loaded, tmp_path).create(fast()))
    assert job.status == "failed" and "no model is loaded" in job.error

    job = TrainService(lambda: None, tmp_path).run(TrainService(lambda: None, tmp_path).create(fast()))
    assert job.status == "failed" and "no model is loaded" in job.error

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3)

    fake = type("B", (), {"unet": Conv(), "architecture": "a plain conv net"})()
    svc = TrainService(lambda: fake, tmp_path)
    job = svc.run(svc.create(fast()))
    assert job.status == "failed" and "not supported" in job.error and "plain conv net" in job.error
    assert not (tmp_path / "circle.safetensors").exists()


def test_queue_runs_jobs_in_order_under_the_lock(backend, tmp_path):
    held = []

    class Lock:
        def __init__(self):
            self.inner = threading.Lock()

        def __enter__(self):
            self.inner.acquire()
            held.append("enter")

        def __exit__(self, *exc):
            held.append("exit")
            self.inner.release()

    svc = service(backend, tmp_path, lock=Lock())
    a = svc.submit(fast(name="one", preview=False, iterations=2))
    b = svc.submit(fast(name="two", preview=False, iterations=2))
    assert b.done_event.wait(120) and a.done_event.is_set()
    assert a.status == b.status == "done" and a.finished <= b.started
    assert held == ["enter", "exit", "enter", "exit"]
    assert {m["name"] for m in svc.membranes()} == {"one", "two"}
    assert json.dumps(svc.membranes())  # JSON-serialisable metadata


def test_before_after_off_columns_are_the_plain_model(backend):
    from spm.train.sampling import sample_images
    from tests.helpers import random_membrane

    m = random_membrane(backend.unet, seed=3, std=0.5)
    grid_imgs = {}
    orig = jobs.labelled_grid

    def capture(images, prompts, per_side, min_cell=96):
        grid_imgs["x"] = images
        return orig(images, prompts, per_side, min_cell)

    jobs.labelled_grid = capture
    try:
        jobs.before_after(backend, m, ["a red circle"], seeds=(5,), steps=3)
    finally:
        jobs.labelled_grid = orig
    imgs = grid_imgs["x"]
    assert imgs.shape[0] == 2
    class NoStack:  # nothing attached at all: the bare model
        def set_strengths(self, s):
            pass

    plain = sample_images(backend, NoStack(), backend.encode(["a red circle"]), backend.encode([""]), [0.0], [5], 3)
    assert torch.allclose(imgs[0], plain[0], atol=1e-4)  # without: the model alone (up to batching round-off)
    assert (imgs[1] - plain[0]).abs().max() > 1e-2  # with: the membrane acts
    assert not backend.unet._forward_hooks


def test_loss_plot_draws_the_curve():
    img = jobs.loss_plot([1.0, 0.5, 0.25, 0.2] * 10)
    assert img.size == (480, 200)
    px = img.load()
    blue = sum(1 for x in range(56, 472) for y in range(8, 180) if px[x, y] == (120, 160, 230))
    assert blue > 100
    assert jobs.loss_plot([]).size == (480, 200)


# --- the tab -----------------------------------------------------------------------------------------
def test_tab_builds_and_streams_progress_to_a_saved_file(backend, tmp_path):
    import gradio as gr

    from spm.ui import trainer_tab as tt

    tab = tt.build_trainer_tab(service=service(backend, tmp_path))
    assert isinstance(tab, gr.Blocks)
    svc = tab.spm_service
    values = {**{k: None for k in tt.FORM}, "name": "circle", "target": "a red circle", "preset": "object",
              "iterations": 4, "lr": 1e-4, "la_mode": "adaptive", "la_strength": 1000, "anchors": 1, "resolution": 0,
              "seed": 0, "precision": "fp32", "save_every": 0, "control_prompts": "a blue square",
              "preview_steps": 2, "overwrite": False}
    outs = list(tt.train_stream(svc, *[values[k] for k in tt.FORM], poll_s=0.05))
    progress, plot, image, saved, status = outs[-1]
    assert progress.startswith("step 4/4") and "loss" in progress
    assert saved == str(tmp_path / "circle.safetensors") and "data-status='done'" in status
    assert plot.size == (480, 200) and image.size[0] > 100
    # again with the same name: refused with a message, nothing trained
    outs = list(tt.train_stream(svc, *[values[k] for k in tt.FORM]))
    assert len(outs) == 1 and "already exists" in outs[0][-1]
    # an empty name
    outs = list(tt.train_stream(svc, *[{**values, "name": ""}[k] for k in tt.FORM]))
    assert "name is missing" in outs[0][-1]


def test_tab_webui_mode_runs_in_the_callers_thread_with_its_wrapper(backend, tmp_path):
    import gradio as gr

    from spm.ui import trainer_tab as tt

    wrapped = []

    def wrap(fn, extra_outputs=None):
        wrapped.append(len(extra_outputs))

        def f(*args):
            return fn(*args)

        return f

    tab = tt.build_trainer_tab(service=service(backend, tmp_path), wrap=wrap)
    assert isinstance(tab, gr.Blocks) and wrapped == [4]
    svc = tab.spm_service
    values = {**{k: None for k in tt.FORM}, "name": "sq", "target": "a blue square", "iterations": 2,
              "anchors": 1, "preview_steps": 1, "control_prompts": "", "overwrite": False}
    thread = []
    svc.reporter.begin = lambda job: thread.append(threading.current_thread())
    out = tt.train_blocking(svc, "task(abc)", *[values[k] for k in tt.FORM])
    assert thread == [threading.current_thread()]
    assert out[3] == str(tmp_path / "sq.safetensors")
    assert out[0].startswith("step 2/2")


def test_apply_preset_updates_the_fields():
    from spm.ui import trainer_tab as tt

    ups = tt.apply_preset("style")
    assert [u["value"] for u in ups] == [PRESETS["style"]["iterations"], TrainConfig().lr, "adaptive",
                                         TrainConfig().la_strength, PRESETS["style"]["anchors"]]


# --- the standalone entry ----------------------------------------------------------------------------
def test_standalone_provider_reports_load_errors(tmp_path):
    from spm.ui.__main__ import build_parser, make_provider

    provider = make_provider(str(tmp_path / "missing"))
    with pytest.raises(NoModelError, match="cannot load the model"):
        provider()
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.model is None


def test_gradio_schema_fix_makes_image_api_info_readable():
    import gradio as gr
    from gradio_client import utils as cu

    from spm.ui.__main__ import fix_gradio_schema_bug

    if not gr.__version__.startswith("4."):
        assert fix_gradio_schema_bug() is False  # Gradio 3: nothing to patch
        return
    fix_gradio_schema_bug()
    assert isinstance(cu.json_schema_to_python_type(gr.Image(type="pil").api_info()), str)
    assert fix_gradio_schema_bug() is False  # idempotent: nothing left to fix


# --- the job's phases, its final status, the console ---------------------------------------------------
class Recorder(jobs.Reporter):
    """Every phase report: (phase, done, total, the progress line without ETA)."""

    def __init__(self):
        self.seen: list[tuple] = []

    def phase(self, job):
        self.seen.append((job.phase, job.phase_done, job.phase_total, job.progress_text(eta=False)))


def test_every_phase_is_named_with_its_own_count(backend, tmp_path, monkeypatch):
    from spm.train import synonyms as syn

    monkeypatch.setattr(syn, "BUDGET_SHARE", 1e9)  # a tiny job pays for no model-synonym scan: keep its phase here
    rec, lines = Recorder(), []
    svc = service(backend, tmp_path, reporter=rec, log_line=lines.append)
    job = svc.run(svc.create(fast(control_prompts="a dog")))
    assert job.status == "done", job.error
    order = [p for i, (p, *_) in enumerate(rec.seen) if i == 0 or rec.seen[i - 1][0] != p]
    assert order == ["loading", "calibration", "vocabulary", "probes", "synonyms", "pool", "training", "signal", "gate",
                     "saving", "check"]
    by = {name: [(d, t) for p, d, t, _ in rec.seen if p == name] for name in order}
    # the pool: min(pool_size 2, iterations 3) trajectories filled to k = 1 and 2 of S - 1 = 3: 3 denoising steps
    assert by["pool"][0] == (0, 3) and by["pool"][-1] == (3, 3)
    assert [d for d, _ in by["pool"]] == sorted(d for d, _ in by["pool"])
    assert by["training"] == [(0, 3), (1, 3), (2, 3), (3, 3)]  # the phase (and its ETA clock) starts before step 1
    assert by["check"] == [(0, 2), (1, 2), (2, 2)]  # preview_steps 2
    assert by["synonyms"][-1][0] == by["synonyms"][-1][1] > 0  # counted in words
    assert by["vocabulary"][0] == (0, by["vocabulary"][0][1]) and by["vocabulary"][0][1] > 1000  # the vocabulary first
    texts = {p: t for p, _, _, t in rec.seen}
    assert texts["loading"] == "loading the model" and texts["pool"].startswith("filling the latent pool 3/3")
    assert texts["synonyms"].startswith("finding the words the model draws as the target ")
    assert texts["probes"].startswith("drawing the erasure signal's held-out probes ")
    assert by["probes"][0] == (0, by["probes"][0][1]) and by["probes"][-1][0] == by["probes"][-1][1] > 1
    assert texts["training"].startswith("training step 3/3 · loss") and texts["check"].startswith("before/after check 2/2")
    assert all("ETA" not in t for *_, t in rec.seen)
    assert job.progress_text().startswith("step 3/3 · loss") and job.progress_text().endswith("done")
    assert job.as_dict()["phase"] == "check" and job.as_dict()["progress"] == job.progress_text()
    # the console: start, the phases, every step (3 steps: ~10 lines means all of them), the end
    assert lines[0].startswith("circle: training on a red circle: 3 steps at lr")
    assert any(line.startswith("circle: filling the latent pool") for line in lines)
    steps = [line for line in lines if line.startswith("circle: training step")]
    assert [s.split()[3] for s in steps] == ["1/3", "2/3", "3/3"] and all("ETA" in s for s in steps)
    assert lines[-1].startswith("circle: done after 3/3 steps in ") and str(tmp_path / "circle.safetensors") in lines[-1]
    # where the time went: every phase entered, in order, each closed with its seconds (the sub-second ones too, which
    # a progress poll of the bar may never see), in the API's dict, the console's second-to-last line and the tab
    log = job.as_dict()["phases"]
    assert [e["phase"] for e in log] == order and all(isinstance(e["seconds"], float) and e["seconds"] >= 0 for e in log)
    assert [e["label"] for e in log] == [jobs.PHASES[p] for p in order]
    summary = job.phase_summary()
    assert all(summary.count(jobs.PHASES[p]) == 1 for p in ("loading", "saving", "check")), summary
    assert summary.startswith("loading the model ") and lines[-2] == f"circle: time per phase: {summary}"
    from spm.ui import trainer_tab as tt

    assert "Time per phase: loading the model " in tt.status_html(job)


def test_the_phase_log_sums_revisits_and_closes_the_running_phase(monkeypatch):
    """A phase entered again (the erasure check between training intervals) is one entry per visit and one item of the
    summary; the running phase has no seconds until the job ends; the summary reads seconds, then m:ss."""
    clock = iter([0.0, 0.4, 30.0, 31.5, 100.0, 170.0])
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    job = jobs.TrainJob("x", jobs.parse_request({"name": "x", "target": "circle"}))
    for phase in ("loading", "training", "signal", "training"):
        job.set_phase(phase)
    assert [e["seconds"] for e in job.phases] == [0.4, 29.6, 1.5, None]
    job.end_phase()
    job.end_phase()  # idempotent: the job's end may close it twice
    assert job.phases[-1]["seconds"] == 68.5
    assert job.phase_summary() == "loading the model 0.4 s · training step 1:38 · measuring the erasure 1.5 s"


def test_the_console_gets_about_ten_progress_lines_and_the_error(backend, tmp_path, capsys):
    svc = service(backend, tmp_path)  # the default: print with an "SPM:" prefix
    job = svc.run(svc.create(fast(iterations=13, preview=False)))
    assert job.status == "done"
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("SPM: circle: training step")]
    assert [s.split()[4] for s in steps] == [f"{k}/13" for k in (2, 4, 6, 8, 10, 12, 13)]  # every ceil(13/10)
    assert out[0].startswith("SPM: circle: training on") and out[-1].startswith("SPM: circle: done after 13/13")

    def broken():
        raise NoModelError("no model is loaded; load a checkpoint first")

    svc = TrainService(broken, tmp_path)
    job = svc.run(svc.create(fast(name="other")))
    assert job.status == "failed"
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "SPM: other: failed (loading the model): no model is loaded; load a checkpoint first"
    # it ended in its first phase: no "time per phase" line in the console or the tab
    assert not any("time per phase" in line for line in out)
    from spm.ui import trainer_tab as tt

    assert "Time per phase" not in tt.status_html(job) and "no model is loaded" in tt.status_html(job)


def test_the_final_status_waits_for_the_reporter_and_the_lock(backend, tmp_path):
    """Whoever polls the job sees "done" only after the reporter ended (the WebUI's state is reset) and the lock
    is released.  ``end`` blocks here until the test has looked, so the order is checked, not timed."""
    entered, release, seen = threading.Event(), threading.Event(), {}

    class SlowEnd(jobs.Reporter):
        def end(self, job):
            entered.set()
            assert release.wait(120), "deadlock guard: the test never released end()"

    class Lock:
        def __init__(self):
            self.inner = threading.Lock()

        def __enter__(self):
            self.inner.acquire()

        def __exit__(self, *exc):
            seen["status at release"] = seen["job"].status
            self.inner.release()

    svc = service(backend, tmp_path, reporter=SlowEnd(), lock=Lock())
    job = seen["job"] = svc.submit(fast(preview=False, iterations=1))
    assert entered.wait(120), "the job never reached the reporter's end"
    assert job.outcome == "done" and job.status == "running" and not job.done_event.is_set()
    assert job.as_dict()["status"] == "running"
    release.set()
    assert job.done_event.wait(120), "deadlock guard: the job never finished"
    assert job.status == "done" and seen["status at release"] == "running"


def test_the_erasure_verdict_is_shown_when_the_trainer_gives_one(backend, tmp_path, monkeypatch):
    from spm.train import loop
    from spm.ui import trainer_tab as tt

    orig = loop.Trainer.train

    def train(self):
        result = orig(self)
        result.erasure = {"erased": False, "signal": 0.4, "threshold": 0.1, "message": "train longer"}
        return result

    monkeypatch.setattr(loop.Trainer, "train", train)
    svc = service(backend, tmp_path)
    job = svc.run(svc.create(fast(preview=False)))
    assert job.status == "done" and job.erasure["erased"] is False
    assert job.message.endswith("; not erased (signal 0.4, threshold 0.1): train longer")
    assert job.as_dict()["erasure"] == job.erasure
    assert "not erased (signal 0.4, threshold 0.1): train longer" in tt.status_html(job)
    assert jobs.erasure_text({"erased": True, "signal": 0.01, "threshold": 0.1, "message": ""}) == \
        "erased (signal 0.01, threshold 0.1)"
    assert jobs.erasure_text(None) == ""
    # the trainer's own message opens with the verdict: the job's text says it once (real Forge: "not erased (…):
    # not erased: with the membrane …")
    assert jobs.erasure_text({"erased": False, "signal": 0.464, "threshold": 1.0,
                              "message": "not erased: with the membrane the target's prediction closes only 46%"}) == \
        "not erased (signal 0.464, threshold 1): with the membrane the target's prediction closes only 46%"
    assert jobs.erasure_text({"erased": True, "signal": 1.2, "threshold": 1.0, "message": "erased: closes 120%"}) == \
        "erased (signal 1.2, threshold 1): closes 120%"
    # stopped before any check (an Interrupt before step 1): no verdict and no "signal nan", only why
    assert jobs.erasure_text({"erased": False, "signal": float("nan"), "threshold": 1.0,
                              "message": "not measured: training stopped"}) == "not measured: training stopped"


def test_check_steps_follow_the_training_cost():
    lo, hi = jobs.CHECK_STEPS
    result = type("R", (), {})()
    result.cost = {"ufe": 10}
    assert jobs.check_steps(result, prompts=3) == lo  # a tiny job: the shortest check
    result.cost = {"ufe": 10 ** 6}
    assert jobs.check_steps(result, prompts=3) == hi
    result.cost = {"ufe": 4 * 3 * 15}
    assert jobs.check_steps(result, prompts=3) == 15  # as many rows as the training used
    assert parse_request(fast(preview_steps=0)).preview_steps == 0


# --- the folder: steps done, the state file, permissions ------------------------------------------------
def test_an_interrupted_job_records_the_steps_it_did(backend, tmp_path):
    from spm.library import Library

    class Stop(jobs.Reporter):
        def should_stop(self):
            return True

    svc = service(backend, tmp_path, reporter=Stop())
    job = svc.run(svc.create(fast(iterations=4, preview=False)))
    assert job.status == "interrupted" and job.step == 0
    m = load_membrane(tmp_path / "circle.safetensors")
    assert m.info.training["steps_done"] == 0 and m.info.training["iterations"] == 4
    (entry,) = Library(tmp_path).refresh()
    assert entry.steps == 0 and "4 steps" not in json.dumps(entry.as_dict())
    assert (tmp_path / "circle.safetensors.trainstate").exists()  # an interrupted run can be resumed


def test_a_finished_job_leaves_no_state_file_unless_asked(backend, tmp_path):
    svc = service(backend, tmp_path)
    assert svc.run(svc.create(fast(preview=False, save_every=1))).status == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circle.safetensors"]
    assert svc.run(svc.create(fast(name="kept", preview=False, keep_state=True))).status == "done"
    assert (tmp_path / "kept.safetensors.trainstate").exists()


def test_files_get_the_users_permissions(backend, tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        svc = service(backend, tmp_path)
        job = svc.run(svc.create(fast(iterations=2, sample_every=2, control_prompts="a dog", keep_state=True)))
        assert job.status == "done"
        for f in ("circle.safetensors", "circle.preview.png", "circle.safetensors.trainstate",
                  "circle.samples/step_000002.png"):
            assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o640, f
        os.chmod(tmp_path / "circle.safetensors", 0o644)  # a file the user changed keeps its mode when replaced
        assert svc.run(svc.create(fast(iterations=1, preview=False, overwrite=True))).status == "done"
        assert stat.S_IMODE((tmp_path / "circle.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


# --- the tab: where things are drawn, a new start, a failure ---------------------------------------------
def _children(block):
    return list(getattr(block, "children", []) or [])


def test_the_live_preview_box_holds_the_loss_plot(backend, tmp_path):
    from spm.ui import trainer_tab as tt

    tab = tt.build_trainer_tab(service=service(backend, tmp_path), wrap=lambda fn, extra_outputs=None: fn)
    blocks = tab.blocks.values() if isinstance(tab.blocks, dict) else tab.blocks
    live = [b for b in blocks if getattr(b, "elem_id", None) == f"{tt.PREFIX}_live"]
    assert len(live) == 1
    inside = [getattr(c, "elem_id", None) for c in _children(live[0])]
    assert inside == [f"{tt.PREFIX}_loss"]  # the WebUI's live preview (the loss plot) lands in "Loss"
    assert f"{tt.PREFIX}_status" in tt.START_JS and "display = 'none'" in tt.START_JS  # the old message goes
    assert f"{tt.PREFIX}_progress" in tt.START_JS and "box.value = 'starting" in tt.START_JS  # and the old progress


def test_a_new_start_clears_the_old_run_and_a_failure_says_failed(backend, tmp_path):
    from spm.ui import trainer_tab as tt

    svc = service(backend, tmp_path)
    values = {**{k: None for k in tt.FORM}, "name": "", "target": "a red circle", "iterations": 2, "anchors": 1,
              "preview_steps": 1, "control_prompts": "a dog", "overwrite": False}
    (bad,) = tt.train_stream(svc, *[values[k] for k in tt.FORM])
    assert bad[0] == "not started" and bad[1] is None and bad[3] == "" and "name is missing" in bad[-1]
    outs = list(tt.train_stream(svc, *[{**values, "name": "ok"}[k] for k in tt.FORM], poll_s=0.05))
    first = outs[0]
    assert first[1] is None and first[2] is None and first[3] == ""  # the old plot, image and file are gone
    assert "error" not in first[-1]  # and so is the old message
    assert outs[-1][0].startswith("step 2/2") and "data-status='done'" in outs[-1][-1]

    def broken():
        raise NoModelError("no model is loaded; load a checkpoint first")

    svc2 = TrainService(broken, tmp_path)
    out = tt.train_blocking(svc2, "task(x)", *[{**values, "name": "late"}[k] for k in tt.FORM])
    assert out[0] == "failed (loading the model)" and "no model is loaded" in out[-1]


def test_interrupt_during_the_gate_calibration_skips_it_and_the_check(backend, tmp_path):
    """The gate calibration (minutes on a CPU WebUI) is counted in prompts and Interrupt is polled there: the trained
    membrane is saved without its gate (calibrated on first use, if ever), and no before/after check follows."""
    svc = service(backend, tmp_path)
    job = svc.create(fast(control_prompts="a dog"))
    seen: list[tuple[str, int, int]] = []

    class StopInGate(jobs.Reporter):
        def phase(self, j):
            seen.append((j.phase, j.phase_done, j.phase_total))
            if j.phase == "gate" and j.phase_done > 0:
                svc.interrupt()

    svc.reporter = StopInGate()
    svc.run(job)
    gate = [(d, t) for p, d, t in seen if p == "gate"]
    assert gate and gate[0] == (0, gate[0][1]) and 0 < gate[-1][0] < gate[-1][1]  # counted, stopped part-way
    assert "check" not in [p for p, *_ in seen] and job.preview_file is None
    m = load_membrane(tmp_path / "circle.safetensors")
    assert m.info.training["steps_done"] == 3 and "gate" not in (m.info.transport or {})
    assert "response" not in (m.info.transport or {}) and "response" not in [p for p, *_ in seen]
    assert job.outcome == "done" and ("(Interrupt skipped the membrane gate's calibration, the response gate's "
                                      "calibration and the before/after check)") in job.message
