"""Stand-in for the WebUI's ``modules`` package, for testing the SPM glue without a WebUI.

Mirrors **AUTOMATIC1111 stable-diffusion-webui v1.10.1 (commit 82a973c0)** — signatures and call order of
``modules/scripts.py`` (Script, ScriptRunner lifecycle with ``p.script_args[args_from:args_to]``),
``modules/script_callbacks.py`` (on_* registration and the *_callback firing functions),
``modules/extra_networks.py`` (ExtraNetworkParams, ExtraNetwork, ``<(\\w+):([^>]+)>`` parsing that keeps only
the first prompt's tags), ``modules/ui_extra_networks.py`` (ExtraNetworksPage, register_page, quote_js; the card's
``onclick`` from the item's ``prompt`` expression; ``create_ui``'s cards rendered once, served from that copy on every
page load, renewed only by the hidden refresh button), ``modules/options.py`` (OptionInfo, options_section, the
settings categories, ``Options.reorder`` and ``dumpjson``'s ``_categories``),
``modules/prompt_parser.py`` (SdConditioning, get_multicond_prompt_list, schedules, reconstruct_* — the
prompt-editing grammar is reduced to non-nested ``[a:b:N]``, ``[a:N]``, ``[a::N]`` and hires-step
re-scheduling is left out; checked once against the real parser for first-pass schedules),
``modules/processing.py`` (process_images_inner order: before_process → process → per batch
before_process_batch → parse_extra_network_prompts → extra_networks.activate → process_batch → setup_conds
→ process_before_every_sampling → sampling → hires pass → deactivate → postprocess; ``p.comment``),
``modules/sd_samplers_cfg_denoiser.py`` (CFGDenoiser row layout: cond rows image by image, one per AND part,
then the uncond rows; chunked UNet calls when cond/uncond lengths differ or batch_cond_uncond is off),
``scripts/xyz_grid.py`` (AxisOption) and ``modules/shared`` (opts with add_option, OptionInfo, cmd_opts).

Forge (backend era, Gradio 4.40) bits: ``modules_forge`` (importable = Forge), ``backend.operations``
(``ForgeOperations.Linear``, *not* an ``nn.Linear``), ``backend.patcher.unet.UnetPatcher`` (``clone`` shares
the module tree), a ``ForgeDiffusionEngine``-like model with ``forge_objects`` reset every batch and before
``process_before_every_sampling``, and Forge's batch layout (chunks of exactly B rows, uncond first,
``transformer_options['cond_or_uncond']``).

The models are real: a CompVis LDM ``UNetModel`` (stable-diffusion-sdkit) and a small CLIP text encoder.
"""

from __future__ import annotations

import copy
import re
import sys
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODULE_NAMES = [
    "modules", "modules.scripts", "modules.script_callbacks", "modules.extra_networks", "modules.ui_extra_networks",
    "modules.shared", "modules.options", "modules.paths", "modules.prompt_parser", "modules.processing", "modules_forge",
    "backend", "backend.operations", "backend.patcher", "backend.patcher.unet", "xyz_grid.py", "modules.ui_components",
]


def _module(name: str) -> types.ModuleType:
    m = types.ModuleType(name)
    sys.modules[name] = m
    return m


