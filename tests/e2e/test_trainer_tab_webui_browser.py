"""The trainer tab in WebUI mode, in headless Chromium: the Train button's ``js`` (``START_JS``) and where the
WebUI's live preview lands.

The WebUI's own browser side is stood in for by a few lines of script injected before the page loads:
``gradioApp()``, ``randomId()`` and ``requestProgress(id, container, gallery, …)``, which does what A1111's
``javascript/progressbar.js`` does with the live preview (a ``div.livePreview`` inserted as the gallery's
first child) and records its arguments; the WebUI's ``.livePreview`` rule (an absolute overlay) and the
extension's ``style.css`` are added to the page as the WebUI injects them.  The job's model provider blocks on an event, so the page is checked *while* the job runs.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tests.e2e.test_trainer_tab_browser import ARGS, CHROMIUM, field, free_port, playwright_api, toy_or_tiny_backend

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

WEBUI_JS = """
window.gradioApp = () => document;
window.randomId = () => "task(spm-test)";
window.spmProgressCalls = [];
window.requestProgress = function(id, container, gallery, atEnd) {
    window.spmProgressCalls.push([id, container && container.id, gallery && gallery.id]);
    var live = document.createElement('div');  // what progressbar.js does with res.live_preview
    live.className = 'livePreview';
    live.id = 'spm_test_live_preview';
    gallery.insertBefore(live, gallery.firstElementChild);
};
"""

# A1111 1.10's style.css for the live preview: an overlay filling its positioned ancestor
WEBUI_CSS = ".livePreview { position: absolute; z-index: 300; width: 100%; height: 100%; }"


@pytest.fixture
def served(tmp_path):
    from spm.train.jobs import TrainService
    from spm.ui.__main__ import fix_gradio_schema_bug
    from spm.ui.trainer_tab import build_trainer_tab

    fix_gradio_schema_bug()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    backend, _ = toy_or_tiny_backend()
    gate = threading.Event()

    def provider():
        assert gate.wait(300), "deadlock guard: the test never released the model"
        return backend

    svc = TrainService(provider, tmp_path, config_overrides={"max_denoising_steps": 4, "pool_size": 2})

    def wrap(fn, extra_outputs=None):  # wrap_gradio_gpu_call without the WebUI state: the caller's thread runs it
        return fn

    tab = build_trainer_tab(service=svc, wrap=wrap, controls=["a blue square"])
    tab.queue()
    port = free_port()
    tab.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, inbrowser=False,
               quiet=True, show_api=False)
    try:
        yield f"http://127.0.0.1:{port}/", tmp_path, gate
    finally:
        gate.set()
        tab.close()
        torch.set_num_threads(n)


def box(page, selector: str) -> dict:
    b = page.locator(selector).first.bounding_box()
    assert b is not None, f"{selector} is not laid out"
    return b


def test_webui_start_clears_the_old_message_and_the_live_preview_covers_the_loss_box(served):
    url, folder, gate = served
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.add_init_script(WEBUI_JS)
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#spm_train_train", timeout=60_000)
            page.add_style_tag(content=WEBUI_CSS)
            page.add_style_tag(path=str(ROOT / "style.css"))
            # a refused start leaves its message under the bar ...
            gate.set()
            field(page, "spm_train_name").fill("webui_circle")
            page.click("#spm_train_train")
            page.wait_for_selector("#spm_train_status .spm-error", timeout=60_000)
            assert "target is missing" in page.inner_text("#spm_train_status")
            # ... which a new start hides at once, while the job is still running
            gate.clear()
            field(page, "spm_train_target").fill("a red circle")
            field(page, "spm_train_iterations").fill("2")
            field(page, "spm_train_anchors").fill("1")
            page.click("#spm_train_train")
            page.wait_for_function("() => window.spmProgressCalls.length === 2", timeout=60_000)
            assert page.evaluate("window.spmProgressCalls[1]") == ["task(spm-test)", "spm_train_status", "spm_train_live"]
            assert page.locator("#spm_train_status .spm-error").first.is_hidden()
            # the WebUI's live preview (the loss plot) covers the "Loss" box, not the before/after image
            live, loss, grid = box(page, "#spm_test_live_preview"), box(page, "#spm_train_loss"), \
                box(page, "#spm_train_preview")
            assert abs(live["x"] - loss["x"]) <= 2 and abs(live["width"] - loss["width"]) <= 2
            assert live["y"] <= loss["y"] + 1 and live["y"] + live["height"] >= loss["y"] + loss["height"] - 1
            assert live["y"] + live["height"] <= grid["y"] + 1  # the before/after slot stays free
            gate.set()
            page.wait_for_selector("#spm_train_status [data-status='done']", timeout=300_000)
            assert field(page, "spm_train_progress").input_value().startswith("step 2/2")
            assert (folder / "webui_circle.safetensors").exists()
        finally:
            browser.close()
