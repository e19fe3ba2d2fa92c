"""Generation, prompt suites and metrics for toy-world erasure experiments.

``generate`` runs a diffusers pipeline batched with one ``torch.Generator`` per image, so an image depends only
on (prompt, seed, settings), not on its batch neighbours' randomness.  Anything that must be active during
generation (e.g. attached membranes) is passed as ``context``: a context manager entered around the whole run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import captions
from .worlds import World, get_world

DEFAULT_STEPS = 25
DEFAULT_CFG = 7.5


# ----------------------------------------------------------------------------------------------- generation
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
             negative_prompt: str | list[str] | None = None, batch_size: int = 64,
             context: contextlib.AbstractContextManager | None = None) -> list:
    """Generate one 32x32 PIL image per (prompt, seed) with DDIM (eta 0).

    ``context`` (optional) is entered once around all batches, e.g. a membrane attachment.
    """
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images: list = []
    ctx = context if context is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            p = list(prompts[i:i + batch_size])
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
            neg = negative_prompt[i:i + batch_size] if isinstance(negative_prompt, list) else (
                None if negative_prompt is None else [negative_prompt] * len(p))
            out = pipe(prompt=p, negative_prompt=neg, num_inference_steps=steps, guidance_scale=cfg,
                       generator=gens, eta=0.0, output_type="pil")
            images.extend(out.images)
    return images


# ----------------------------------------------------------------------------------------------- prompt suites
@dataclass
class PromptCase:
    prompt: str
    seed: int
    objects: list[str]                 # objects that the prompt asks for
    colours: list[str] = field(default_factory=list)
    kind: str = "literal"              # literal | paraphrase | nontarget | mixed


def labels_of(world: str | World | None = None):
    """The captions module (label space and captions) of a toy world; world 1's by default."""
    return captions if world is None or world == "shapes" else get_world(world).captions_module()


def _single_case(obj: str, rng: np.random.Generator, seed: int, paraphrase: bool, kind: str, cap=captions) -> PromptCase:
    text, cols = cap.single_prompt(obj, rng, seed, paraphrase)
    return PromptCase(text, seed, [obj], cols, kind)


def _pair_case(a: str, b: str, rng: np.random.Generator, seed: int, kind: str, cap=captions) -> PromptCase:
    text, cols = cap.pair_prompt(a, b, rng)
    return PromptCase(text, seed, [a, b], cols, kind)


def prompt_suite(target: str | list[str], n_literal: int = 16, n_paraphrase: int = 8, n_per_other: int = 3,
                 n_pairs: int = 8, n_mixed: int = 8, seed: int = 1234,
                 world: str | World | None = None) -> dict[str, list[PromptCase]]:
    """A fixed suite for erasing ``target`` (one object or several) in ``world`` (default: world 1).

    * ``literal``: prompts that name a target with its literal word (bare word, with and without attributes);
    * ``paraphrase``: prompts that name a target only through a paraphrase (``PARAPHRASES``);
    * ``nontarget``: single non-target objects, plus two-object prompts made only of non-targets;
    * ``mixed``: a target and a non-target in one prompt (the non-target should survive).
    """
    cap = labels_of(world)
    targets = [target] if isinstance(target, str) else list(target)
    for t in targets:
        if t not in cap.OBJECTS:
            raise ValueError(f"unknown object {t!r}")
    others = [o for o in cap.OBJECTS if o not in targets]
    rng = np.random.default_rng([seed, *[cap.OBJECTS.index(t) for t in targets]])
    s = seed * 1000
    suite: dict[str, list[PromptCase]] = {"literal": [], "paraphrase": [], "nontarget": [], "mixed": []}
    for i in range(n_literal):
        t = targets[i % len(targets)]
        case = PromptCase(t, s + i, [t], [], "literal") if i % 4 == 0 else _single_case(t, rng, s + i, False, "literal", cap)
        suite["literal"].append(case)
    for i in range(n_paraphrase):
        t = targets[i % len(targets)]
        suite["paraphrase"].append(_single_case(t, rng, s + 100 + i, True, "paraphrase", cap))
    for j, o in enumerate(others):
        for i in range(n_per_other):
            case = PromptCase(o, s + 200 + 10 * j + i, [o], [], "nontarget") if i == 0 else \
                _single_case(o, rng, s + 200 + 10 * j + i, False, "nontarget", cap)
            suite["nontarget"].append(case)
    if len(others) >= 2:
        for i in range(n_pairs):
            a, b = rng.choice(others, 2, replace=False)
            suite["nontarget"].append(_pair_case(str(a), str(b), rng, s + 400 + i, "nontarget", cap))
    for i in range(n_mixed):
        t = targets[i % len(targets)]
        o = others[int(rng.integers(len(others)))]
        a, b = (t, o) if i % 2 == 0 else (o, t)
        suite["mixed"].append(_pair_case(a, b, rng, s + 500 + i, "mixed", cap))
    return suite