# ================================================================================================
# modules.shared / modules.paths
# ================================================================================================
class OptionInfo:
    """``modules/options.py`` OptionInfo (same signature; the label/comment helpers are left out)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api


def options_section(section_identifier, options_dict):
    """``modules/options.py``: a 2-tuple sets the section, a 3-tuple also the category id."""
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


@dataclass
class OptionsCategory:
    id: str
    label: str


class OptionsCategories:
    def __init__(self):
        self.mapping = {}

    def register_category(self, category_id, label):
        if category_id in self.mapping:
            return category_id
        self.mapping[category_id] = OptionsCategory(category_id, label)


categories = OptionsCategories()
for _cid, _label in (("saving", "Saving images"), ("sd", "Stable Diffusion"), ("ui", "User Interface"),
                     ("system", "System"), ("postprocessing", "Postprocessing"), ("training", "Training")):
    categories.register_category(_cid, _label)  # modules/shared_options.py registers these at import


class Options:
    def __init__(self):
        self.__dict__["data"] = {"extra_networks_default_multiplier": 1.0, "use_old_scheduling": False,
                                 "samples_format": "png"}
        self.__dict__["data_labels"] = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def reorder(self):
        """``Options.reorder`` (called by the settings UI after ``ui_settings_callback``): every item of a section
        takes the category of the section's first item; categories in registration order (unknown last),
        sections alphabetically inside."""
        section_categories = {}
        for _, item in self.data_labels.items():
            if item.section not in section_categories:
                section_categories[item.section] = item.category_id
        for _, item in self.data_labels.items():
            item.category_id = section_categories.get(item.section)
        category_ids = {cid: i for i, cid in enumerate(categories.mapping)}

        def sort_key(x):
            item = x[1]
            return category_ids.get(item.category_id, len(category_ids)), item.section[1]

        self.__dict__["data_labels"] = dict(sorted(self.data_labels.items(), key=sort_key))

    def dumpjson(self):
        """``Options.dumpjson``: the values, and ``_categories``: ``[section label, category label]`` for the
        first section of each category (the settings page writes the category as a heading above it)."""
        import json

        d = {k: self.data.get(k, v.default) for k, v in self.data_labels.items()}
        d["_comments_before"] = {k: v.comment_before for k, v in self.data_labels.items() if v.comment_before is not None}
        d["_comments_after"] = {k: v.comment_after for k, v in self.data_labels.items() if v.comment_after is not None}
        item_categories = {}
        for item in self.data_labels.values():
            if item.section[0] is None:
                continue
            category = categories.mapping.get(item.category_id)
            category = "Uncategorized" if category is None else category.label
            if category not in item_categories:
                item_categories[category] = item.section[1]
        d["_categories"] = [[v, k] for k, v in item_categories.items()] + [["Defaults", "Other"]]
        return json.dumps(d)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


def settings_headings(opts) -> dict[str, str]:
    """Section label → the category heading it appears under in the settings sidebar, as the page draws
    ``_categories`` (a heading above a section, valid until the next heading), after ``reorder``."""
    import json

    opts.reorder()
    headings = {section: category for section, category in json.loads(opts.dumpjson())["_categories"]}
    out, current = {}, None
    for item in opts.data_labels.values():
        if item.section[0] is None:
            continue
        current = headings.get(item.section[1], current)
        out[item.section[1]] = current
    return out


# ================================================================================================
# modules.script_callbacks
# ================================================================================================
callback_map: dict[str, list] = defaultdict(list)


def _add(kind):
    def on(callback, *, name=None):
        callback_map[kind].append(callback)

    return on


def fire(kind, *args):
    """``model_loaded_callback`` etc.: every callback of ``kind``; exceptions propagate (tests want them)."""
    for cb in list(callback_map[kind]):
        cb(*args)


# ================================================================================================
# modules.extra_networks
# ================================================================================================
class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


extra_network_registry: dict[str, ExtraNetwork] = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:  # the WebUI keeps only the first prompt's tags
            extra_data = parsed
        res.append(updated)
    return res, extra_data


def en_activate(p, extra_network_data):
    activated = []
    for name, args in (extra_network_data or {}).items():
        net = extra_network_registry.get(name)
        if net is not None:
            net.activate(p, args)
            activated.append(net)
    for net in extra_network_registry.values():
        if net not in activated:
            net.activate(p, [])


def en_deactivate(p, extra_network_data):
    for net in extra_network_registry.values():
        net.deactivate(p)


# ================================================================================================
# modules.ui_extra_networks
# ================================================================================================
registered_pages: list = []


def quote_js(s):
    s = s.replace('\\', '\\\\')
    s = s.replace('"', '\\"')
    return f'"{s}"'


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.items = {}

    def refresh(self):
        pass

    def search_terms_from_path(self, filename, possible_directories=None):
        return filename

    def read_user_metadata(self, item, use_cache=True):
        """Real: reads ``<file>.json`` beside the model (``extra_networks.get_user_metadata``)."""
        import json
        import os

        path = os.path.splitext(item.get("filename", ""))[0] + ".json"
        metadata = {}
        if os.path.isfile(path):
            with open(path, encoding="utf8") as f:
                metadata = json.load(f)
        if metadata.get("description") is not None:
            item["description"] = metadata["description"]
        item["user_metadata"] = metadata

    def get_sort_keys(self, path):
        return {"name": str(path).lower()}

    def find_preview(self, path):
        return None

    def create_item(self, name, index=None):
        raise NotImplementedError()

    def list_items(self):
        raise NotImplementedError()

    def allowed_directories_for_previews(self):
        return []

    def create_item_html(self, tabname, item):
        """The card of ``html/extra-networks-card.html`` reduced to what scripts depend on: ``data-name`` and the
        ``onclick`` built from the item's ``prompt`` JS expression (html-escaped, not quoted)."""
        import html

        onclick = item.get("onclick", None)
        if onclick is None:
            onclick = html.escape("cardClicked('{tabname}', {prompt}, {neg_prompt}, {allow_neg});".format(
                tabname=tabname, prompt=item["prompt"], neg_prompt=item.get("negative_prompt", "''"),
                allow_neg=str(self.allow_negative_prompt).lower()))
        name = html.escape(item["name"])
        return (f'<div class="card" onclick="{onclick}" data-name="{name}"><div class="actions">'
                f'<span class="name">{name}</span><span class="description">{html.escape(item.get("description") or "")}'
                '</span></div></div>')

    def create_html(self, tabname, *, empty=False):
        """The pane: ``list_items`` (unless ``empty``) rendered as cards; "Loading..." while empty."""
        items_list = [] if empty else list(self.list_items())
        self.items = {x["name"]: x for x in items_list}
        for item in self.items.values():
            if "user_metadata" not in item:
                self.read_user_metadata(item)
        cards = "".join(self.create_item_html(tabname, item) for item in self.items.values())
        if not cards:
            cards = "Loading..." if empty else "<div class='nocards'>Nothing here.</div>"
        return f"<div id='{tabname}_{self.extra_networks_tabname}_pane' class='extra-network-pane'>{cards}</div>"


