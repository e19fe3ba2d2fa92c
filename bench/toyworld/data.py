"""Procedural captioned pictograms for the toy world.

Every image is a deterministic function of a seed: ``sample(seed)`` returns ``(image, caption, labels)``.
Images are 32x32 RGB (rendered at 4x and box-downsampled, so edges are anti-aliased).

* ``OBJECTS``     the 8 object concepts (the erasure targets)
* ``PARAPHRASES`` 2 paraphrases per object that never contain the literal object word
* ``COLOURS``     6 object colours, ``BACKGROUNDS`` 3 background colours, ``STYLES`` 3 background textures

Captions follow WebUI prompt habits and vary in word order, attribute presence, articles, and sometimes
are just the bare object word (``"star"``).  About a fifth of images hold two objects of different kinds.

``shifted=True`` renders the same label space with another palette and other textures (diagonal stripes,
larger dots, outlined objects): the data of the "community fine-tune".
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from spm.toy.captions import (  # noqa: F401  (re-exported: the rendering uses the product's label space)
    BACKGROUNDS,
    COLOURS,
    OBJECTS,
    PARAPHRASES,
    STYLES,
    Labels,
    Obj,
    caption,
    label_arrays,
    make_labels,
    object_phrase,
    sample_labels,
)
from spm.toy.model import IMAGE_SIZE

SIZE = IMAGE_SIZE
_SS = 4  # supersampling factor
_R = SIZE * _SS


_PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 205, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
_PALETTE_SHIFTED = {  # softer, hue-rotated "community" palette
    "red": (200, 70, 100), "green": (90, 190, 120), "blue": (70, 120, 200),
    "yellow": (225, 215, 110), "purple": (170, 100, 200), "orange": (225, 150, 80),
}
_BG = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
_BG_SHIFTED = {"white": (240, 232, 210), "black": (20, 25, 45), "gray": (120, 128, 110)}


# ----------------------------------------------------------------------------------------------- shapes
def _rot(points, cx, cy, angle):
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _shape_polys(kind: str, cx: float, cy: float, r: float, angle: float) -> tuple[list, list]:
    """Return (filled polygons, hole polygons/ellipses) in supersampled pixel units."""
    if kind == "circle":
        return [("ellipse", (cx - r, cy - r, cx + r, cy + r))], []
    if kind == "ring":
        ri = r * 0.55
        return [("ellipse", (cx - r, cy - r, cx + r, cy + r))], [("ellipse", (cx - ri, cy - ri, cx + ri, cy + ri))]
    if kind == "square":
        q = r * 0.85
        pts = [(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)]
    elif kind == "triangle":
        pts = [(cx + r * math.cos(math.radians(-90 + 120 * i)), cy + r * 1.05 * math.sin(math.radians(-90 + 120 * i)) + r * 0.18)
               for i in range(3)]
    elif kind == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    elif kind == "cross":
        w = r * 0.33
        pts = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
               (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    elif kind == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16.5, cy - y * r / 16.5 + r * 0.1))
    elif kind == "arrow":
        sw, hw, hx = r * 0.22, r * 0.62, r * 0.15
        pts = [(cx - r, cy - sw), (cx + hx, cy - sw), (cx + hx, cy - hw), (cx + r, cy), (cx + hx, cy + hw), (cx + hx, cy + sw),
               (cx - r, cy + sw)]
    else:
        raise ValueError(kind)
    return [("poly", _rot(pts, cx, cy, angle))], []


def _draw(d: ImageDraw.ImageDraw, item, fill):
    kind, geom = item
    if kind == "ellipse":
        d.ellipse(geom, fill=fill)
    else:
        d.polygon(geom, fill=fill)


# ----------------------------------------------------------------------------------------------- sampling
def _texture(style: str, shifted: bool, phase: float) -> np.ndarray:
    """Mask in [0,1] of the background texture, supersampled resolution."""
    yy, xx = np.mgrid[0:_R, 0:_R].astype(np.float32)
    if style == "plain":
        return np.zeros((_R, _R), np.float32)
    if style == "striped":
        period = 4 * _SS
        coord = (xx + yy) / math.sqrt(2) if shifted else yy
        return (((coord / period + phase) % 1.0) < 0.5).astype(np.float32)
    period = (8 if shifted else 5) * _SS
    rad = (1.6 if shifted else 1.0) * _SS
    ox = phase * period
    dx = (xx + ox) % period - period / 2
    dy = (yy + ox) % period - period / 2
    return ((dx * dx + dy * dy) < rad * rad).astype(np.float32)


def render(labels: Labels) -> Image.Image:
    bgc = np.array((_BG_SHIFTED if labels.shifted else _BG)[BACKGROUNDS[labels.background]], np.float32)
    tex = _texture(STYLES[labels.style], labels.shifted, labels.texture_phase)
    # texture: lighter on dark backgrounds, darker on light ones
    lum = bgc.mean()
    alt = bgc + (60.0 if lum < 100 else -45.0)
    arr = bgc[None, None, :] * (1 - tex[..., None]) + alt[None, None, :] * tex[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    pal = _PALETTE_SHIFTED if labels.shifted else _PALETTE
    for o in labels.objects:
        fill = pal[COLOURS[o.colour]]
        fills, holes = _shape_polys(OBJECTS[o.kind], o.cx * _R, o.cy * _R, o.size * _R, o.angle)
        if labels.shifted:  # community style: outlined objects
            outline = tuple(int(c * 0.45) for c in fill)
            big, _ = _shape_polys(OBJECTS[o.kind], o.cx * _R, o.cy * _R, o.size * _R * 1.12, o.angle)
            for it in big:
                _draw(d, it, outline)
        for it in fills:
            _draw(d, it, fill)
        if holes:
            # punch the hole back to the (textured) background
            mask = Image.new("L", (_R, _R), 0)
            md = ImageDraw.Draw(mask)
            for it in holes:
                _draw(md, it, 255)
            bg_img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
            img.paste(bg_img, (0, 0), mask)
            d = ImageDraw.Draw(img)
    return img.resize((SIZE, SIZE), Image.BOX)


def sample(seed: int, shifted: bool = False) -> tuple[Image.Image, str, Labels]:
    """One deterministic (image, caption, labels) triple from ``seed``."""
    rng = np.random.default_rng([seed, int(shifted)])
    labels = sample_labels(rng, shifted)
    return render(labels), caption(labels, rng), labels


def _render_range(args: tuple) -> tuple[np.ndarray, list[Labels]]:
    start, stop, seed, shifted, two_prob = args
    imgs = np.zeros((stop - start, SIZE, SIZE, 3), np.uint8)
    labels = []
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed * 10**7 + i, int(shifted)])
        lab = sample_labels(rng, shifted, two_prob)
        imgs[j] = np.asarray(render(lab))
        labels.append(lab)
    return imgs, labels


def dataset_arrays(n: int, seed: int, shifted: bool = False, workers: int = 1,
                   two_prob: float = 0.2) -> tuple[np.ndarray, list[Labels]]:
    """Render ``n`` images (uint8, N x 32 x 32 x 3) with labels; image i comes from seed ``seed * 10**7 + i``.

    ``two_prob`` is the share of two-object images. ``workers`` > 1 renders in processes; the result does not
    depend on it.
    """
    if workers <= 1 or n < 2000:
        return _render_range((0, n, seed, shifted, two_prob))
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
    jobs = [(int(a), int(b), seed, shifted, two_prob) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with ProcessPoolExecutor(workers) as ex:
        parts = list(ex.map(_render_range, jobs))
    return np.concatenate([p[0] for p in parts]), [lab for p in parts for lab in p[1]]