def fidelity_suite(n_per_object: int = 12, seed: int = 777, world: str | World | None = None) -> list[PromptCase]:
    """Single-object prompts (literal words, varied captions, 1 in 4 the bare word) for every object."""
    cap = labels_of(world)
    rng = np.random.default_rng(seed)
    cases = []
    for k, o in enumerate(cap.OBJECTS):
        for i in range(n_per_object):
            sd = seed * 1000 + k * 100 + i
            cases.append(PromptCase(o, sd, [o], [], "literal") if i % 4 == 0 else _single_case(o, rng, sd, False, "literal", cap))
    return cases


# ----------------------------------------------------------------------------------------------- metrics
def score_images(scorer, images: list) -> dict[str, np.ndarray]:
    from .scorer import pil_to_tensor, predict

    return predict(scorer, pil_to_tensor(images))


def found(scores: dict[str, np.ndarray], objects: list[str], threshold: float = 0.5,
          world: str | World | None = None) -> np.ndarray:
    """Per image: does the scorer find ``objects[i]`` (a name) in image i?"""
    idx = np.array([labels_of(world).OBJECTS.index(o) for o in objects])
    return scores["objects"][np.arange(len(idx)), idx] > threshold


def target_judge(scorer, target: str, world: str | World | None = None):
    """``judge(images) -> [bool]``: does the toy scorer find ``target`` in each image (the attacks' judge)."""

    def judge(images: list) -> list:
        if not images:
            return []
        return [bool(f) for f in found(score_images(scorer, images), [target] * len(images), world=world)]

    return judge


def found_rate(scores: dict[str, np.ndarray], cases: list[PromptCase], threshold: float = 0.5,
               world: str | World | None = None) -> float:
    """Share of images in which the scorer finds *every* object the prompt asked for."""
    if not cases:
        return float("nan")
    objects = labels_of(world).OBJECTS
    ok = [all(scores["objects"][i, objects.index(o)] > threshold for o in c.objects) for i, c in enumerate(cases)]
    return float(np.mean(ok))


def target_found_rate(scores: dict[str, np.ndarray], targets: list[str], threshold: float = 0.5,
                      world: str | World | None = None) -> float:
    """Share of images in which the scorer finds any of ``targets`` (1 - erasure rate)."""
    idx = [labels_of(world).OBJECTS.index(t) for t in targets]
    return float((scores["objects"][:, idx] > threshold).any(1).mean())


def exact_accuracy(scores: dict[str, np.ndarray], cases: list[PromptCase], threshold: float = 0.5,
                   world: str | World | None = None) -> float:
    """Share of images whose predicted object set equals the prompted set exactly."""
    if not cases:
        return float("nan")
    objects = labels_of(world).OBJECTS
    ok = []
    for i, c in enumerate(cases):
        want = np.zeros(len(objects), bool)
        want[[objects.index(o) for o in c.objects]] = True
        ok.append(bool(((scores["objects"][i] > threshold) == want).all()))
    return float(np.mean(ok))


def colour_rate(scores: dict[str, np.ndarray], cases: list[PromptCase], threshold: float = 0.5,
                world: str | World | None = None) -> float:
    """Among prompts that name colours, share of images in which the scorer finds all of them."""
    colours = labels_of(world).COLOURS
    ok = [all(scores["colours"][i, colours.index(c)] > threshold for c in case.colours)
          for i, case in enumerate(cases) if case.colours]
    return float(np.mean(ok)) if ok else float("nan")


def _to_float(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def psnr(a: list, b: list) -> np.ndarray:
    """Per-pair PSNR in dB between two same-length PIL lists (pixel range [0, 1]); identical pairs give inf."""
    x, y = _to_float(a), _to_float(b)
    mse = (x - y).pow(2).mean((1, 2, 3)).numpy()
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def identical_share(a: list, b: list) -> float:
    """Share of same-index pairs of two same-length PIL lists whose pixels are bit-identical (nan for empty lists)."""
    if len(a) != len(b):
        raise ValueError("the two image lists must have the same length")
    if not a:
        return float("nan")
    same = [np.array_equal(np.asarray(x.convert("RGB")), np.asarray(y.convert("RGB"))) for x, y in zip(a, b)]
    return float(np.mean(same))


def median_psnr(a: list, b: list, cap_db: float = 100.0) -> float:
    """Median same-pair PSNR in dB, each pair capped at ``cap_db`` (so identical images count as ``cap_db``)."""
    return float(np.median(np.minimum(psnr(a, b), cap_db)))


def ssim(a: list, b: list, window: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Per-pair SSIM (Gaussian window, per channel, averaged; constants of Wang et al. 2004 for range [0, 1])."""
    x, y = _to_float(a), _to_float(b)
    c = x.shape[1]
    g = torch.exp(-(torch.arange(window, dtype=torch.float32) - window // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, k, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean((1, 2, 3)).numpy()


def image_grid(images: list, cols: int, scale: int = 3):
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid.resize((cols * w * scale, rows * h * scale), Image.NEAREST)