def register_page(page):
    registered_pages.append(page)


def create_ui(interface, unrelated_tabs, tabname):
    """``ui_extra_networks.create_ui`` reduced to its data flow (needs Gradio): one ``gr.HTML`` per page,
    ``{tabname}_{page}_cards_html``, filled on page load from a cache that only the hidden
    ``{tabname}_{page}_extra_refresh_internal`` button (every page's ``refresh``, then new HTML) renews."""
    import gradio as gr

    ui = types.SimpleNamespace(pages=[], pages_contents=[], stored_extra_pages=list(registered_pages), tabname=tabname)
    for page in ui.stored_extra_pages:
        with gr.Tab(page.title, elem_id=f"{tabname}_{page.extra_networks_tabname}"):
            ui.pages.append(gr.HTML(page.create_html(tabname, empty=True),
                                    elem_id=f"{tabname}_{page.extra_networks_tabname}_cards_html"))

    def create_html():
        ui.pages_contents = [pg.create_html(ui.tabname) for pg in ui.stored_extra_pages]

    def pages_html():
        if not ui.pages_contents:
            create_html()
        return ui.pages_contents

    def refresh():
        for pg in ui.stored_extra_pages:
            pg.refresh()
        create_html()
        return ui.pages_contents

    for page in ui.stored_extra_pages:
        button_refresh = gr.Button("Refresh", elem_id=f"{tabname}_{page.extra_networks_tabname}_extra_refresh_internal",
                                   visible=False)
        button_refresh.click(fn=refresh, inputs=[], outputs=ui.pages)
    interface.load(fn=pages_html, inputs=[], outputs=ui.pages)
    return ui


# ================================================================================================
# modules.prompt_parser (reduced grammar, real signatures and data shapes)
# ================================================================================================
class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, 'is_negative_prompt', False)
        self.width = width or getattr(copy_from, 'width', None)
        self.height = height or getattr(copy_from, 'height', None)


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_re_edit = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):\s*([\d.]+)\s*\]|\[([^\[\]:]*):\s*([\d.]+)\s*\]")


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    steps = base_steps if hires_steps is None else hires_steps

    def at(v: str) -> int:
        x = float(v)
        return int(x * steps) if x < 1 else int(x)

    def schedule(prompt: str):
        edits = []
        for m in _re_edit.finditer(prompt):
            if m.group(3) is not None:
                edits.append((m, m.group(1), m.group(2), at(m.group(3))))
            else:
                edits.append((m, "", m.group(4), at(m.group(5))))
        points = sorted({s for *_, s in edits if 0 < s < steps} | {steps})
        out = []
        for end in points:
            text, last = [], 0
            for m, before, after, s in edits:
                text.append(prompt[last:m.start()])
                text.append(after if end > s else before)
                last = m.end()
            text.append(prompt[last:])
            t = "".join(text)
            if out and out[-1][1] == t:
                out[-1][0] = end
            else:
                out.append([end, t])
        return out

    return [schedule(p) for p in prompts]


