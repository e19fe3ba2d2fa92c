"""The standalone trainer tab driven in headless Chromium (Playwright + Debian's chromium).

Serves :func:`spm.ui.trainer_tab.build_trainer_tab` on 127.0.0.1 with the toy model (spm/toy/assets)
or, when those are absent, a tiny random SD1 pipeline; fills in the form like a user, trains a few steps,
and checks the progress, the status message, the saved file and the before/after image.

Needs ``pip install playwright`` (the Python package only; its browser download is not used) and
``apt-get install -y chromium``.  Skipped with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

CHROMIUM = os.environ.get("SPM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python package)")
if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_or_tiny_backend():
    from spm.hosts.diffusers import DiffusersBackend

    try:
        from spm.toy.model import load_toy_pipeline

        return DiffusersBackend(load_toy_pipeline("base")), "toy"
    except (ImportError, FileNotFoundError, OSError):
        from tests.test_trainer_tab import tiny_backend

        return tiny_backend(), "tiny"


@pytest.fixture
def served(tmp_path):
    from spm.train.jobs import TrainService
    from spm.ui.__main__ import fix_gradio_schema_bug
    from spm.ui.trainer_tab import build_trainer_tab

    fix_gradio_schema_bug()  # what `python -m spm.ui` does (gradio 4.40 + pydantic >= 2.11)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    backend, kind = toy_or_tiny_backend()
    svc = TrainService(lambda: backend, tmp_path, config_overrides={"max_denoising_steps": 4, "pool_size": 2})
    tab = build_trainer_tab(service=svc, controls=["a blue square", "a green triangle"])
    tab.queue()
    port = free_port()
    tab.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, inbrowser=False,
               quiet=True, show_api=False)
    try:
        yield f"http://127.0.0.1:{port}/", tmp_path, kind
    finally:
        tab.close()
        torch.set_num_threads(n)


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_train_in_the_browser(served):
    url, folder, kind = served
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#spm_train_train", timeout=60_000)
            # a missing target is refused with a message, nothing is saved
            field(page, "spm_train_name").fill("browser_circle")
            page.click("#spm_train_train")
            page.wait_for_selector("#spm_train_status .spm-error", timeout=30_000)
            assert "target is missing" in page.inner_text("#spm_train_status")
            assert not (folder / "browser_circle.safetensors").exists()
            # a real run
            field(page, "spm_train_target").fill("a red circle")
            field(page, "spm_train_iterations").fill("4")
            field(page, "spm_train_anchors").fill("1")
            page.click("#spm_train_train")
            page.wait_for_selector("#spm_train_status [data-status='done']", timeout=120_000)
            status = page.inner_text("#spm_train_status")
            out = folder / "browser_circle.safetensors"
            assert str(out) in status and "before/after" in status
            assert field(page, "spm_train_progress").input_value().startswith("step 4/4")
            assert field(page, "spm_train_file").input_value() == str(out)
            assert page.locator("#spm_train_loss img").count() == 1
            assert page.locator("#spm_train_preview img").count() == 1
            assert out.exists() and (folder / "browser_circle.preview.png").exists()
            from spm.checkpoint import load_membrane

            m = load_membrane(out)
            assert m.info.concepts == ["a red circle"] and m.info.training["steps_done"] == 4
            # the same name again without "Overwrite": refused
            page.click("#spm_train_train")
            page.wait_for_function(
                "() => document.querySelector('#spm_train_status').innerText.includes('already exists')",
                timeout=30_000)
        finally:
            browser.close()
    assert kind in ("toy", "tiny")
