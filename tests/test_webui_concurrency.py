"""Generation requests that arrive at the same time, as the WebUI's API and UI issue them (issue #7).

What the hosts do (read from their source; ``tests/webui_stub.py`` mirrors the generation itself):

* **A1111 1.10** ``modules/api/api.py``: ``text2imgapi``/``img2imgapi`` build ``p`` (the ``alwayson_scripts``
  args go into ``p.script_args`` by script title) and run ``process_images(p)`` inside
  ``with self.queue_lock:``, the ``modules.call_queue.queue_lock`` that ``webui.py`` hands to ``Api``.  The
  UI's Generate button runs through ``call_queue.wrap_gradio_gpu_call``, which takes the same lock.  FastAPI
  runs these sync endpoints on its thread pool: requests arrive on different threads and queue on the lock.
* **Forge**: the same lock around the API's ``process_images``; the UI handler, called with the lock held by
  its Gradio thread, hands the work to ``modules_forge.main_thread`` (one worker thread) and waits for it.

So no two generations overlap in either host.  SPM keeps each generation's settings on ``p``
(``p._spm_state``: panel, tags, plan) but the :class:`~spm.attach.MembraneStack` on the shared UNet is one
per process and is reconfigured per batch, so SPM relies on that lock.  Without it, requests would see each
other's membranes (and the WebUI's own conditioning cache and ``shared.state`` would race too); nothing in
SPM claims otherwise, so no test here runs generations without the lock.

Every test compares each request's images with the same request run alone (``torch.equal``), checks which
membranes were active during each request's UNet calls, and that no hook is left on the UNet.
"""

from __future__ import annotations

import base64
import queue
import threading

import pytest
import torch

from tests import webui_stub as stub
from tests.test_webui_lifecycle import World, hooked_modules
from tests.webui_stub_train import WatchedLock

pytestmark = pytest.mark.usefixtures("one_thread")

OFF = [False, [], "", "off", 1.0]  # the script's defaults, in API order
# three requests at once: panel membrane "a" (token transport), a tag for "b" on one prompt only, and no SPM
REQUESTS = {
    "A": dict(prompt=["a photo of a cat", "a red car"], negative="blurry", args=[True, ["a"], "a:0.9", "tokenuni", 1.5]),
    "B": dict(prompt=["a dog in snow <spm:b:0.7>", "a house"], negative="", args=OFF),
    "C": dict(prompt=["a tree", "a boat"], negative="ugly", args=OFF, img2img=True),  # /sdapi/v1/img2img
}
MEMBRANES = {"A": {"a"}, "B": {"b"}, "C": set()}
INFOTEXT = {"A": "a:0.9", "B": "b:0.7", "C": None}


class Recorder:
    """A forward hook on the UNet: which membranes had a non-zero strength in each call, per request."""

    def __init__(self, world: World):
        self.world = world
        self.local = threading.local()
        self.active: dict[str, list[set[str]]] = {}
        self.handle = world.unet.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        name = getattr(self.local, "request", None)
        att = self.world.state.runtime().attachment
        used: set[str] = set()
        if att is not None and att.stack._slots and att.stack.current_strengths is not None:
            s = att.stack.current_strengths
            used = {n for j, n in enumerate(att.stack.names) if bool((s[:, j] != 0).any())}
        self.active.setdefault(name, []).append(used)

    def close(self):
        self.handle.remove()


def make_p(world: World, spec: dict):
    kw = dict(sd_model=world.model, prompt=list(spec["prompt"]), negative_prompt=spec["negative"],
              batch_size=len(spec["prompt"]), steps=3, seed=11, script_args=list(spec["args"]))
    if spec.get("img2img"):
        init = torch.randn(len(spec["prompt"]), 4, 4, 4, generator=torch.Generator().manual_seed(5))
        p = stub.StableDiffusionProcessingImg2Img(init_latent=init, **kw)
    else:
        p = stub.StableDiffusionProcessing(**kw)
    p.scripts = stub.ScriptRunner([world.script])
    p.is_api = True
    return p


