"""The training API (spm/webui/train_api.py) with FastAPI's TestClient, standalone and inside the stand-in WebUI."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from spm.train.jobs import TrainService
from tests import webui_stub as stub
from tests import webui_stub_train as tstub
from tests.test_trainer_tab import FAST_CFG, tiny_backend

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def backend():
    return tiny_backend()


def client_for(service):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from spm.webui.train_api import add_routes

    app = FastAPI()
    add_routes(app, service)
    return TestClient(app)


def wait(client, service, job_id, guard_s=300.0):
    """The job's final state through the route, after waiting on the job's own event (``guard_s`` only turns
    a deadlock into a failure)."""
    job = service.get(job_id)
    assert job is not None and job.done_event.wait(guard_s), f"job {job_id} did not finish (deadlock?)"
    r = client.get(f"/spm/v1/train/{job_id}")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] in ("done", "failed", "interrupted"), body
    return body


FAST = {"name": "circle", "target": "a red circle", "iterations": 3, "anchors": 1, "preview_steps": 2,
        "control_prompts": "a blue square"}


@pytest.mark.parametrize("body, status, fragment", [
    ({"name": "x"}, 400, "target is missing"),
    ({"name": "x", "target": ""}, 400, "target is missing"),
    ({"target": "cat"}, 400, "name is missing"),
    ({"name": "x", "target": "cat", "iterations": -1}, 400, "iterations must be at least 1"),
    ({"name": "sub/x", "target": "cat"}, 400, "path separator"),
    ({"name": "..\\x", "target": "cat"}, 400, "path separator"),
    ({"name": "x", "target": "cat", "precision": "fp8"}, 400, "precision"),
    (["not", "an", "object"], 400, "JSON object"),
])
def test_bad_requests_get_4xx_with_a_message(tmp_path, body, status, fragment):
    def never():
        raise AssertionError("validation must fail before the model is touched")

    client = client_for(TrainService(never, tmp_path))
    r = client.post("/spm/v1/train", json=body)
    assert r.status_code == status
    assert fragment in r.json()["detail"]


def test_non_json_body_and_unknown_id(tmp_path):
    client = client_for(TrainService(lambda: None, tmp_path))
    r = client.post("/spm/v1/train", content=b"name=x", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = client.get("/spm/v1/train/nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_train_poll_and_list(backend, tmp_path):
    svc = TrainService(lambda: backend, tmp_path, config_overrides=FAST_CFG)
    client = client_for(svc)
    r = client.post("/spm/v1/train", json=FAST)
    assert r.status_code == 200
    job_id = r.json()["id"]
    body = wait(client, svc, job_id)
    assert body["status"] == "done", body
    assert body["step"] == 3 and body["total"] == 3 and isinstance(body["loss"], float)
    assert body["output"] == str(tmp_path / "circle.safetensors") and body["error"] is None
    assert body["preview"] == str(tmp_path / "circle.preview.png") and Path(body["preview"]).exists()
    r = client.get("/spm/v1/membranes")
    assert r.status_code == 200
    listed = {m["name"]: m for m in r.json()["membranes"]}
    assert listed["circle"]["concepts"] == ["a red circle"] and listed["circle"]["modules"] > 0
    # the same name again: refused, nothing queued
    r = client.post("/spm/v1/train", json=FAST)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = client.post("/spm/v1/train", json={**FAST, "overwrite": True, "preview": False, "iterations": 1})
    assert wait(client, svc, r.json()["id"])["status"] == "done"


def test_failed_job_reports_its_error(tmp_path):
    from spm.train.jobs import NoModelError

    def none_loaded():
        raise NoModelError("no Stable Diffusion model is loaded")

    svc = TrainService(none_loaded, tmp_path)
    client = client_for(svc)
    body = wait(client, svc, client.post("/spm/v1/train", json=FAST).json()["id"])
    assert body["status"] == "failed" and "no Stable Diffusion model is loaded" in body["error"]


# --- inside the (stand-in) WebUI ---------------------------------------------------------------------
@pytest.fixture
def webui(tmp_path, tokenizer, text_encoder):
    from tests.test_webui_lifecycle import tiny_unet

    env = tstub.install(tmp_path)
    env.shared.sd_model = tstub.A1111Model(tiny_unet(), stub.HijackedCLIP(tokenizer, text_encoder))
    from spm.webui import state, train_api

    state.reset()
    train_api.reset_service()
    runpy.run_path(str(ROOT / "scripts" / "spm_trainer.py"))
    train_api.webui_service().config_overrides = dict(FAST_CFG)
    yield env
    train_api.reset_service()
    state.reset()
    tstub.uninstall()


def test_webui_routes_take_the_queue_lock_and_report_in_shared_state(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from spm.webui import state, train_api

    app = FastAPI()
    stub.fire("app_started", None, app)
    client = TestClient(app)
    lock = webui.call_queue.queue_lock
    lock.acquire()  # a generation is running
    try:
        r = client.post("/spm/v1/train", json={**FAST, "resolution": 16})
        assert r.status_code == 200
        job_id = r.json()["id"]
        assert lock.wait_for_waiters(1), "the job never queued at the WebUI's lock"
        assert client.get(f"/spm/v1/train/{job_id}").json()["status"] == "queued"
    finally:
        lock.release()
    body = wait(client, train_api.webui_service(), job_id)
    assert body["status"] == "done", body
    folder = Path(webui.shared.cmd_opts.spm_dir)
    assert body["output"] == str(folder / "circle.safetensors")
    assert ("begin", "spm-train") in webui.shared.state.log and webui.shared.state.job_count == 0
    assert webui.shared.state.current_image is not None  # the loss plot went to the live preview
    assert "circle" in state.library().names()  # the generation panel's list knows it without a restart
    listed = client.get("/spm/v1/membranes").json()
    assert listed["folder"] == str(folder) and [m["name"] for m in listed["membranes"]] == ["circle"]


def test_webui_status_says_done_only_after_the_webui_state_ended(webui):
    """``shared.state.end()`` blocks here until the test has polled the route: the job must still read
    "running" (the WebUI's counters are not reset yet), and "done" only after ``end`` and the lock."""
    import threading

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from spm.webui import train_api

    app = FastAPI()
    stub.fire("app_started", None, app)
    client = TestClient(app)
    st, lock = webui.shared.state, webui.call_queue.queue_lock
    in_end, release = threading.Event(), threading.Event()
    real_end = st.end

    def end():
        in_end.set()
        assert release.wait(120), "deadlock guard: the test never released state.end()"
        real_end()

    st.end = end
    job_id = client.post("/spm/v1/train", json={**FAST, "resolution": 16, "preview": False}).json()["id"]
    assert in_end.wait(300), "the job never ended the WebUI state"
    assert client.get(f"/spm/v1/train/{job_id}").json()["status"] == "running" and st.job == "SPM training"
    release.set()
    body = wait(client, train_api.webui_service(), job_id)
    assert body["status"] == "done" and st.job == "" and st.job_count == 0 and not lock.locked()


def test_webui_bar_counts_each_phase_and_shows_one_eta(webui, monkeypatch):
    """The WebUI's bar (``modules/progress.py``) takes its fraction from ``job_no / job_count`` and its ETA
    from the time since ``time_start``: each phase sets them to its own count and start, and ``textinfo``
    names the phase without an ETA of ours (the bar shows the WebUI's)."""
    from spm.train import synonyms as syn

    monkeypatch.setattr(syn, "BUDGET_SHARE", 1e9)  # a tiny job pays for no model-synonym scan: keep its phase here
    from spm.webui import train_api

    svc = train_api.webui_service()
    st = webui.shared.state
    real, seen, last = svc.reporter.phase, [], {"phase": None}

    def phase(job):
        changed = job.phase != last["phase"]
        last["phase"] = job.phase
        before = st.time_start = -1.0 if changed else st.time_start
        real(job)
        assert (st.time_start > 0) if changed else (st.time_start == before), (job.phase, changed)
        fraction, eta = tstub.progress_and_eta(st)
        seen.append((job.phase, job.phase_done, job.phase_total, fraction, eta, st.textinfo, st.job_count))

    svc.reporter.phase = phase
    job = svc.run(svc.create({**FAST, "resolution": 16}))
    assert job.status == "done", job.error
    phases = [p for i, (p, *_) in enumerate(seen) if i == 0 or seen[i - 1][0] != p]
    assert phases == ["loading", "calibration", "vocabulary", "probes", "synonyms", "pool", "training", "signal", "gate",
                      "saving", "check"]
    for name, done, total, fraction, eta, text, job_count in seen:
        # a phase without a real count (0 or one piece of work) sets no job count: /sdapi/v1/progress, which
        # divides by 0.01 + job_no / job_count, would otherwise predict ~99× the elapsed time
        # and neither does a counted phase at 0/N (the same 99×), until its first piece of work is done
        assert job_count == (total if total > 1 and done > 0 else 0), (name, done, total, job_count)
        assert fraction == (done / total if total > 1 else 0.0), (name, done, total, fraction)
        assert (eta is None) == (fraction == 0)
        assert text.startswith("SPM circle: ") and "ETA" not in text
    assert [s[:3] for s in seen if s[0] == "training"] == [("training", k, 3) for k in range(4)]
    probes = [s[:3] for s in seen if s[0] == "probes"]  # the erasure signal's probes: counted in denoising steps
    done = [d for _, d, _ in probes]  # with context prompts (the default) their pair check counts several at a time
    assert done[0] == 0 and done[-1] == probes[-1][2] > 1 and done == sorted(set(done))
    assert ("check", 1, 2) in [s[:3] for s in seen]
    assert [s[5] for s in seen if s[:3] == ("training", 2, 3)][0].startswith("SPM circle: training step 2/3 · loss")


def test_webui_tab_runs_under_wrap_gradio_gpu_call(webui):
    import gradio as gr

    from spm.ui import trainer_tab as tt

    tabs = [t for cb in stub.callback_map["ui_tabs"] for t in cb()]
    assert [(type(b).__name__, title, eid) for b, title, eid in tabs] == [("Blocks", "SPM Trainer", "spm_trainer")]
    blocks = tabs[0][0]
    assert isinstance(blocks, gr.Blocks)
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns  # Gradio 4 | 3
    train_fn = [f for f in fns if len(f.inputs) == 1 + len(tt.FORM)]
    assert len(train_fn) == 1
    values = {**{k: None for k in tt.FORM}, "name": "circle", "target": "a red circle", "iterations": 2,
              "anchors": 1, "resolution": 16, "preview_steps": 1, "control_prompts": "a dog", "overwrite": False}
    out = train_fn[0].fn("task(t1)", *[values[k] for k in tt.FORM])
    progress, plot, image, saved, status = out
    assert progress.startswith("step 2/2")
    assert plot is not None and image is not None  # the loss plot for "Loss", the grid for "Before / after"
    assert saved.endswith("circle.safetensors") and Path(saved).exists()
    assert "data-status='done'" in status and "Time taken" in status  # the wrapper's stats on the last output
    assert tstub.progress_state.finished_tasks == ["task(t1)"] and ("begin", "task(t1)") in webui.shared.state.log
    assert not webui.call_queue.queue_lock.locked()
    # a model error is a message in the tab, not a crash
    webui.shared.sd_model = None
    out = train_fn[0].fn("task(t2)", *[{**values, "name": "other"}[k] for k in tt.FORM])
    assert "no Stable Diffusion model is loaded" in out[-1]


def test_webui_interrupt_button_stops_training(webui):
    from spm.webui import train_api

    svc = train_api.webui_service()
    job = svc.create({**FAST, "iterations": 50, "resolution": 16, "preview": False})
    orig = svc.reporter.update

    def update(j, p):
        orig(j, p)
        if p.step == 2:
            webui.shared.state.interrupt()  # what the WebUI's Interrupt button does

    svc.reporter.update = update
    svc.run(job)
    assert job.status == "interrupted" and job.step == 2


def test_trainer_script_imports_our_package_under_a_unique_name_when_spm_clashes(tmp_path):
    import sys
    import types

    from fastapi import FastAPI

    foreign = types.ModuleType("spm")
    foreign.__file__ = str(tmp_path / "elsewhere" / "spm" / "__init__.py")
    tstub.install(tmp_path)
    saved = {k: v for k, v in sys.modules.items() if k == "spm" or k.startswith("spm.")}
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules["spm"] = foreign
        runpy.run_path(str(ROOT / "scripts" / "spm_trainer.py"))
        assert sys.modules["spm"] is foreign
        app = FastAPI()
        stub.fire("app_started", None, app)
        paths = {r.path for r in app.routes}
        assert {"/spm/v1/train", "/spm/v1/train/{job_id}", "/spm/v1/membranes"} <= paths
        (cb,) = stub.callback_map["app_started"]
        assert cb.__module__ == "sd_webui_spm_ext.webui.train_api"
    finally:
        mod = sys.modules.get("sd_webui_spm_ext.webui.train_api")
        if mod is not None:
            mod.reset_service()
        for k in [k for k in sys.modules if k == "spm" or k.startswith(("spm.", "sd_webui_spm_ext"))]:
            del sys.modules[k]
        sys.modules.update(saved)
        tstub.uninstall()