@dataclass
class ScheduledPromptConditioning:
    end_at_step: int
    cond: Any


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res, cache = [], {}
    for prompt, sched in zip(prompts, get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)):
        if prompt in cache:
            res.append(cache[prompt])
            continue
        texts = SdConditioning([x[1] for x in sched], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        out = []
        for i, (end, _) in enumerate(sched):
            out.append(ScheduledPromptConditioning(end, {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]))
        cache[prompt] = out
        res.append(out)
    return res


def get_multicond_prompt_list(prompts):
    res_indexes, prompt_indexes = [], {}
    flat = SdConditioning(prompts)
    flat.clear()
    for prompt in prompts:
        indexes = []
        for sub in re_AND.split(prompt):
            m = re_weight.search(sub)
            text, weight = m.groups() if m is not None else (sub, 1.0)
            weight = float(weight) if weight is not None else 1.0
            index = prompt_indexes.get(text)
            if index is None:
                index = len(flat)
                flat.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, flat, prompt_indexes


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    return MulticondLearnedConditioning((len(prompts),), [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in ix] for ix in res_indexes])


def _pick(schedules, step):
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[-1].cond


def _xattn(c):
    return c["crossattn"] if isinstance(c, dict) else c


def reconstruct_cond_batch(c, current_step):
    return torch.stack([_xattn(_pick(s, current_step)) for s in c])


def stack_conds(tensors):
    n = max(t.shape[0] for t in tensors)
    out = [t if t.shape[0] == n else torch.vstack([t, t[-1:].repeat([n - t.shape[0], 1])]) for t in tensors]
    return torch.stack(out)


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable in c.batch:
        row = []
        for cp in composable:
            row.append((len(tensors), cp.weight))
            tensors.append(_xattn(_pick(cp.schedules, current_step)))
        conds_list.append(row)
    return conds_list, stack_conds(tensors)


# ================================================================================================
# modules.scripts
# ================================================================================================
AlwaysVisible = object()


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def elem_id(self, item_id):
        tab = 'img2img' if self.is_img2img else 'txt2img'
        return f'script_{tab}_{re.sub(r"[^a-z_0-9]", "", self.title().lower().replace(" ", "_"))}_{item_id}'


@dataclass
class ScriptClassData:
    script_class: type
    path: str
    basedir: str
    module: Any


scripts_data: list[ScriptClassData] = []
errors_reported: list[tuple[str, BaseException]] = []


class ScriptRunner:
    """The always-on part of ``modules.scripts.ScriptRunner``: each hook gets its slice of ``p.script_args``
    and exceptions are reported (to :data:`errors_reported`), not raised, as ``errors.report`` does."""

    def __init__(self, scripts: list[Script]):
        self.alwayson_scripts = scripts
        start = 0
        for s in scripts:
            s.alwayson = True
            s.args_from = start
            start = s.args_to = start + len(s.controls or [])

    def _each(self, method, p, *args, **kwargs):
        for s in self.alwayson_scripts:
            try:
                getattr(s, method)(p, *args, *p.script_args[s.args_from:s.args_to], **kwargs)
            except Exception as e:
                errors_reported.append((method, e))

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess(self, p, processed):
        for s in self.alwayson_scripts:
            try:
                s.postprocess(p, processed, *p.script_args[s.args_from:s.args_to])
            except Exception as e:
                errors_reported.append(("postprocess", e))


def _script_defaults():
    for name in ("before_process", "process", "before_process_batch", "process_batch", "process_before_every_sampling"):
        setattr(Script, name, lambda self, p, *args, **kwargs: None)
    Script.postprocess = lambda self, p, processed, *args: None


_script_defaults()


