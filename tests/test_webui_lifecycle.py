"""The WebUI glue driven through the A1111 1.10 / Forge lifecycle (tests/webui_stub.py) on a real LDM UNet.

Every test runs generations through the stand-in ``process_images`` (before_process → process →
before_process_batch → extra networks → process_batch → conditioning → process_before_every_sampling →
CFG-denoiser UNet calls → hires pass → postprocess) and compares latents with ``torch.equal``.
"""

from __future__ import annotations

import html
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spm.checkpoint import save_membrane
from tests import webui_stub as stub
from tests.helpers import random_membrane

ROOT = Path(__file__).resolve().parents[1]
TINY_LDM = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True, transformer_depth=1,
                context_dim=32, use_checkpoint=False, legacy=False)


def tiny_unet(seed=0):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**TINY_LDM).eval()
    with torch.no_grad():  # LDM zero-initialises proj_out and the output conv; a trained UNet has no zeros
        for prm in unet.parameters():
            if not prm.any():
                prm.normal_(0, 0.05)
    return unet


class World:
    """A stub WebUI with the extension loaded from ``scripts/spm_membranes.py``."""

    def __init__(self, tmp_path, tokenizer, text_encoder, forge=False, sdxl=False):
        self.forge = forge
        self.env = stub.install(tmp_path, forge=forge)
        self.folder = Path(self.env.shared.cmd_opts.spm_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.unet = tiny_unet()
        clip = stub.HijackedCLIP(tokenizer, text_encoder)
        if forge:
            stub.forgeify(self.unet)
            self.model = stub.ForgeDiffusionEngine(self.unet, clip)
        else:
            self.model = stub.LatentDiffusion(self.unet, clip, sdxl=sdxl)
        self.env.shared.sd_model = self.model
        from spm.webui import state

        state.reset()
        self.state = state
        ns = runpy.run_path(str(ROOT / "scripts" / "spm_membranes.py"))
        self.script = ns["SpmScript"]()
        self.script.is_img2img = False
        self.script.controls = [None] * 5  # the five ui() components, in API order
        stub.fire("before_ui")
        stub.fire("ui_settings")

    def add_membrane(self, name, concepts=("cat",), seed=1):
        path = self.folder / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_membrane(random_membrane(self.unet, name=name, concepts=concepts, seed=seed, std=0.3), path)
        self.state.library().refresh()

    def run(self, prompt, negative="", args=(False, [], "", "off", 1.0), **kw):
        p = stub.StableDiffusionProcessing(sd_model=self.model, prompt=prompt, negative_prompt=negative,
                                           script_args=list(args), **kw)
        p.scripts = stub.ScriptRunner([self.script])
        self.strengths = []
        att = self.state.runtime().attachment

        def capture(module, args_, kwargs_, output):  # after the call: the strengths it used
            a = self.state.runtime().attachment
            s = a.stack.current_strengths if a is not None and a.stack._slots else None
            self.strengths.append(None if s is None else s.clone())

        h = self.unet.register_forward_hook(capture, with_kwargs=True)
        try:
            out = stub.process_images(p, forge=self.forge)
        finally:
            h.remove()
        assert stub.errors_reported == [], stub.errors_reported
        del att
        self.p = p
        return out

    def close(self):
        self.state.reset()
        stub.uninstall()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def world(tmp_path, tokenizer, text_encoder):
    w = World(tmp_path, tokenizer, text_encoder)
    yield w
    w.close()


def hooked_modules(unet):
    return [n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ------------------------------------------------------------------------------------------------
def test_tags_apply_to_their_own_prompt_only(world):
    world.add_membrane("cat")
    prompts = ["a photo of a cat", "a red car"]
    base = world.run(prompts, batch_size=2)
    out = world.run(["a photo of a cat <spm:cat:1.0>", "a red car"], batch_size=2)
    assert not torch.equal(out.images[0], base.images[0])
    assert torch.equal(out.images[1], base.images[1])  # the other prompt's image is bit-identical
    # rows: [cond img0, cond img1, uncond img0, uncond img1]; a tag never acts on negative rows
    s = world.strengths[0]
    assert s.shape == (4, 1) and s[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out.infotexts[0]["SPM"] == "cat:1.0" and out.infotexts[0]["SPM transport"] == "off x1.0"
    # the WebUI alone would have applied the first prompt's tags to the whole batch; ours follow each prompt
    world.run(["a red car", "a photo of a cat <spm:cat:0.5>"], batch_size=2)
    assert world.strengths[0][:, 0].tolist() == [0.0, 0.5, 0.0, 0.0]
    assert hooked_modules(world.unet) == []  # postprocess removed every hook


def test_panel_with_token_transport(world):
    world.add_membrane("cat", concepts=("cat",))
    prompts = ["a photo of a cat", "a red car"]
    base = world.run(prompts, negative="blurry", batch_size=2)
    out = world.run(prompts, negative="blurry", batch_size=2, args=(True, ["cat"], "cat:0.8", "tokenuni", 1.5))
    s = world.strengths[0][:, 0]
    assert s.tolist() == pytest.approx([0.8 * 1.5, 0.0, 0.0, 0.0])  # only rows whose tokens hold "cat"
    assert not torch.equal(out.images[0], base.images[0])
    assert torch.equal(out.images[1], base.images[1])
    assert out.infotexts[0]["SPM"] == "cat:0.8" and out.infotexts[0]["SPM transport"] == "tokenuni x1.5"


def test_panel_and_tags_combine(world):
    """Panel m:0.5 for every row; a tag overrides it for its own prompt; negative rows keep the panel weight."""
    world.add_membrane("m")
    world.add_membrane("n", seed=2)
    world.run(["a cat <spm:m:1.0> <spm:n:0.25>", "a car"], negative="ugly", batch_size=2,
              args=(True, ["m"], "m:0.5", "off", 1.0))
    s = world.strengths[0]  # columns: m, n (tag-only)
    assert s[:, 0].tolist() == [1.0, 0.5, 0.5, 0.5]
    assert s[:, 1].tolist() == [0.25, 0.0, 0.0, 0.0]
    assert world.p.extra_generation_params["SPM"] == "m:0.5, n:0.25"


def test_img2img(world):
    world.add_membrane("m")
    init = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))

    def run(prompts):
        p = stub.StableDiffusionProcessingImg2Img(sd_model=world.model, prompt=prompts, batch_size=2, init_latent=init,
                                                  script_args=[False, [], "", "off", 1.0])
        p.scripts = stub.ScriptRunner([world.script])
        return stub.process_images(p)

    base = run(["a cat", "a car"])
    out = run(["a cat <spm:m>", "a car"])
    assert stub.errors_reported == []
    assert not torch.equal(out.images[0], base.images[0]) and torch.equal(out.images[1], base.images[1])
    assert out.infotexts[0]["SPM"] == "m:1.0"


def test_and_and_prompt_editing_rows(world):
    world.add_membrane("m")
    prompt0 = "a [dog:cat:1] on grass AND a tree:0.5 <spm:m:0.7>"
    world.run([prompt0, "a house"], batch_size=2, steps=3)
    # rows per call: img0 part0, img0 part1, img1, uncond0, uncond1 — at every step, whichever edit text is active
    assert len(world.strengths) == 3
    for s in world.strengths:
        assert s[:, 0].tolist() == pytest.approx([0.7, 0.7, 0.0, 0.0, 0.0])
    texts = {t for t, _ in world.state.runtime().attachment.transport.texts._items}
    assert {"a dog on grass", "a cat on grass", " a tree"} <= texts, texts


def test_chunked_unet_calls(world):
    world.add_membrane("m")
    long_negative = ", ".join(["blurry ugly"] * 60)  # > 75 tokens: 154-token rows, A1111 calls cond and uncond apart
    base = world.run(["a cat", "a car"], negative=long_negative, batch_size=2, steps=1)
    out = world.run(["a cat <spm:m>", "a car"], negative=long_negative, batch_size=2, steps=1)
    assert [tuple(s.shape) for s in world.strengths] == [(2, 1), (2, 1)]
    assert world.strengths[0][:, 0].tolist() == [1.0, 0.0] and world.strengths[1][:, 0].tolist() == [0.0, 0.0]
    assert torch.equal(out.images[1], base.images[1]) and not torch.equal(out.images[0], base.images[0])
    out = world.run(["a cat <spm:m>", "a car"], batch_size=2, steps=1, batch_cond_uncond=False)
    assert [s[:, 0].tolist() for s in world.strengths] == [[1.0, 0.0], [0.0, 0.0]]


def test_mixed_prompt_lengths_in_one_batch(world):
    """A1111 pads the short prompt's rows to the long one's length (stack_conds); its tag still applies."""
    world.add_membrane("m")
    long_prompt = "a cat, " + ", ".join(["oil painting"] * 40) + " <spm:m:0.3>"
    world.run([long_prompt, "a dog <spm:m:0.9>"], batch_size=2, steps=1)
    assert world.p.unet_calls[0].shape[1] == 154  # cond rows: 154 tokens, the short one padded; uncond apart
    assert world.strengths[0][:, 0].tolist() == pytest.approx([0.3, 0.9])
    assert world.strengths[1][:, 0].tolist() == [0.0, 0.0]


def test_hires_pass_uses_hires_prompts(world):
    world.add_membrane("m")
    world.run(["a cat <spm:m:1.0>"], enable_hr=True, hr_prompt="a cat, detailed <spm:m:0.5>", steps=1, hr_second_pass_steps=1)
    first, hires = world.strengths
    assert first[:, 0].tolist() == [1.0, 0.0] and hires[:, 0].tolist() == [0.5, 0.0]


def test_detach_restores_bit_identical_outputs(world):
    world.add_membrane("m")
    base = world.run(["a cat", "a car"], negative="ugly", batch_size=2)
    world.run(["a cat <spm:m>", "a car"], negative="ugly", batch_size=2, args=(True, ["m"], "m:1", "clipcos", 1.0))
    after = world.run(["a cat", "a car"], negative="ugly", batch_size=2, args=(False, ["m"], "m:1", "clipcos", 1.0))
    for a, b in zip(base.images, after.images):
        assert torch.equal(a, b)
    assert "SPM" not in after.infotexts[0]
    stub.fire("script_unloaded")  # Reload UI
    assert hooked_modules(world.unet) == []
    assert "get_learned_conditioning" not in world.model.__dict__


def test_cached_conditionings_after_reload_ui(world):
    """A1111 reuses conditionings across generations (and Reload UI); rows the recorder never saw are
    encoded again by SPM, so tags still reach their own prompt's rows."""
    world.add_membrane("m")
    prompts = ["a cat <spm:m:0.8>", "a car"]
    world.run(prompts, batch_size=2)
    stub.fire("script_unloaded")  # Reload UI: hooks and recorder gone, registry cleared
    assert "get_learned_conditioning" not in world.model.__dict__
    stub.callback_map.clear()
    world.script = runpy.run_path(str(ROOT / "scripts" / "spm_membranes.py"))["SpmScript"]()
    world.script.controls = [None] * 5
    calls = []
    orig = type(world.model).get_learned_conditioning
    world.model.__class__ = type("Counting", (type(world.model),), {
        "get_learned_conditioning": lambda self, c: calls.append(list(c)) or orig(self, c)})
    world.run(prompts, batch_size=2)
    assert world.strengths[0][:, 0].tolist() == pytest.approx([0.8, 0.0, 0.0, 0.0])
    assert ["a cat "] in calls or ["a cat"] in calls  # SPM re-encoded the cached prompt itself


def test_vae_change_keeps_recordings(world):
    world.add_membrane("m")
    world.run(["a cat <spm:m>"])
    att = world.state.runtime().attachment
    stub.fire("model_loaded", world.model)  # same model object: e.g. a VAE change
    assert world.state.runtime().attachment is att and hooked_modules(world.unet) == []


def test_model_switch_detaches_the_old_model(world, tokenizer, text_encoder):
    world.add_membrane("m")
    world.run(["a cat <spm:m>"])
    old_model, old_unet = world.model, world.unet
    assert "get_learned_conditioning" in old_model.__dict__  # the recorder
    new_unet = tiny_unet(seed=3)
    new_model = stub.LatentDiffusion(new_unet, stub.HijackedCLIP(tokenizer, text_encoder))
    stub.fire("model_loaded", new_model)
    assert hooked_modules(old_unet) == [] and "get_learned_conditioning" not in old_model.__dict__
    world.model, world.unet = new_model, new_unet
    world.env.shared.sd_model = new_model
    base = world.run(["a car"])
    out = world.run(["a car <spm:m>"])
    assert not torch.equal(out.images[0], base.images[0])
    assert world.state.runtime().attachment.unet is new_unet


def test_unknown_and_malformed_tags_warn_and_continue(world):
    world.add_membrane("m")
    base = world.run(["a cat"])
    out = world.run(["a cat <spm:nope> <spm:m:abc> <spm:../../etc>"])
    assert torch.equal(out.images[0], base.images[0])
    comments = "\n".join(world.p.comments)
    assert "no membrane named 'nope'" in comments
    assert "not a number" in comments and "'..'" in comments
    assert "SPM" not in out.infotexts[0]


def test_incompatible_membrane_warns(world, tmp_path):
    from spm.membrane import Membrane, MembraneInfo, MembraneLayer

    layers = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": MembraneLayer("linear", 768, 320)}
    save_membrane(Membrane(layers, MembraneInfo(["x"], architecture="sd1", context_dim=768), "sd1"), world.folder / "sd1.safetensors")
    base = world.run(["a cat"])
    out = world.run(["a cat <spm:sd1>"])
    assert torch.equal(out.images[0], base.images[0])
    assert any("not applied" in c and "SD1.x" in c for c in world.p.comments)


def test_xyz_axes_and_api_args(world):
    world.add_membrane("m")
    axes = {o.label: o for o in world.env.xyz.axis_options}
    assert {"[SPM] weight", "[SPM] facilitate factor"} <= set(axes)
    stub.fire("before_ui")  # registering twice adds nothing
    assert sum(o.label == "[SPM] weight" for o in world.env.xyz.axis_options) == 1
    base = world.run(["a cat"])
    p = stub.StableDiffusionProcessing(sd_model=world.model, prompt="a cat <spm:m:1>",
                                       script_args=[True, "m", "m:1.0", "off", 1.0])
    axes["[SPM] weight"].apply(p, 0.0, [0.0, 1.0])
    axes["[SPM] facilitate factor"].apply(p, 2.0, [2.0])
    p.scripts = stub.ScriptRunner([world.script])
    out = stub.process_images(p)
    assert stub.errors_reported == []
    assert torch.equal(out.images[0], base.images[0])  # weight 0 everywhere: no change
    assert out.infotexts[0]["SPM"] == "m:0.0" and out.infotexts[0]["SPM transport"] == "off x2.0"


def test_extra_network_page_and_settings(world):
    world.add_membrane("styles/van_gogh", concepts=("Van Gogh",))
    net = stub.extra_network_registry["spm"]
    net.activate(stub.StableDiffusionProcessing(), [])  # the model-load call with all_prompts None
    page = next(pg for pg in stub.registered_pages if pg.title == "SPM")
    items = list(page.list_items())
    assert [i["name"] for i in items] == ["styles/van_gogh"]
    assert "Van Gogh" in items[0]["description"]
    assert "spm_default_weight" in world.env.shared.opts.data_labels
    world.env.shared.opts.spm_default_weight = 0.6
    assert "0.6" in page.create_item("styles/van_gogh")["prompt"]  # the render-time fallback
    (world.folder / "styles" / "van_gogh.json").write_text('{"preferred weight": 0.8, "description": "mine"}')
    item = page.create_item("styles/van_gogh")
    assert item["description"] == "mine"
    assert js_eval(item["prompt"], {"spm_default_weight": 0.3}) == "<spm:styles/van_gogh:0.8>"


NODE = shutil.which("node")


def js_run(code: str, opts) -> str:
    """Run browser-side JS in node, with ``opts`` (the WebUI's settings object; None: not defined); its stdout."""
    if NODE is None:
        pytest.skip("node is not installed (apt-get install nodejs)")
    prelude = "" if opts is None else f"var opts = {json.dumps(opts)};"
    res = subprocess.run([NODE, "-e", prelude + code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def js_eval(expr: str, opts) -> str:
    """A card's ``prompt`` JS expression evaluated as the browser does on a click."""
    return js_run(f"process.stdout.write(String({expr}));", opts)


def test_card_inserts_the_weight_with_its_decimal_point(world):
    """The card's ``prompt`` is a JS expression: ``"<spm:a:" + 1.0 + ">"`` gives ``<spm:a:1>`` in a browser."""
    world.add_membrane("cat", concepts=("cat",))
    page = next(pg for pg in stub.registered_pages if pg.title == "SPM")
    prompt = page.create_item("cat")["prompt"]
    assert js_eval(prompt, {"spm_default_weight": 1}) == "<spm:cat:1.0>"
    assert js_eval(prompt, {"spm_default_weight": 0.85}) == "<spm:cat:0.85>"
    assert js_eval(prompt, {"spm_default_weight": 2}) == "<spm:cat:2.0>"
    assert js_eval(prompt, {}) == "<spm:cat:1.0>"  # settings not loaded yet: the value at render time
    world.env.shared.opts.spm_default_weight = 0.5
    assert js_eval(page.create_item("cat")["prompt"], None) == "<spm:cat:0.5>"
    # the WebUI's card markup: the expression sits html-escaped in onclick, which the browser unescapes
    html_card = page.create_item_html("txt2img", page.create_item("cat"))
    onclick = html.unescape(re.search(r'onclick="([^"]*)"', html_card).group(1))
    clicked = "function cardClicked(tab, text, negative, allowNegative) { process.stdout.write(tab + ' ' + text); }"
    assert js_run(clicked + onclick, {"spm_default_weight": 1}) == "txt2img <spm:cat:1.0>"


def test_cards_are_rendered_from_the_folder_of_now_with_a_stamp(world):
    """The WebUI renders the cards once and serves that copy until Refresh: the cards carry the signature of
    the listing they show, so javascript/spm.js can tell they are stale; a render rescans the folder."""
    world.add_membrane("cat")
    page = next(pg for pg in stub.registered_pages if pg.title == "SPM")
    assert 'data-spm-signature="loading"' in page.create_html("txt2img", empty=True)
    first = page.create_html("txt2img")
    sig = world.state.library().signature
    assert 'data-name="cat"' in first and f'data-spm-signature="{sig}"' in first
    # a training run saved a new file; nobody pressed Refresh or rescanned
    save_membrane(random_membrane(world.unet, name="dog", concepts=("dog",), seed=2), world.folder / "dog.safetensors")
    second = page.create_html("txt2img")
    assert 'data-name="dog"' in second and world.state.library().signature != sig
    assert f'data-spm-signature="{world.state.library().signature}"' in second


def test_names_route_follows_the_folder(world):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from spm.webui import integration

    app = FastAPI()
    stub.fire("app_started", None, app)
    client = TestClient(app)
    d = client.get("/spm/v1/names").json()
    assert d["names"] == [] and d["problem"] is None and d["default_weight"] == 1.0
    world.add_membrane("styles/cat", concepts=("cat",))
    d2 = client.get("/spm/v1/names").json()
    assert d2["names"] == ["styles/cat"] and "cat" in d2["descriptions"]["styles/cat"]
    assert d2["signature"] != d["signature"]
    assert client.get("/spm/v1/names").json()["signature"] == d2["signature"]
    assert integration.names_payload()["signature"] == d2["signature"]
    assert world.state.notify_membranes_changed() == d2["signature"]


def test_settings_have_their_own_section_under_a_category(world):
    """A1111 1.10 / Forge group settings pages under category headings; a section without a category id
    lands under "Uncategorized" (``Options.dumpjson``)."""
    opts = world.env.shared.opts
    assert {opts.data_labels[k].section for k in ("spm_default_weight", "spm_write_infotext")} == {("spm", "SPM")}
    # a WebUI's own section and an extension's section without a category, as the real settings hold them
    opts.add_option("sd_vae", stub.OptionInfo("Automatic", "SD VAE", section=("vae", "VAE"), category_id="sd"))
    opts.add_option("canvas_hotkey_zoom", stub.OptionInfo("Alt", "Zoom canvas", section=("canvas_hotkey", "Canvas Hotkeys")))
    headings = stub.settings_headings(opts)
    assert headings["Canvas Hotkeys"] == "Uncategorized"  # the stand-in reproduces the WebUI's grouping
    assert headings["SPM"] == "Stable Diffusion"
    assert opts.spm_default_weight == 1.0 and opts.spm_write_infotext is True


def test_model_without_sd_targets_does_not_break_generation(world, monkeypatch):
    """E.g. Flux in Forge: no SPM targets. Idle SPM stays silent; a tag gives a warning, not an error."""
    world.add_membrane("m")
    base = world.run(["a cat"])
    monkeypatch.setattr("spm.webui.runtime.MembraneStack.__init__",
                        lambda self, unet, **kw: (_ for _ in ()).throw(ValueError("no SPM targets found in this model")))
    world.state.runtime().detach()
    out = world.run(["a cat"])
    assert torch.equal(out.images[0], base.images[0]) and world.p.comments == {}
    out = world.run(["a cat <spm:m>"])
    assert torch.equal(out.images[0], base.images[0])
    assert any("no SPM targets" in c for c in world.p.comments)


def test_sdxl_dict_conditioning(tmp_path, tokenizer, text_encoder):
    w = World(tmp_path, tokenizer, text_encoder, sdxl=True)
    try:
        w.add_membrane("m")
        base = w.run(["a cat", "a car"], batch_size=2)
        out = w.run(["a cat <spm:m:0.9>", "a car"], batch_size=2)
        assert w.strengths[0][:, 0].tolist() == pytest.approx([0.9, 0.0, 0.0, 0.0])
        assert torch.equal(out.images[1], base.images[1]) and not torch.equal(out.images[0], base.images[0])
    finally:
        w.close()


def test_forge_layout_and_non_linear_class(tmp_path, tokenizer, text_encoder):
    w = World(tmp_path, tokenizer, text_encoder, forge=True)
    try:
        targets = [m for n, m in w.unet.named_modules() if n.endswith("attn2.to_k")]
        assert targets and all(isinstance(m, stub.ForgeLinear) and not isinstance(m, torch.nn.Linear) for m in targets)
        w.add_membrane("m")
        base = w.run(["a cat AND a hat", "a car AND a bar"], batch_size=2)
        out = w.run(["a cat AND a hat <spm:m:0.6>", "a car AND a bar"], batch_size=2, args=(True, [], "", "off", 1.0))
        # Forge: [uncond0, uncond1, cond0 part0, cond1 part0, cond0 part1, cond1 part1] in one call
        assert w.strengths[0][:, 0].tolist() == pytest.approx([0.0, 0.0, 0.6, 0.0, 0.6, 0.0])
        assert torch.equal(out.images[1], base.images[1]) and not torch.equal(out.images[0], base.images[0])
        # forge_objects were replaced every batch; the hooks sat on the shared module tree and are gone now
        assert hooked_modules(w.unet) == []
        # a 231-token negative: Forge repeats the 77-token cond rows to its length; they are still recognised
        w.run(["a cat <spm:m:0.6>", "a car"], negative=", ".join(["blurry ugly"] * 60), batch_size=2)
        assert w.p.unet_calls[0].shape[1] == 231  # 3 chunks of 77
        assert w.strengths[0][:, 0].tolist() == pytest.approx([0.0, 0.0, 0.6, 0.0])
        stub.fire("script_unloaded")
        assert "get_learned_conditioning" not in vars(w.model)
    finally:
        w.close()


def test_core_import_under_a_unique_name_when_spm_clashes(tmp_path, tokenizer, text_encoder, monkeypatch):
    import types

    foreign = types.ModuleType("spm")
    foreign.__file__ = str(tmp_path / "elsewhere" / "spm" / "__init__.py")
    w = World.__new__(World)
    stub.install(tmp_path)
    saved = {k: v for k, v in sys.modules.items() if k == "spm" or k.startswith("spm.")}
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules["spm"] = foreign
        ns = runpy.run_path(str(ROOT / "scripts" / "spm_membranes.py"))
        assert ns["_CORE"] == "sd_webui_spm_ext"
        assert ns["SpmScript"].__module__ == "sd_webui_spm_ext.webui.script"
        assert sys.modules["spm"] is foreign
    finally:
        for k in [k for k in sys.modules if k == "spm" or k.startswith(("spm.", "sd_webui_spm_ext"))]:
            del sys.modules[k]
        sys.modules.update(saved)
        stub.uninstall()
    del w


def test_browser_script_parses():
    """``javascript/spm.js`` is valid JS (the browser test, marked slow, runs it in Chromium)."""
    if NODE is None:
        pytest.skip("node is not installed (apt-get install nodejs)")
    res = subprocess.run([NODE, "--check", str(ROOT / "javascript" / "spm.js")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
