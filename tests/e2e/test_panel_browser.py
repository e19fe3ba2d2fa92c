"""The SPM panel, the SPM cards and ``javascript/spm.js`` in headless Chromium (Playwright + Debian's chromium).

The page is built as A1111 1.10 / Forge build theirs: txt2img inside its own ``gr.Blocks`` (the prompt box, the
panel from ``SpmScript.ui``, the Extra Networks cards of ``tests/webui_stub.create_ui``), rendered into the page's
top-level tabs; the extension's routes are added on ``app_started`` after launch; the JS and CSS are injected the
way ``modules/ui_gradio_extensions.py`` does it (a patched template response, ``file=`` URLs).  A small stand-in
for the WebUI's ``script.js`` helpers (``gradioApp``, ``onUiLoaded``, ``onAfterUiUpdate``, ``onUiTabChange``,
``opts``, ``updateInput``, ``cardClicked``) is injected before it; ``?nohost`` leaves it out.

Runs on the installed Gradio (4.40 as in Forge; 3.41 as in A1111 from a venv, see the README, "Tests").
Needs ``pip install playwright`` and ``apt-get install -y chromium``; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import runpy
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SPM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "javascript" / "spm.js"
CSS = ROOT / "style.css"

pytestmark = pytest.mark.slow

gr = pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python package)")
if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

# What the WebUI's script.js / ui.js / extraNetworks.js provide to extensions, reduced to their behaviour.
HOST_JS = """
(function() {
    if (location.search.indexOf("nohost") >= 0) return;
    window.gradioApp = function() {
        var elem = document.getElementsByTagName("gradio-app")[0] || document;
        if (elem !== document) elem.getElementById = function(id) { return document.getElementById(id); };
        return elem.shadowRoot ? elem.shadowRoot : elem;
    };
    var loaded = [], after = [], tabChange = [], timer = null, done = false, tab = null;
    function run(list) { list.forEach(function(f) { try { f(); } catch (e) { console.error(e); } }); }
    window.onUiLoaded = function(f) { loaded.push(f); };
    window.onAfterUiUpdate = function(f) { after.push(f); };
    window.onUiTabChange = function(f) { tabChange.push(f); };
    window.opts = {spm_default_weight: 1.0, extra_networks_add_text_separator: " "};
    window.updateInput = function(target) {
        var e = new Event("input", {bubbles: true});
        Object.defineProperty(e, "target", {value: target});
        target.dispatchEvent(e);
    };
    window.cardClicked = function(tabname, textToAdd) {
        var area = gradioApp().querySelector("#" + tabname + "_prompt textarea");
        area.value = area.value + opts.extra_networks_add_text_separator + textToAdd;
        updateInput(area);
    };
    document.addEventListener("DOMContentLoaded", function() {
        new MutationObserver(function() {
            if (!done && gradioApp().querySelector("#txt2img_prompt")) { done = true; run(loaded); }
            clearTimeout(timer);
            timer = setTimeout(function() { run(after); }, 200);
            var current = gradioApp().querySelector("#tabs > .tab-nav > button.selected");
            if (current && current !== tab) { tab = current; run(tabChange); }
        }).observe(gradioApp(), {childList: true, subtree: true});
    });
})();
"""

PANEL = "#script_txt2img_spm_concept_erasing_spm_"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def webpath(path: Path) -> str:
    return f"file={path}?{os.path.getmtime(path)}"


@pytest.fixture
def served(tmp_path):
    from spm.checkpoint import save_membrane
    from spm.webui import state
    from tests import webui_stub as stub
    from tests.test_library import tiny

    env = stub.install(tmp_path)
    folder = Path(env.shared.cmd_opts.spm_dir)
    (folder / "styles").mkdir(parents=True)
    save_membrane(tiny(concepts=("alpha",)), folder / "alpha.safetensors")
    save_membrane(tiny(concepts=("beta",)), folder / "styles" / "beta.safetensors")
    state.reset()
    ns = runpy.run_path(str(ROOT / "scripts" / "spm_membranes.py"))
    stub.fire("before_ui")
    stub.fire("ui_settings")
    script = ns["SpmScript"]()
    script.is_img2img = False

    with gr.Blocks(analytics_enabled=False) as txt2img_interface:
        prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3)
        seen = gr.Textbox(label="What the server saw", elem_id="seen")
        echo = gr.Button("echo", elem_id="echo")
        echo.click(fn=lambda text: text, inputs=[prompt], outputs=[seen])
        script.ui(False)
        with gr.Tabs(elem_id="txt2img_extra_tabs"):
            with gr.Tab("Generation"):
                gr.Markdown("generation")
            stub.create_ui(txt2img_interface, [], "txt2img")
    with gr.Blocks(analytics_enabled=False) as other:
        gr.Markdown("another tab")
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img_interface.render()
            with gr.TabItem("Other", id="other", elem_id="tab_other"):
                other.render()

    head = f'<script type="text/javascript">{HOST_JS}</script>\n<script type="text/javascript" src="{webpath(JS)}"></script>\n'
    tail = f'<link rel="stylesheet" property="stylesheet" href="{webpath(CSS)}">'
    original = gr.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode("utf8"))
        res.body = res.body.replace(b"</body>", f"{tail}</body>".encode("utf8"))
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response
    demo.queue()
    port = free_port()
    try:
        app, _, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False,
                                inbrowser=False, quiet=True, show_api=False, allowed_paths=[str(JS), str(CSS)])
        stub.fire("app_started", demo, app)
        yield f"http://127.0.0.1:{port}/", folder
    finally:
        demo.close()
        gr.routes.templates.TemplateResponse = original
        state.reset()
        stub.uninstall()


def panel_has(page, name: str, timeout=60_000):
    page.wait_for_function(
        "([sel, name]) => Array.from(document.querySelectorAll(sel + ' label')).some(l => l.textContent.trim() === name)",
        arg=[PANEL + "membranes", name], timeout=timeout)


def card(name: str) -> str:
    return f"#txt2img_spm_cards_html .card[data-name='{name}']"


def prompt_value(page) -> str:
    return page.locator("#txt2img_prompt textarea").input_value()


def type_at_end(page, typed: str):
    page.locator("#txt2img_prompt textarea").focus()
    page.keyboard.press("Control+End")
    page.keyboard.type(typed)


def complete(page, typed: str, pick: str):
    type_at_end(page, typed)
    page.wait_for_selector(f"#spm_complete .spm-complete-item[data-name='{pick}']", state="visible", timeout=30_000)
    for _ in range(page.locator("#spm_complete .spm-complete-item").count()):
        if page.locator("#spm_complete .spm-complete-item.selected").get_attribute("data-name") == pick:
            break
        page.keyboard.press("ArrowDown")
    assert page.locator("#spm_complete .spm-complete-item.selected").get_attribute("data-name") == pick
    page.keyboard.press("Enter")
    page.wait_for_selector("#spm_complete", state="hidden", timeout=30_000)


def test_panel_cards_and_completion_in_the_browser(served):
    url, folder = served
    from spm.checkpoint import save_membrane
    from tests.test_library import tiny

    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    args=ARGS)
        errors: list[str] = []
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#txt2img_prompt textarea", timeout=60_000)
            panel_has(page, "styles/beta")
            # tooltips on the panel's controls
            page.wait_for_function("(sel) => (document.querySelector(sel) || {}).title?.includes('name:weight')",
                                   arg=PANEL + "weights", timeout=30_000)
            for suffix in ("membranes", "refresh", "metric", "factor"):
                assert page.locator(PANEL + suffix).get_attribute("title"), suffix
            # <spm: completion writes the weight with its decimal point, and Gradio sees the new value
            complete(page, "a photo <spm:be", "styles/beta")
            assert prompt_value(page) == "a photo <spm:styles/beta:1.0>"
            page.click("#echo")
            page.wait_for_function("() => document.querySelector('#seen textarea').value.endsWith(':1.0>')", timeout=30_000)
            # Escape closes the list and leaves the text alone
            type_at_end(page, " <spm:al")
            page.wait_for_selector("#spm_complete .spm-complete-item[data-name='alpha']", state="visible", timeout=30_000)
            page.keyboard.press("Escape")
            page.wait_for_selector("#spm_complete", state="hidden", timeout=30_000)
            assert prompt_value(page).endswith("<spm:al")
            # a card inserts <spm:NAME:1.0>
            page.wait_for_selector(card("alpha"), state="attached", timeout=60_000)
            page.locator("#txt2img_prompt textarea").fill("a photo")
            page.locator(card("alpha")).evaluate("el => el.click()")
            page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<spm:')",
                                   timeout=30_000)
            assert prompt_value(page) == "a photo <spm:alpha:1.0>"

            # "Why these strengths?": an empty box explains the main prompt (the JS passes it at the click); the
            # stub has no model loaded, so the server answers with the message that names what to do
            if not page.locator(PANEL + "explain").is_visible():
                page.locator(PANEL + "accordion").locator(".label-wrap").first.click()
                page.locator(PANEL + "explain_accordion").locator(".label-wrap").first.click()
            page.locator("#txt2img_prompt textarea").fill("a photo <spm:alpha:1.0>")
            page.locator(PANEL + "explain").click()
            page.wait_for_function("(sel) => (document.querySelector(sel + ' textarea') || {}).value?.includes('No model')",
                                   arg=PANEL + "explain_out", timeout=30_000)
            page.locator(PANEL + "explain_prompt textarea").fill("")
            page.locator("#txt2img_prompt textarea").fill("a photo")
            page.locator(PANEL + "explain").click()
            page.wait_for_function("(sel) => (document.querySelector(sel + ' textarea') || {}).value?.includes('No membrane')",
                                   arg=PANEL + "explain_out", timeout=30_000)
            # a membrane trained while the server runs: a new page lists it in the panel and on the cards
            save_membrane(tiny(concepts=("gamma",)), folder / "gamma.safetensors")
            page.reload(wait_until="domcontentloaded")
            panel_has(page, "gamma")
            page.wait_for_selector(card("gamma"), state="attached", timeout=60_000)
            # ... and an open page picks one up when the window gets the focus back
            save_membrane(tiny(concepts=("delta",)), folder / "delta.safetensors")
            page.evaluate("() => window.dispatchEvent(new Event('focus'))")
            panel_has(page, "delta")
            page.wait_for_selector(card("delta"), state="attached", timeout=60_000)
            assert page.locator(card("alpha")).count() == 1
            # ... and when the user comes back to txt2img from another tab (e.g. the SPM Trainer, after a run)
            page.locator("#tabs > .tab-nav > button", has_text="Other").click()
            page.wait_for_selector("#tab_other", state="visible", timeout=30_000)
            save_membrane(tiny(concepts=("zeta",)), folder / "zeta.safetensors")
            page.locator("#tabs > .tab-nav > button", has_text="txt2img").click()
            panel_has(page, "zeta")
            page.wait_for_selector(card("zeta"), state="attached", timeout=60_000)

            # no route (an older extension version, a proxy): the JS cannot tell what changed, so the panel's
            # own page-load rescan is what lists a new file; completion uses the panel's names; no errors
            page.route("**/spm/v1/names", lambda route: route.fulfill(status=404, body="not found"))
            save_membrane(tiny(concepts=("epsilon",)), folder / "epsilon.safetensors")
            page.reload(wait_until="domcontentloaded")
            panel_has(page, "epsilon")
            page.locator("#txt2img_prompt textarea").fill("")
            complete(page, "<spm:eps", "epsilon")
            assert prompt_value(page) == "<spm:epsilon:1.0>"
            page.unroute("**/spm/v1/names")

            # no WebUI helpers on the page: the script watches the page itself
            page.goto(url + "?nohost=1", wait_until="domcontentloaded")
            panel_has(page, "delta")
            page.wait_for_function("(sel) => !!(document.querySelector(sel) || {}).title", arg=PANEL + "metric",
                                   timeout=30_000)
            page.locator("#txt2img_prompt textarea").fill("x ")
            complete(page, "<spm:delt", "delta")
            assert prompt_value(page) == "x <spm:delta:1.0>"
        finally:
            browser.close()
    assert errors == []


def test_the_script_is_harmless_on_a_page_without_the_panel(tmp_path):
    """Another tab, an old page, a WebUI with the extension's scripts disabled: the JS loads without errors."""
    with gr.Blocks(analytics_enabled=False) as demo:
        gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=2)
    head = f'<script type="text/javascript" src="{webpath(JS)}"></script>\n'
    original = gr.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode("utf8"))
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response
    port = free_port()
    try:
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, inbrowser=False,
                    quiet=True, show_api=False, allowed_paths=[str(JS)])
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"), args=ARGS)
            errors: list[str] = []
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.wait_for_function("() => !!window.spmWebui", timeout=60_000)
                page.wait_for_selector("#txt2img_prompt textarea", timeout=60_000)
                page.locator("#txt2img_prompt textarea").click()
                page.keyboard.type("<spm:x")
                # the route answers 404 here (no extension routes): the names request settles, nothing is listed
                assert page.evaluate("() => window.spmWebui.sync().then(() => window.spmWebui.names())") is None
                assert page.locator("#spm_complete .spm-complete-item").count() == 0
                assert page.locator("#txt2img_prompt textarea").input_value() == "<spm:x"
            finally:
                browser.close()
    finally:
        demo.close()
        gr.routes.templates.TemplateResponse = original
    assert errors == []
