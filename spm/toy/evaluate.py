"""The toy-world harness as a function: erasure and preservation of membranes, measured with the toy scorer.

:func:`evaluate` generates the harness's fixed prompt suite (:func:`harness.prompt_suite`) with fixed seeds, once
without and once with the membranes (diffusers host, Facilitated Transport unless turned off), scores every
image with the toy scorer and returns a JSON-able dict.  ``python -m spm eval`` is its command line.

Definitions (the same as ``bench/erasure.py``; fractions in 0..1, drops in percentage points):

* ``erasure`` = 1 − (target found after) / (target found before) on the *literal* target prompts, per target,
  then averaged over the targets; ``paraphrase_erasure`` the same on prompts that name a target only through a
  paraphrase.  A target the base model never draws has no defined erasure: ``null``.
* ``nontarget_fidelity_before/after``: share of non-target prompts in which the scorer finds every object the
  prompt asks for; ``nontarget_drop_pt`` = 100 × (before − after).
* ``nontarget_exact_before/after``: share of non-target images whose predicted object set equals the prompted one.
* ``psnr_unrelated_db`` / ``ssim_unrelated``: medians over non-target prompts of same-seed PSNR (capped at
  100 dB; identical images count as 100) and SSIM between images with and without the membranes;
  ``nontarget_identical``: the share of non-target images that are bit-identical with and without them (1.0: every
  pixel of every non-target image unchanged).
* ``mixed_*`` (when the suite has mixed prompts, a target and a non-target in one prompt): erasure of the target
  (``mixed_erasure``; ``mixed_found_before`` / ``_after``, the share of images with the target, and of those after
  ``mixed_kept`` where the base image had it too and ``mixed_new`` where it did not) and the share of images where
  the non-target object is still found.

Images depend only on (prompt, seed, settings, membranes).  Generations without membranes are cached per
(pipeline, case list), so the baseline of a suite is generated once however many membrane sets it is compared with.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from . import harness
from .model import IMAGE_SIZE
from .worlds import WORLDS, World, get_world

THRESHOLD = 0.5
PSNR_CAP_DB = 100.0
SUITE_DEFAULTS = {"n_literal": 16, "n_paraphrase": 8, "n_per_other": 3, "n_pairs": 8, "n_mixed": 8, "seed": 1234}
# counted per target: several targets measured together get as many literal, paraphrase and mixed prompts each as one
# target alone (each target's erasure is then judged on as many images as in its own run)
PER_TARGET = ("n_literal", "n_paraphrase", "n_mixed")
PARTS = ("literal", "paraphrase", "nontarget", "mixed")


class NotToyModel(ValueError):
    """The pipeline is not the toy world's model (the toy scorer only reads the toy world's 32×32 pictograms)."""


def world_of(pipe) -> World | None:
    """The toy world whose model ``pipe`` is shaped like (context width, image size, prediction type), or None."""
    unet = pipe.unet
    ctx = getattr(unet.config, "cross_attention_dim", None)
    scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = int(unet.config.sample_size) * int(scale)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return None
    pred = getattr(getattr(pipe, "scheduler", None), "config", {}).get("prediction_type", "epsilon")
    for w in WORLDS.values():
        if ctx == w.text_width and size == w.image_size and pred == w.prediction_type:
            return w
    return None


def check_toy_pipeline(pipe, label: str = "the model") -> World:
    """Raise :class:`NotToyModel` unless ``pipe`` makes toy-world images (SD-shaped, 32×32 px, a toy world's context
    width and prediction type); returns the world."""
    w = world_of(pipe)
    if w is None:
        unet = pipe.unet
        ctx = getattr(unet.config, "cross_attention_dim", None)
        scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        size = int(unet.config.sample_size) * int(scale)
        xl = getattr(pipe, "text_encoder_2", None) is not None
        raise NotToyModel(
            f"{label} is not the toy-world model (it makes {size}x{size} images with context width {ctx}"
            f"{', SDXL' if xl else ''}); the toy scorer only reads the toy world's {IMAGE_SIZE}x{IMAGE_SIZE} pictograms, "
            "so `eval` measures toy models only (use `python -m spm generate` to look at other models)")
    return w


def load_asset_folder(folder, world: str | World | None = None) -> object:
    """A toy pipeline from an asset-style folder (``unet/`` and optionally ``text_encoder/``, ``vae/``; missing
    parts come from the world's shipped base, as for the shipped fine-tune), e.g. the output of ``bench.toyworld build``.

    The world (default: the one whose context width the folder's UNet has; else world 1) gives the scheduler."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .model import asset_dir, load_scheduler, make_pipeline

    folder = Path(folder)
    if world is None:
        f = folder / "unet" / "config.json"
        ctx = json.loads(f.read_text()).get("cross_attention_dim") if f.is_file() else None
        world = next((w for w in WORLDS.values() if w.text_width == ctx), get_world("shapes"))

    def pick(sub: str) -> str:
        for d in (folder, asset_dir("base", world)):
            if (d / sub).is_dir():
                return str(d / sub)
        raise FileNotFoundError(f"{folder} has no {sub}/ and the shipped base model is missing")

    parts = {"text_encoder": CLIPTextModel, "vae": AutoencoderKL, "unet": UNet2DConditionModel}
    comps = {k: cls.from_pretrained(pick(k)).eval().requires_grad_(False) for k, cls in parts.items()}
    return make_pipeline(comps["text_encoder"], comps["vae"], comps["unet"], load_scheduler(world))


def normalise_targets(targets: Sequence[str], source: str = "", world: str | World | None = None) -> list[str]:
    """Lower-case, strip, de-duplicate and check that every target is an object of ``world`` (None: of any toy
    world; the objects are then checked again once the model, and so its world, is known)."""
    known = harness.labels_of(world).OBJECTS if world is not None else \
        tuple(o for w in WORLDS.values() for o in w.captions_module().OBJECTS)
    out: list[str] = []
    for t in targets:
        name = str(t).strip().lower()
        if name not in known:
            where = f" (from {source})" if source else ""
            which = "" if world is None else f" of the {get_world(world).name} world"
            raise ValueError(f"target {t!r}{where} is not a toy-world object{which}; the scorer knows only "
                             f"{', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no targets{f' for {source}' if source else ''}: name the erased objects with --target")
    return out


class Generations:
    """Generates suites with fixed seeds; caches the generations without membranes.

    Key: (pipeline, steps, cfg, the exact list of (prompt, seed)).  Whole lists are cached (not single images) so
    that a baseline and its membrane run always batch identically: same-seed images then differ only by the
    membranes, and a membrane that does nothing gives bit-identical images.
    """

    def __init__(self, steps: int = harness.DEFAULT_STEPS, cfg: float = harness.DEFAULT_CFG, batch_size: int = 64):
        self.steps, self.cfg, self.batch_size = int(steps), float(cfg), int(batch_size)
        self._cache: dict = {}
        self.generated = {"without_membranes": 0, "with_membranes": 0}

    def __call__(self, pipe, cases: list, membranes: Sequence = (), metric: str | None = None,
                 transport: bool = True) -> list:
        from spm.hosts.diffusers import PipelineMembranes

        prompts, seeds = [c.prompt for c in cases], [c.seed for c in cases]
        if not membranes:
            key = (id(pipe), self.steps, self.cfg, tuple(zip(prompts, seeds)))
            hit = self._cache.get(key)
            if hit is not None:
                return hit[1]
        ctx = None
        if membranes:
            kw = {"metric": metric} if metric else {}
            ctx = PipelineMembranes(pipe, list(membranes), transport=transport, **kw)
        imgs = harness.generate(pipe, prompts, seeds, steps=self.steps, cfg=self.cfg, batch_size=self.batch_size,
                                context=ctx)
        if membranes:
            self.generated["with_membranes"] += len(imgs)
        else:
            self.generated["without_membranes"] += len(imgs)
            self._cache[key] = (pipe, imgs)  # the pipeline is held so that its id cannot be reused
        return imgs


def _sub(scores: dict[str, np.ndarray], idx: list[int]) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in scores.items()}


def _erasure(fb: float, fa: float) -> float | None:
    return (1.0 - fa / fb) if fb > 0 else None


def _found_split(b: np.ndarray, a: np.ndarray) -> dict:
    """Target found before / after (bool per image): the shares, the erasure, and the images found after split into
    "kept" (the base model drew the target there too) and "new" (it did not: the membrane turned the prompt into
    another picture, which has the target in it)."""
    fb, fa = float(b.mean()), float(a.mean())
    return {"found_before": fb, "found_after": fa, "erasure": _erasure(fb, fa),
            "kept": int((b & a).sum()), "new": int((~b & a).sum())}


def _per_target(cases, sb, sa, targets, world=None) -> list[dict]:
    rows = []
    for t in targets:
        idx = [i for i, c in enumerate(cases) if t in c.objects]
        if not idx:
            continue
        b = harness.found(_sub(sb, idx), [t] * len(idx), THRESHOLD, world)
        a = harness.found(_sub(sa, idx), [t] * len(idx), THRESHOLD, world)
        rows.append({"target": t, "images": len(idx), **_found_split(b, a)})
    return rows


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def measure(gen: Generations, pipe, scorer, suite: dict[str, list], targets: list[str], membranes: Sequence,
            metric: str | None, transport: bool, world: str | World | None = None) -> dict:
    """All metrics of one membrane set on one pipeline and suite (see the module docstring); ``world``: the toy
    world of ``pipe`` and ``suite`` (default: world 1)."""
    cases = [c for part in PARTS for c in suite.get(part, [])]
    before = gen(pipe, cases)
    after = gen(pipe, cases, membranes, metric, transport)
    sb, sa = harness.score_images(scorer, before), harness.score_images(scorer, after)
    res: dict = {"targets": list(targets), "images": {}}
    start = 0
    for part in PARTS:
        part_cases = suite.get(part, [])
        idx = list(range(start, start + len(part_cases)))
        start += len(part_cases)
        res["images"][part] = len(idx)
        if not idx:
            continue
        pb, pa = _sub(sb, idx), _sub(sa, idx)
        if part in ("literal", "paraphrase"):
            per = _per_target(part_cases, pb, pa, targets, world)
            res["erasure" if part == "literal" else "paraphrase_erasure"] = _mean(p["erasure"] for p in per)
            res[f"{part}_per_target"] = per
            if part == "literal" and len(targets) > 1:
                vals = [p["erasure"] for p in per if p["erasure"] is not None]
                res["min_erasure"] = float(min(vals)) if vals else None
        elif part == "nontarget":
            fb, fa = harness.found_rate(pb, part_cases, THRESHOLD, world), harness.found_rate(pa, part_cases, THRESHOLD, world)
            bi, ai = [before[i] for i in idx], [after[i] for i in idx]
            res.update({
                "nontarget_fidelity_before": fb, "nontarget_fidelity_after": fa, "nontarget_drop_pt": 100.0 * (fb - fa),
                "nontarget_exact_before": harness.exact_accuracy(pb, part_cases, THRESHOLD, world),
                "nontarget_exact_after": harness.exact_accuracy(pa, part_cases, THRESHOLD, world),
                "psnr_unrelated_db": harness.median_psnr(bi, ai, PSNR_CAP_DB),
                "nontarget_identical": harness.identical_share(bi, ai),
                "ssim_unrelated": float(np.median(harness.ssim(bi, ai))),
            })
        else:  # mixed: one target and one non-target object per prompt
            tgt = [next(o for o in c.objects if o in targets) for c in part_cases]
            oth = [next(o for o in c.objects if o not in targets) for c in part_cases]
            split = _found_split(harness.found(pb, tgt, THRESHOLD, world), harness.found(pa, tgt, THRESHOLD, world))
            res.update({f"mixed_{k}": v for k, v in split.items()})  # mixed_erasure, mixed_found_before, mixed_kept …
            res["mixed_other_found_before"] = float(harness.found(pb, oth, THRESHOLD, world).mean())
            res["mixed_other_found_after"] = float(harness.found(pa, oth, THRESHOLD, world).mean())
    return res


def _unique_names(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        k, name = 2, n
        while name in out:
            name, k = f"{n}#{k}", k + 1
        out.append(name)
    return out


def evaluate(base, scorer, membranes: Sequence, targets: Sequence[Sequence[str]] | None = None, *, finetune=None,
             metric: str | None = None, transport: bool = True, steps: int = harness.DEFAULT_STEPS,
             cfg: float = harness.DEFAULT_CFG, suite: dict | None = None, names: Sequence[str] | None = None,
             each: bool = True, generations: Generations | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Erasure and preservation of ``membranes`` on the toy model ``base`` (and transfer to ``finetune``).

    * ``membranes``: ``[(spm.membrane.Membrane, weight), …]``; ``targets``: per membrane, the toy objects it
      erases (default: each membrane's ``concepts`` metadata); ``names``: labels (default: ``membrane.name``).
    * ``metric``: the Facilitated Transport metric (default: the library's); ``transport=False`` applies every
      membrane at its weight to every prompt.
    * ``steps``/``cfg``: DDIM steps and guidance scale; ``suite``: overrides of :data:`SUITE_DEFAULTS`
      (the arguments of :func:`harness.prompt_suite`; those in :data:`PER_TARGET` are per target).
    * ``each``: with several membranes, also measure each alone (key ``each``, plus the ``multi`` summary).

    Returns the metrics of all membranes together at the top level (see the module docstring), plus
    ``settings``, ``membranes``, ``each``/``multi`` (several membranes), ``transfer`` (with ``finetune``),
    ``generated`` (image counts) and ``seconds``.  Raises ``ValueError`` (bad targets, metric or settings),
    :class:`NotToyModel` and :class:`spm.checkpoint.IncompatibleMembrane` before generating anything.
    """
    from spm.hosts.diffusers import PipelineMembranes
    from spm.transport import DEFAULT_METRIC, check_metric

    t0 = time.time()
    say = progress or (lambda msg: None)
    items = [(m, float(w)) for m, w in membranes]
    if not items:
        raise ValueError("no membranes to evaluate")
    if targets is None:
        targets = [m.concepts for m, _ in items]
    if len(targets) != len(items):
        raise ValueError(f"{len(targets)} target lists for {len(items)} membranes")
    names = _unique_names(list(names) if names is not None else [m.name for m, _ in items])
    if len(names) != len(items):
        raise ValueError(f"{len(names)} names for {len(items)} membranes")
    world = world_of(base) or get_world("shapes")  # a pipeline of no toy world is refused below
    objects = harness.labels_of(world).OBJECTS
    per_targets = [normalise_targets(t, n, world) for t, n in zip(targets, names)]
    all_targets = list(dict.fromkeys(t for ts in per_targets for t in ts))
    if len(all_targets) == len(objects):
        raise ValueError("every toy-world object is a target: no non-target prompts are left to measure preservation")
    metric = check_metric(metric or DEFAULT_METRIC)
    if steps < 1 or cfg < 0:
        raise ValueError(f"steps must be >= 1 and cfg >= 0 (got {steps}, {cfg})")
    sizes = {**SUITE_DEFAULTS, **(suite or {})}
    unknown = sorted(set(sizes) - set(SUITE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown suite settings {unknown}; known: {sorted(SUITE_DEFAULTS)}")
    if any(int(v) < 0 for k, v in sizes.items() if k != "seed") or sizes["n_literal"] < 1:
        raise ValueError(f"suite sizes must be >= 0 and n_literal >= 1 (got {sizes})")
    pipes = [("base", base)] + ([("finetune", finetune)] if finetune is not None else [])
    for label, pipe in pipes:
        if check_toy_pipeline(pipe, label) is not world:
            raise NotToyModel(f"the {label} model is of the {world_of(pipe).name} toy world, the base of the {world.name} one")
        PipelineMembranes(pipe, items).close()  # raises IncompatibleMembrane now, not after minutes of generation

    gen = generations or Generations(steps, cfg)
    if (gen.steps, gen.cfg) != (int(steps), float(cfg)):
        raise ValueError("the Generations object was made for other steps/cfg")
    tr = transport

    def suite_for(ts: list[str]) -> dict:
        per = {k: int(v) * len(ts) if k in PER_TARGET else v for k, v in sizes.items()}
        return harness.prompt_suite(ts if len(ts) > 1 else ts[0], **per, world=world)

    report: dict = {
        "world": world.name,
        "settings": {"sampler": "DDIM", "steps": int(steps), "cfg": float(cfg), "transport": bool(tr),
                     "metric": metric if tr else None, "threshold": THRESHOLD, "psnr_cap_db": PSNR_CAP_DB,
                     "suite": sizes, "torch_threads": torch.get_num_threads()},
        "membranes": [{"name": n, "weight": w, "targets": ts} for n, (_, w), ts in zip(names, items, per_targets)],
    }
    together_suite = suite_for(all_targets)
    say(f"all {len(items)} membrane(s) on the model: {sum(len(v) for v in together_suite.values())} prompts")
    report.update(measure(gen, base, scorer, together_suite, all_targets, items, metric, tr, world))
    if len(items) > 1 and each:
        report["each"] = {}
        for name, item, ts in zip(names, items, per_targets):
            say(f"{name} alone on the model")
            report["each"][name] = measure(gen, base, scorer, suite_for(ts), ts, [item], metric, tr, world)
        alone = {p["target"]: p["erasure"] for r in report["each"].values() for p in r.get("literal_per_target", [])}
        drops = [r["nontarget_drop_pt"] for r in report["each"].values() if "nontarget_drop_pt" in r]
        report["multi"] = {
            "membranes": len(items),
            "min_erasure": report.get("min_erasure"),
            "erasure_together": {p["target"]: p["erasure"] for p in report.get("literal_per_target", [])},
            "erasure_alone": alone,
            "nontarget_drop_pt": report.get("nontarget_drop_pt"),
            "nontarget_drop_pt_worst_alone": max(drops) if drops else None,
            "psnr_unrelated_db": report.get("psnr_unrelated_db"),
        }
    if finetune is not None:
        say("all membranes on the fine-tune (transfer)")
        report["transfer"] = measure(gen, finetune, scorer, together_suite, all_targets, items, metric, tr, world)
    report["generated"] = dict(gen.generated)
    report["seconds"] = time.time() - t0
    return report


__all__ = ["Generations", "NotToyModel", "PER_TARGET", "SUITE_DEFAULTS", "check_toy_pipeline", "evaluate", "load_asset_folder", "measure",
           "normalise_targets"]