def generate(world: World, spec: dict, recorder: Recorder | None = None, name: str | None = None):
    if recorder is not None:
        recorder.local.request = name
    return stub.process_images(make_p(world, spec), forge=world.forge)


def solo_runs(world: World, order=("C", "A", "B")) -> dict:
    """Each request alone, one after the other; C (no SPM) first, before SPM ever attached anything."""
    return {k: generate(world, REQUESTS[k]) for k in order}


def check(world: World, results: dict, solo: dict, recorder: Recorder, errors: list) -> None:
    assert errors == [] and stub.errors_reported == []
    for k, out in results.items():
        assert len(out.images) == len(solo[k].images) == 2
        for got, want in zip(out.images, solo[k].images):
            assert torch.equal(got, want), f"request {k}: images differ from the same request run alone"
        assert out.infotexts[0].get("SPM") == INFOTEXT[k], (k, out.infotexts[0])
        calls = recorder.active.get(k)
        assert calls, f"request {k}: no UNet call recorded"
        assert all(used == MEMBRANES[k] for used in calls), (k, calls)  # nothing of another request
    assert [n for n in hooked_modules(world.unet) if n] == [] and not world.unet._forward_pre_hooks  # only the Recorder's hook
    att = world.state.runtime().attachment
    assert att is not None and att.stack._slots == [] and att.stack._pre_hook is None


@pytest.fixture(params=["a1111", "forge"])
def world(request, tmp_path, tokenizer, text_encoder):
    w = World(tmp_path, tokenizer, text_encoder, forge=request.param == "forge")
    w.add_membrane("a", concepts=("cat",), seed=1)
    w.add_membrane("b", concepts=("dog",), seed=2)
    yield w
    w.close()


def run_queued(world: World, order: list[str], lock, recorder: Recorder, ui: str | None = None):
    """Every request on its own thread through ``lock`` (as ``text2imgapi`` does).  The main thread holds the
    lock until every thread is blocked on it, so they really arrive together.  ``ui``: that
    request comes through the UI instead (A1111: ``wrap_gradio_gpu_call``, i.e. the same lock; Forge: the lock
    held by the Gradio thread while ``modules_forge.main_thread`` runs it)."""
    results, errors = {}, []
    ready = threading.Barrier(len(order) + 1)
    main_thread = ForgeMainThread() if (ui is not None and world.forge) else None

    def api(name):
        try:
            ready.wait()
            with lock:
                results[name] = generate(world, REQUESTS[name], recorder, name)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append((name, repr(e)))

    def gradio(name):
        try:
            ready.wait()
            with lock:
                if main_thread is None:
                    results[name] = generate(world, REQUESTS[name], recorder, name)
                else:
                    results[name] = main_thread.run_and_wait_result(generate, world, REQUESTS[name], recorder, name)
        except Exception as e:  # noqa: BLE001
            errors.append((name, repr(e)))

    threads = [threading.Thread(target=gradio if n == ui else api, args=(n,)) for n in order]
    with lock:
        for t in threads:
            t.start()
        ready.wait()
        assert lock.wait_for_waiters(len(threads)), "deadlock guard: not every request reached the lock"
    for t in threads:
        t.join(120)
    if main_thread is not None:
        main_thread.stop()
    assert not any(t.is_alive() for t in threads)
    return results, errors


