"""Renders of world 2 (``icons``): captioned 32x32 pictograms (sun, moon, tree, house, fish, car, flower, cloud).

The label space and captions are :mod:`spm.toy.captions_icons`; this module draws them.  Every image is a
deterministic function of a seed: ``sample(seed)`` returns ``(image, caption, labels)``.  Pictures are drawn at
4x and box-downsampled (anti-aliased edges), on a plain background, upright, with little jitter: few nuisance
variables, so that a small model learns the concepts fast.

``shifted=True`` renders the same label space in the "community" style: another palette, tinted backgrounds and
dark outlines (the data of the world's fine-tune).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from spm.toy.captions_icons import (  # noqa: F401  (re-exported: the builder reads the world through this module)
    BACKGROUNDS,
    COLOURS,
    OBJECTS,
    PARAPHRASES,
    Labels,
    Obj,
    caption,
    label_arrays,
    make_labels,
    sample_labels,
)
from spm.toy.worlds import get_world

SIZE = get_world("icons").image_size
_SS = 4
_R = SIZE * _SS

_PALETTE = {"red": (215, 35, 35), "blue": (35, 80, 225), "green": (35, 165, 55), "yellow": (240, 200, 25)}
_PALETTE_SHIFTED = {"red": (230, 95, 80), "blue": (90, 140, 210), "green": (110, 185, 90), "yellow": (230, 215, 120)}
_BG = {"white": (248, 248, 248), "black": (12, 12, 12)}
_BG_SHIFTED = {"white": (236, 228, 205), "black": (28, 30, 58)}


def _parts(kind: str, cx: float, cy: float, r: float) -> list[tuple[str, str, tuple]]:
    """(role, primitive, geometry) in supersampled pixels; role: ``fill`` (object colour), ``hole`` (background),
    ``dark`` (a contrasting detail: the car's wheels)."""
    def box(x0, y0, x1, y1):
        return (cx + x0 * r, cy + y0 * r, cx + x1 * r, cy + y1 * r)

    def disc(x, y, rad):
        return box(x - rad, y - rad, x + rad, y + rad)

    def poly(pts):
        return [(cx + x * r, cy + y * r) for x, y in pts]

    if kind == "sun":
        out = [("fill", "ellipse", disc(0, 0, 0.55))]
        for i in range(8):
            a = math.radians(45 * i)
            c, s = math.cos(a), math.sin(a)
            w = 0.1
            pts = [(0.68 * c - w * s, 0.68 * s + w * c), (1.0 * c - w * s, 1.0 * s + w * c),
                   (1.0 * c + w * s, 1.0 * s - w * c), (0.68 * c + w * s, 0.68 * s - w * c)]
            out.append(("fill", "poly", poly(pts)))
        return out
    if kind == "moon":
        return [("fill", "ellipse", disc(-0.1, 0, 0.9)), ("hole", "ellipse", disc(0.35, -0.2, 0.72))]
    if kind == "tree":
        return [("fill", "ellipse", box(-0.72, -1.0, 0.72, 0.35)), ("fill", "rect", box(-0.17, 0.2, 0.17, 1.0))]
    if kind == "house":
        return [("fill", "rect", box(-0.7, -0.12, 0.7, 0.9)),
                ("fill", "poly", poly([(-0.95, -0.05), (0.0, -0.95), (0.95, -0.05)])),
                ("hole", "rect", box(-0.16, 0.35, 0.16, 0.9))]
    if kind == "fish":
        return [("fill", "ellipse", box(-0.95, -0.5, 0.45, 0.5)),
                ("fill", "poly", poly([(0.25, 0.0), (1.0, -0.55), (1.0, 0.55)])),
                ("hole", "ellipse", disc(-0.5, -0.12, 0.12))]
    if kind == "car":
        return [("fill", "rect", box(-1.0, -0.12, 1.0, 0.42)),
                ("fill", "poly", poly([(-0.58, -0.1), (-0.36, -0.58), (0.36, -0.58), (0.58, -0.1)])),
                ("dark", "ellipse", disc(-0.52, 0.45, 0.26)), ("dark", "ellipse", disc(0.52, 0.45, 0.26))]
    if kind == "flower":
        out = [("fill", "rect", box(-0.08, 0.0, 0.08, 1.0))]
        for i in range(6):
            a = math.radians(60 * i + 30)
            out.append(("fill", "ellipse", disc(0.36 * math.cos(a), -0.3 + 0.36 * math.sin(a), 0.27)))
        out.append(("hole", "ellipse", disc(0.0, -0.3, 0.16)))
        return out
    if kind == "cloud":
        return [("fill", "ellipse", disc(-0.5, 0.12, 0.4)), ("fill", "ellipse", disc(0.05, -0.12, 0.52)),
                ("fill", "ellipse", disc(0.52, 0.14, 0.38)), ("fill", "rect", box(-0.5, 0.1, 0.52, 0.52))]
    raise ValueError(kind)


def _draw(d: ImageDraw.ImageDraw, prim: str, geom, fill) -> None:
    if prim == "ellipse":
        d.ellipse(geom, fill=fill)
    elif prim == "rect":
        d.rectangle(geom, fill=fill)
    else:
        d.polygon(geom, fill=fill)


def render(labels: Labels) -> Image.Image:
    bgc = (_BG_SHIFTED if labels.shifted else _BG)[BACKGROUNDS[labels.background]]
    img = Image.new("RGB", (_R, _R), bgc)
    d = ImageDraw.Draw(img)
    pal = _PALETTE_SHIFTED if labels.shifted else _PALETTE
    dark = (70, 70, 70) if sum(bgc) > 300 else (185, 185, 185)
    for o in labels.objects:
        fill = pal[COLOURS[o.colour]]
        cx, cy, r = o.cx * _R, o.cy * _R, o.size * _R
        parts = _parts(OBJECTS[o.kind], cx, cy, r)
        if labels.shifted:  # community style: a dark outline around every filled part
            line = tuple(int(c * 0.4) for c in fill)
            for role, prim, geom in _parts(OBJECTS[o.kind], cx, cy, r * 1.1):
                if role == "fill":
                    _draw(d, prim, geom, line)
        for role, prim, geom in parts:
            _draw(d, prim, geom, fill if role == "fill" else (bgc if role == "hole" else dark))
    return img.resize((SIZE, SIZE), Image.BOX)


def sample(seed: int, shifted: bool = False) -> tuple[Image.Image, str, Labels]:
    """One deterministic (image, caption, labels) triple from ``seed``."""
    rng = np.random.default_rng([seed, int(shifted), 2])
    labels = sample_labels(rng, shifted)
    return render(labels), caption(labels, rng), labels


def _render_range(args: tuple) -> tuple[np.ndarray, list[Labels]]:
    start, stop, seed, shifted, two_prob = args
    imgs = np.zeros((stop - start, SIZE, SIZE, 3), np.uint8)
    labels = []
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed * 10**7 + i, int(shifted), 2])
        lab = sample_labels(rng, shifted, two_prob)
        imgs[j] = np.asarray(render(lab))
        labels.append(lab)
    return imgs, labels


def dataset_arrays(n: int, seed: int, shifted: bool = False, workers: int = 1,
                   two_prob: float = 0.2) -> tuple[np.ndarray, list[Labels]]:
    """Render ``n`` images (uint8, N x 32 x 32 x 3) with labels; image i comes from seed ``seed * 10**7 + i``
    (``two_prob``: the share of two-object images; ``workers`` > 1 renders in processes, same result)."""
    if workers <= 1 or n < 2000:
        return _render_range((0, n, seed, shifted, two_prob))
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
    jobs = [(int(a), int(b), seed, shifted, two_prob) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with ProcessPoolExecutor(workers) as ex:
        parts = list(ex.map(_render_range, jobs))
    return np.concatenate([p[0] for p in parts]), [lab for p in parts for lab in p[1]]
