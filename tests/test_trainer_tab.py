"""The trainer job service (spm/train/jobs.py) and handlers (spm/ui/trainer_tab.py) on a tiny random SD1 pipeline."""

from __future__ import annotations

import functools
import json
import threading

import pytest
import torch

from spm.checkpoint import load_membrane
from spm.train.config import PRESETS, TrainConfig
from spm.train import jobs
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
    svc = service(backend, tmp_path)
    job = svc.create(fast(iterations=50, preview=False))

    class StopAtTwo(jobs.Reporter):
        def update(self, j, p):
            if p.step == 2:
                svc.interrupt()

    svc.reporter = StopAtTwo()
    svc.run(job)
    assert job.status == "interrupted" and job.step == 2
    assert "interrupted at step 2" in job.message
    m = load_membrane(tmp_path / "circle.safetensors")
    assert m.info.training["steps_done"] == 2 and m.info.training["interrupted"] is True


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