class ForgeMainThread:
    """``modules_forge.main_thread``: one worker thread runs the UI's generations; the caller waits."""

    def __init__(self):
        self.tasks: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            task = self.tasks.get()
            if task is None:
                return
            func, args, box, done = task
            try:
                box["result"] = func(*args)
            except Exception as e:  # Forge keeps the exception (Task.work) and the caller gets None
                box["error"] = e
            done.set()

    def run_and_wait_result(self, func, *args):
        box, done = {}, threading.Event()
        self.tasks.put((func, args, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def stop(self):
        self.tasks.put(None)
        self.thread.join(10)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order, ui", [(["A", "B", "C"], None), (["C", "B", "A"], "B")])
def test_concurrent_requests_under_the_queue_lock_match_solo_runs(world, order, ui):
    solo = solo_runs(world)
    recorder = Recorder(world)
    try:
        lock = WatchedLock()  # modules.call_queue.queue_lock
        for _ in range(2):  # and again, with everything SPM recorded from the first round still in place
            recorder.active.clear()
            results, errors = run_queued(world, order, lock, recorder, ui)
            check(world, results, solo, recorder, errors)
    finally:
        recorder.close()


def test_a_failing_request_leaks_nothing_into_the_next(world):
    """A generation that raises mid-sampling (out of memory, A1111's NaN check) never reaches the script's
    ``postprocess``: its membranes stay on the UNet until the next generation configures its own before its
    first UNet call.  The next requests, with and without SPM, are unaffected."""
    solo = solo_runs(world)
    recorder = Recorder(world)
    calls = {"n": 0}

    def oom(module, args, kwargs):
        if getattr(recorder.local, "request", None) == "A":
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("CUDA out of memory (simulated)")

    h = world.unet.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        lock = WatchedLock()
        results, errors = run_queued(world, ["A", "C", "B"], lock, recorder)
        assert [e[0] for e in errors] == ["A"] and "out of memory" in errors[0][1]
        assert "A" not in results and stub.errors_reported == []
        # B and C ran before or after A (the lock decides); either way bit-identical to running alone
        for k in ("B", "C"):
            assert all(torch.equal(a, b) for a, b in zip(results[k].images, solo[k].images)), k
            assert all(used == MEMBRANES[k] for used in recorder.active[k]), (k, recorder.active[k])
        # A failing last leaves its membranes attached (the WebUI gives scripts no hook on failure) ...
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="out of memory"):
            generate(world, REQUESTS["A"], recorder, "A")
        assert world.state.runtime().attachment.stack.names == ["a"]
        # ... and the next request, even one without SPM, runs without them
        recorder.active.clear()
        out = generate(world, REQUESTS["C"], recorder, "C")
        assert all(torch.equal(a, b) for a, b in zip(out.images, solo["C"].images))
        assert recorder.active["C"] and all(used == set() for used in recorder.active["C"])
        assert world.state.runtime().attachment.stack.names == []
    finally:
        h.remove()
        recorder.close()


def test_training_after_a_failed_generation_starts_from_the_clean_unet(tmp_path, tokenizer, text_encoder):
    """Training runs under the same queue lock but outside ``process_images``: the membranes a failed
    generation left on the UNet must not be part of the model it trains against."""
    from tests import webui_stub_train as tstub

    w = World(tmp_path, tokenizer, text_encoder)
    try:
        w.add_membrane("a", concepts=("cat",), seed=1)
        w.model = tstub.A1111Model(w.unet, w.model.cond_stage_model)
        w.env.shared.sd_model = w.model
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        ctx = w.model.get_learned_conditioning(["a photo of a cat"])
        with torch.no_grad():
            clean = w.unet(x, t, context=ctx)

        def fail(module, args, kwargs):
            raise RuntimeError("A tensor with all NaNs was produced in Unet (simulated)")

        h = w.unet.register_forward_pre_hook(fail, with_kwargs=True)
        with pytest.raises(RuntimeError, match="NaNs"):
            generate(w, dict(prompt=["a photo of a cat"], negative="", args=[True, ["a"], "a:1", "off", 1.0]))
        h.remove()
        assert w.state.runtime().attachment.stack.names == ["a"]  # left behind by the failed generation
        from spm.webui.train_api import webui_backend

        backend = webui_backend()
        assert hooked_modules(w.unet) == []
        with torch.no_grad():
            assert torch.equal(backend.unet(x, t, context=ctx), clean)
    finally:
        w.close()


# --- through an HTTP API (FastAPI TestClient) ---------------------------------------------------------
def api_app(world: World, lock, recorder: Recorder, arrived: threading.Semaphore):
    """The part of A1111's ``/sdapi/v1/txt2img`` and ``img2img`` that matters here: the script's defaults,
    overwritten by ``alwayson_scripts[title]["args"]`` (titles compared lower-case), then ``process_images``
    under the queue lock.  Images come back as base64 of the raw float32 latents, to be compared exactly.
    ``arrived`` is released by each request about to wait for the lock."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI()
    script = world.script

    def run(req: dict, img2img: bool):
        args = list(OFF)
        for title, spec in (req.get("alwayson_scripts") or {}).items():
            if title.lower() != script.title().lower():
                raise HTTPException(status_code=422, detail=f"always on script {title} not found")
            for i, v in enumerate(list(spec.get("args", []))[:len(args)]):
                args[i] = v
        spec = dict(prompt=req["prompt"], negative=req.get("negative_prompt", ""), args=args, img2img=img2img)
        arrived.release()
        with lock:
            out = generate(world, spec, recorder, req.get("request"))
        return {"images": [base64.b64encode(im.contiguous().numpy().tobytes()).decode() for im in out.images],
                "info": out.infotexts[0]}

    @app.post("/sdapi/v1/txt2img")
    def txt2img(req: dict):
        return run(req, False)

    @app.post("/sdapi/v1/img2img")
    def img2img(req: dict):
        return run(req, True)

    return app


def test_concurrent_http_requests(tmp_path, tokenizer, text_encoder):
    from fastapi.testclient import TestClient

    w = World(tmp_path, tokenizer, text_encoder)
    try:
        w.add_membrane("a", concepts=("cat",), seed=1)
        w.add_membrane("b", concepts=("dog",), seed=2)
        solo = solo_runs(w)
        recorder = Recorder(w)
        lock = WatchedLock()
        arrived = threading.Semaphore(0)
        client = TestClient(api_app(w, lock, recorder, arrived))
        bodies = {k: {"prompt": REQUESTS[k]["prompt"], "negative_prompt": REQUESTS[k]["negative"], "request": k,
                      **({"alwayson_scripts": {"spm concept erasing": {"args": REQUESTS[k]["args"]}}} if k != "C" else {})}
                  for k in REQUESTS}
        responses, errors = {}, []
        ready = threading.Barrier(len(bodies) + 1)

        def post(k):
            try:
                ready.wait()
                route = "img2img" if REQUESTS[k].get("img2img") else "txt2img"
                responses[k] = client.post(f"/sdapi/v1/{route}", json=bodies[k])
            except Exception as e:  # noqa: BLE001
                errors.append((k, repr(e)))

        threads = [threading.Thread(target=post, args=(k,)) for k in bodies]
        with lock:  # a generation is running: all three requests queue behind it
            for t in threads:
                t.start()
            ready.wait()
            assert all(arrived.acquire(timeout=120) for _ in threads)  # all three are in the API (deadlock guard)
            assert lock.wait_for_waiters(len(threads)), "deadlock guard: not every request reached the lock"
        for t in threads:
            t.join(120)
        assert errors == [] and stub.errors_reported == []
        for k, r in responses.items():
            assert r.status_code == 200, r.text
            body = r.json()
            for b64, want in zip(body["images"], solo[k].images):
                got = torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.float32).reshape(want.shape)
                assert torch.equal(got, want), k
            assert body["info"].get("SPM") == INFOTEXT[k]
            assert all(used == MEMBRANES[k] for used in recorder.active[k]), (k, recorder.active[k])
        assert len(responses) == 3
        recorder.close()
        assert hooked_modules(w.unet) == []
        r = client.post("/sdapi/v1/txt2img", json={**bodies["A"], "alwayson_scripts": {"no such script": {"args": []}}})
        assert r.status_code == 422 and "no such script" in r.json()["detail"]
    finally:
        w.close()