# ================================================================================================
# Models: A1111 LatentDiffusion-like and Forge ForgeDiffusionEngine-like, around real networks
# ================================================================================================
class HijackedCLIP(nn.Module):
    """``sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords``: ``forward(texts)`` → ``[n, 77·chunks, d]``
    (75 tokens per chunk, every text padded to the batch's chunk count); ``tokenize(texts)`` → ids without
    BOS/EOS."""

    def __init__(self, tokenizer, transformer):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.padded_rows = 0  # 77-token rows encoded by forward (the WebUI's get_learned_conditioning)
        self.fast_rows = 0  # rows encoded through encode_with_transformers by someone else

    def tokenize(self, texts):
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        """A1111: ``self.wrapped.transformer(input_ids=tokens, …)`` (clip skip 1: the last hidden state)."""
        self.fast_rows += int(tokens.shape[0])
        return self.transformer(input_ids=tokens).last_hidden_state

    def forward(self, texts):
        ids = self.tokenize(texts)
        chunks = max(1, max((len(t) + 74) // 75 for t in ids)) if ids else 1
        out = []
        for t in ids:
            parts = []
            for c in range(chunks):
                piece = t[c * 75:(c + 1) * 75]
                row = [49406] + piece + [49407] * (76 - len(piece))
                parts.append(row)
            x = torch.tensor(parts)
            self.padded_rows += int(x.shape[0])
            with torch.no_grad():
                h = self.transformer(x).last_hidden_state  # [chunks, 77, d]
            out.append(h.reshape(-1, h.shape[-1]))
        return torch.stack(out)


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c_crossattn=None):
        cc = torch.cat(c_crossattn, 1)
        return self.diffusion_model(x, t, context=cc)


class LatentDiffusion(nn.Module):
    """What A1111 loads for SD1/SD2 (``sdxl=True``: sgm's DiffusionEngine surface — dict conditioning)."""

    def __init__(self, unet, clip, sdxl=False):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model = clip
        self.is_sdxl = sdxl
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny")

    def get_learned_conditioning(self, c):
        z = self.cond_stage_model(c)
        if self.is_sdxl:
            return {"crossattn": z, "vector": torch.zeros(len(c), 8)}
        return z

    def apply_model(self, x, t, cond):
        return self.model(x, t, c_crossattn=cond["c_crossattn"])


# --- Forge -----------------------------------------------------------------------------------------
class ForgeLinear(nn.Module):
    """``backend.operations.ForgeOperations.Linear``: an ``nn.Module`` (not ``nn.Linear``) with
    ``in_features``/``out_features``, ``weight``/``bias`` parameters and a manual-cast ``forward``."""

    def __init__(self, in_features, out_features, *args, **kwargs):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = None
        self.scale_weight = None
        self.bias = None
        self.parameters_manual_cast = True

    def forward(self, x):
        weight = self.weight.to(device=x.device, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, weight, bias)


def forgeify(unet: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``unet`` by a :class:`ForgeLinear` with the same weights, in place."""
    for name, mod in list(unet.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                new = ForgeLinear(child.in_features, child.out_features)
                new.weight = nn.Parameter(child.weight.detach().clone())
                new.bias = None if child.bias is None else nn.Parameter(child.bias.detach().clone())
                setattr(mod, child_name, new)
    return unet


class KModel(nn.Module):
    """``backend.modules.k_model.KModel``: holds ``diffusion_model``; ``apply_model`` passes ``context=``."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = torch.float32
        self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options or {})


class UnetPatcher:
    """``backend.patcher.unet.UnetPatcher``: ``clone()`` copies the patch lists, shares ``model``."""

    def __init__(self, model, load_device=None, offload_device=None):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device

    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device)
        n.model_options = copy.deepcopy(self.model_options)
        return n


@dataclass
class ForgeObjects:
    unet: Any
    clip: Any
    vae: Any = None
    clipvision: Any = None

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ClassicTextProcessingEngine:
    def __init__(self, clip: HijackedCLIP):
        self.clip = clip

    def tokenize(self, texts):
        return self.clip.tokenize(texts)

    def encode_with_transformers(self, tokens):
        return self.clip.encode_with_transformers(tokens)

    def __call__(self, texts):
        return self.clip(texts)


class ForgeDiffusionEngine:
    """``backend.diffusion_engine.sd15.StableDiffusion`` surface: not an ``nn.Module``, no ``.model``."""

    def __init__(self, unet, clip):
        self.text_processing_engine = ClassicTextProcessingEngine(clip)
        self.forge_objects = ForgeObjects(unet=UnetPatcher(KModel(unet)), clip=clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sdxl = False
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny-forge")

    def get_learned_conditioning(self, prompt):
        return self.text_processing_engine(prompt)


# ================================================================================================
# modules.processing
# ================================================================================================
@dataclass
class Processed:
    images: list
    infotexts: list
    comments: str = ""


@dataclass(eq=False)
class StableDiffusionProcessing:
    sd_model: Any = None
    prompt: Any = ""
    negative_prompt: Any = ""
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 2
    seed: int = 1
    width: int = 8
    height: int = 8
    cfg_scale: float = 5.0
    script_args: list = field(default_factory=list)
    scripts: Any = None
    enable_hr: bool = False
    hr_prompt: str = ""
    hr_second_pass_steps: int = 2
    batch_cond_uncond: bool = True
    disable_extra_networks: bool = False

    def __post_init__(self):
        self.extra_generation_params: dict[str, Any] = {}
        self.comments: dict[str, int] = {}
        self.all_prompts = None
        self.all_negative_prompts = None
        self.all_hr_prompts = None
        self.iteration = 0
        self.is_hr_pass = False
        self.unet_calls: list[torch.Tensor] = []  # the context of every UNet call, for tests

    def comment(self, text):
        self.comments[text] = 1

    def init_latent_for(self, x):
        return x

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = parse_prompts(self.prompts)
        if self.enable_hr:
            bs = self.batch_size
            self.hr_prompts = self.all_hr_prompts[self.iteration * bs:(self.iteration + 1) * bs]
            self.hr_prompts, self.hr_extra_network_data = parse_prompts(self.hr_prompts)


cached_c: list = [None, None]
cached_uc: list = [None, None]


def _en_key(data):
    return tuple(sorted((k, tuple(tuple(x.items) for x in v)) for k, v in (data or {}).items()))


@dataclass(eq=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img: sampling starts from the init latent plus noise scaled by ``denoising_strength``."""

    init_latent: Any = None
    denoising_strength: float = 0.5

    def init_latent_for(self, x):
        return self.init_latent + self.denoising_strength * x


def get_conds_with_caching(p, function, required_prompts, steps, cache, extra_network_data, hires_steps=None):
    """``StableDiffusionProcessing.get_conds_with_caching``: conditionings are reused across generations
    while prompts, steps, model and ``extra_network_data`` (the *first* prompt's tags) are unchanged."""
    params = (tuple(required_prompts), steps, hires_steps, id(p.sd_model), _en_key(extra_network_data))
    if cache[0] == params:
        return cache[1]
    cache[1] = function(p.sd_model, required_prompts, steps, hires_steps)
    cache[0] = params
    return cache[1]


def _as_list(x, n):
    return list(x) if isinstance(x, list) else [x] * n


def process_images(p: StableDiffusionProcessing, forge: bool = False) -> Processed:
    """``process_images_inner`` of A1111 1.10 (``forge=True``: Forge's per-batch ``forge_objects`` reset and
    its batch layout), with a 2-step Euler-like loop over a real UNet."""
    n_images = p.batch_size * p.n_iter
    if p.scripts is not None:
        p.scripts.before_process(p)
    p.all_prompts = _as_list(p.prompt, n_images)
    p.all_negative_prompts = _as_list(p.negative_prompt, n_images)
    if p.enable_hr:
        p.all_hr_prompts = _as_list(p.hr_prompt or p.prompt, n_images)
    p.all_seeds = [p.seed + i for i in range(n_images)]
    if p.scripts is not None:
        p.scripts.process(p)
    images, infotexts = [], []
    with torch.no_grad():
        for n in range(p.n_iter):
            p.iteration = n
            bs = p.batch_size
            p.prompts = p.all_prompts[n * bs:(n + 1) * bs]
            p.negative_prompts = p.all_negative_prompts[n * bs:(n + 1) * bs]
            p.seeds = p.all_seeds[n * bs:(n + 1) * bs]
            if forge:
                p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                en_activate(p, p.extra_network_data)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
            uc = get_conds_with_caching(p, get_learned_conditioning, SdConditioning(p.negative_prompts, is_negative_prompt=True),
                                        p.steps, cached_uc, p.extra_network_data)
            c = get_conds_with_caching(p, get_multicond_learned_conditioning, SdConditioning(p.prompts), p.steps, cached_c,
                                       p.extra_network_data)
            gen = torch.Generator().manual_seed(p.seeds[0])
            x = p.init_latent_for(torch.randn(bs, 4, p.height // 2, p.width // 2, generator=gen))
            x = _sample(p, x, c, uc, p.steps, forge)
            if p.enable_hr:
                p.is_hr_pass = True
                if not p.disable_extra_networks:
                    en_activate(p, p.hr_extra_network_data)
                hr_uc = get_learned_conditioning(p.sd_model, SdConditioning(p.negative_prompts, is_negative_prompt=True), p.steps, p.hr_second_pass_steps)
                hr_c = get_multicond_learned_conditioning(p.sd_model, SdConditioning(p.hr_prompts), p.steps, p.hr_second_pass_steps)
                x = F.interpolate(x, scale_factor=2, mode="nearest")
                x = _sample(p, x, hr_c, hr_uc, p.hr_second_pass_steps, forge)
                p.is_hr_pass = False
            for i in range(bs):
                images.append(x[i].clone())
                infotexts.append(dict(p.extra_generation_params))
    if not p.disable_extra_networks:
        en_deactivate(p, getattr(p, "extra_network_data", None))
    processed = Processed(images, infotexts, "\n".join(p.comments))
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed


def _sample(p, x, c, uc, steps, forge):
    if forge:
        p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
    if p.scripts is not None:
        p.scripts.process_before_every_sampling(p, x=x, noise=x, c=c, uc=uc)
    for step in range(steps):
        den = _forge_denoise(p, x, c, uc, step) if forge else _cfg_denoise(p, x, c, uc, step)
        x = x - 0.2 * den
    return x


def _unet_a1111(p, x, t, ctx):
    p.unet_calls.append(ctx)
    return p.sd_model.apply_model(x, t, {"c_crossattn": [ctx]})


def _cfg_denoise(p, x, c, uc, step):
    """``CFGDenoiser.forward``: cond rows (image by image, one per AND part), then B uncond rows."""
    conds_list, tensor = reconstruct_multicond_batch(c, step)
    uncond = reconstruct_cond_batch(uc, step)
    repeats = [len(cl) for cl in conds_list]
    x_in = torch.cat([torch.stack([x[i]] * n) for i, n in enumerate(repeats)] + [x])
    t_in = torch.full((x_in.shape[0],), 500 - 100 * step, dtype=torch.long)
    if tensor.shape[1] == uncond.shape[1]:
        cond_in = torch.cat([tensor, uncond])
        if p.batch_cond_uncond:
            x_out = _unet_a1111(p, x_in, t_in, cond_in)
        else:
            bs = len(conds_list)
            x_out = torch.zeros_like(x_in)
            for a in range(0, x_out.shape[0], bs):
                b = min(a + bs, x_out.shape[0])
                x_out[a:b] = _unet_a1111(p, x_in[a:b], t_in[a:b], cond_in[a:b])
    else:
        x_out = torch.zeros_like(x_in)
        nu = uncond.shape[0]
        x_out[:-nu] = _unet_a1111(p, x_in[:-nu], t_in[:-nu], tensor)
        x_out[-nu:] = _unet_a1111(p, x_in[-nu:], t_in[-nu:], uncond)
    den_uncond = x_out[-uncond.shape[0]:]
    den = den_uncond.clone()
    for i, conds in enumerate(conds_list):
        for idx, w in conds:
            den[i] += (x_out[idx] - den_uncond[i]) * (w * p.cfg_scale)
    return den


def _forge_denoise(p, x, c, uc, step):
    """Forge: chunks of exactly B rows in image order, uncond chunk first, one cond chunk per AND position;
    all chunks in one UNet call through the (per-batch) ``forge_objects.unet``."""
    conds_list, tensor = reconstruct_multicond_batch(c, step)
    uncond = reconstruct_cond_batch(uc, step)
    b = x.shape[0]
    n_and = len(conds_list[0])
    chunks, kinds = [uncond], [1]
    for k in range(n_and):
        chunks.append(torch.stack([tensor[conds_list[i][k][0]] for i in range(b)]))
        kinds.append(0)
    n = 1
    for ch in chunks:  # backend/sampling/condition.py CONDCrossAttn.concat: repeat to the lcm length
        n = n * ch.shape[1] // __import__("math").gcd(n, ch.shape[1])
    ctx = torch.cat([ch.repeat(1, n // ch.shape[1], 1) for ch in chunks])
    x_in = x.repeat(len(chunks), 1, 1, 1)
    t_in = torch.full((x_in.shape[0],), 500 - 100 * step, dtype=torch.long)
    p.unet_calls.append(ctx)
    unet = p.sd_model.forge_objects.unet
    out = unet.model.apply_model(x_in, t_in, c_crossattn=ctx, transformer_options={"cond_or_uncond": kinds})
    den_u = out[:b]
    den = den_u.clone()
    for k in range(n_and):
        for i in range(b):
            den[i] += (out[(k + 1) * b + i] - den_u[i]) * (conds_list[i][k][1] * p.cfg_scale)
    return den


# ================================================================================================
# scripts/xyz_grid.py
# ================================================================================================
class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class XYZScript(Script):
    def title(self):
        return "X/Y/Z plot"


# ================================================================================================
# installation
# ================================================================================================
def install(tmp_path, *, forge: bool = False) -> types.SimpleNamespace:
    """Register the stand-in modules in ``sys.modules`` (call :func:`uninstall` afterwards)."""
    uninstall()
    callback_map.clear()
    extra_network_registry.clear()
    registered_pages.clear()
    scripts_data.clear()
    errors_reported.clear()
    cached_c[:] = [None, None]
    cached_uc[:] = [None, None]

    root = _module("modules")
    paths = _module("modules.paths")
    paths.models_path = str(tmp_path / "models")
    shared = _module("modules.shared")
    shared.opts = Options()
    shared.OptionInfo = OptionInfo
    shared.options_section = options_section
    options = _module("modules.options")
    options.OptionInfo, options.options_section, options.categories = OptionInfo, options_section, categories
    shared.cmd_opts = types.SimpleNamespace(spm_dir=str(tmp_path / "models" / "spm"))
    shared.sd_model = None
    sc = _module("modules.script_callbacks")
    for kind in ("model_loaded", "script_unloaded", "before_ui", "ui_settings", "app_started", "infotext_pasted"):
        setattr(sc, f"on_{kind}", _add(kind))
    en = _module("modules.extra_networks")
    for k, v in dict(ExtraNetworkParams=ExtraNetworkParams, ExtraNetwork=ExtraNetwork, register_extra_network=register_extra_network,
                     parse_prompt=parse_prompt, parse_prompts=parse_prompts, activate=en_activate, deactivate=en_deactivate,
                     extra_network_registry=extra_network_registry, re_extra_net=re_extra_net).items():
        setattr(en, k, v)
    uen = _module("modules.ui_extra_networks")
    uen.ExtraNetworksPage, uen.register_page, uen.quote_js = ExtraNetworksPage, register_page, quote_js
    uen.create_ui = create_ui
    pp = _module("modules.prompt_parser")
    for k in ("SdConditioning", "get_learned_conditioning_prompt_schedules", "get_learned_conditioning",
              "get_multicond_prompt_list", "get_multicond_learned_conditioning", "reconstruct_cond_batch",
              "reconstruct_multicond_batch", "stack_conds", "ScheduledPromptConditioning"):
        setattr(pp, k, globals()[k])
    sm = _module("modules.scripts")
    sm.Script, sm.AlwaysVisible, sm.scripts_data, sm.ScriptRunner = Script, AlwaysVisible, scripts_data, ScriptRunner
    proc = _module("modules.processing")
    proc.StableDiffusionProcessing, proc.process_images, proc.Processed = StableDiffusionProcessing, process_images, Processed
    for name in ("paths", "shared", "options", "script_callbacks", "extra_networks", "ui_extra_networks", "prompt_parser", "scripts", "processing"):
        setattr(root, name, sys.modules[f"modules.{name}"])
    xyz = _module("xyz_grid.py")
    xyz.AxisOption = AxisOption
    xyz.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None)]
    XYZScript.__module__ = "xyz_grid.py"
    scripts_data.append(ScriptClassData(XYZScript, "scripts/xyz_grid.py", ".", xyz))
    if forge:
        _module("modules_forge")
        backend = _module("backend")
        ops = _module("backend.operations")
        ops.ForgeOperations = types.SimpleNamespace(Linear=ForgeLinear, Conv2d=nn.Conv2d)
        _module("backend.patcher")
        pu = _module("backend.patcher.unet")
        pu.UnetPatcher = UnetPatcher
        backend.operations = ops
    return types.SimpleNamespace(shared=shared, callbacks=sc, extra_networks=en, prompt_parser=pp, scripts=sm, xyz=xyz)


def install_ui_components() -> types.ModuleType:
    """``modules.ui_components`` with ``InputAccordion`` (needs Gradio): a hidden checkbox that is the
    input, plus the accordion it opens; ``with`` enters the accordion."""
    import gradio as gr

    class InputAccordion(gr.Checkbox):
        def __init__(self, value, **kwargs):
            self.accordion_id = kwargs.get("elem_id") or "input-accordion"
            super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
            self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), elem_id=self.accordion_id,
                                          elem_classes=["input-accordion"], open=value)

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, exc_type, exc_val, exc_tb):
            self.accordion.__exit__(exc_type, exc_val, exc_tb)

    m = _module("modules.ui_components")
    m.InputAccordion = InputAccordion
    sys.modules["modules"].ui_components = m
    return m


def uninstall() -> None:
    for name in MODULE_NAMES:
        sys.modules.pop(name, None)
    for name in [n for n in sys.modules if n.startswith("spm.webui.") and n.split(".")[-1] in ("script", "networks", "integration", "ui")]:
        sys.modules.pop(name, None)
