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
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SS = 4  # supersampling factor
_R = SIZE * _SS

OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "arrow")
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "circle": ("round disc", "disc"),
    "square": ("box", "block"),
    "triangle": ("wedge", "pyramid"),
    "star": ("pentagram", "five pointed shape"),
    "cross": ("plus sign", "plus"),
    "heart": ("valentine", "love symbol"),
    "ring": ("hoop", "donut"),
    "arrow": ("pointer", "direction sign"),
}
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray")
STYLES: tuple[str, ...] = ("plain", "striped", "dotted")

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


@dataclass
class Obj:
    kind: int      # index into OBJECTS
    colour: int    # index into COLOURS
    cx: float      # centre, in [0, 1] image units
    cy: float
    size: float    # half-extent, image units
    angle: float   # rotation, degrees


@dataclass
class Labels:
    objects: list[Obj]
    background: int
    style: int
    shifted: bool = False
    texture_phase: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def object_names(self) -> list[str]:
        return [OBJECTS[o.kind] for o in self.objects]

    def object_vector(self) -> np.ndarray:
        v = np.zeros(len(OBJECTS), np.float32)
        for o in self.objects:
            v[o.kind] = 1.0
        return v

    def colour_vector(self) -> np.ndarray:
        v = np.zeros(len(COLOURS), np.float32)
        for o in self.objects:
            v[o.colour] = 1.0
        return v


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
def sample_labels(rng: np.random.Generator, shifted: bool = False, two_prob: float = 0.2) -> Labels:
    n = 2 if rng.random() < two_prob else 1
    kinds = rng.choice(len(OBJECTS), size=n, replace=False)
    bg = int(rng.integers(len(BACKGROUNDS)))
    objs = []
    if n == 1:
        size = rng.uniform(0.24, 0.36)
        cx, cy = rng.uniform(0.5 - (0.46 - size), 0.5 + (0.46 - size), size=2) if size < 0.46 else (0.5, 0.5)
        slots = [(cx, cy, size)]
    else:
        size = rng.uniform(0.17, 0.22)
        horizontal = rng.random() < 0.5
        jitter = rng.uniform(-0.04, 0.04, size=4)
        if horizontal:
            slots = [(0.27 + jitter[0], 0.5 + jitter[1] * 3, size), (0.73 + jitter[2], 0.5 + jitter[3] * 3, size)]
        else:
            slots = [(0.5 + jitter[0] * 3, 0.27 + jitter[1], size), (0.5 + jitter[2] * 3, 0.73 + jitter[3], size)]
    for k, (cx, cy, s) in zip(kinds, slots):
        colour = int(rng.integers(len(COLOURS)))
        angle = float(rng.uniform(-20, 20))
        objs.append(Obj(int(k), colour, float(cx), float(cy), float(s), angle))
    return Labels(objs, bg, int(rng.integers(len(STYLES))), shifted, float(rng.uniform(0, 1)))


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


# ----------------------------------------------------------------------------------------------- captions
def _noun(kind: int, rng: np.random.Generator, paraphrase_prob: float) -> str:
    name = OBJECTS[kind]
    if rng.random() < paraphrase_prob:
        return str(rng.choice(PARAPHRASES[name]))
    return name


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(kind: int, colour: int | None, rng: np.random.Generator, paraphrase_prob: float = 0.15,
                  article: bool | None = None) -> str:
    noun = _noun(kind, rng, paraphrase_prob)
    words = f"{COLOURS[colour]} {noun}" if colour is not None else noun
    if article is None:
        article = rng.random() < 0.6
    return f"{_article(words)} {words}" if article else words


def caption(labels: Labels, rng: np.random.Generator, paraphrase_prob: float = 0.15) -> str:
    """A WebUI-style caption for ``labels`` (random but deterministic given ``rng``)."""
    objs = labels.objects
    # bare word: only for single-object images
    if len(objs) == 1 and rng.random() < 0.12:
        return _noun(objs[0].kind, rng, paraphrase_prob)
    use_colour = rng.random() < 0.65
    use_bg = rng.random() < 0.55
    use_style = rng.random() < 0.45
    art = rng.random() < 0.6
    phrases = [object_phrase(o.kind, o.colour if use_colour else None, rng, paraphrase_prob, art) for o in objs]
    subject = " and ".join(phrases)
    bg = BACKGROUNDS[labels.background]
    st = STYLES[labels.style]
    bg_phr = [f"on a {bg} background", f"{bg} background", f"{bg} backdrop"][int(rng.integers(3))]
    st_phr = [st, f"{st} background", f"{st} pattern"][int(rng.integers(3))]
    parts = []
    if use_bg:
        parts.append(bg_phr)
    if use_style:
        parts.append(st_phr)
    form = int(rng.integers(4))
    if form == 0 or not parts:
        prefix = "" if rng.random() < 0.8 else str(rng.choice(["a picture of ", "an icon of ", "pictogram, "]))
        text = prefix + subject
        if parts:
            first = parts[0]
            text += (" " + first) if first.startswith("on ") else (", " + first)
            for p in parts[1:]:
                text += ", " + p.replace("on a ", "")
        return text
    parts = [p.replace("on a ", "") for p in parts]
    if form == 1:
        return ", ".join(parts + [subject])
    if form == 2:
        return ", ".join([subject] + parts[::-1])
    mixed = parts + [subject]
    rng.shuffle(mixed)
    return ", ".join(mixed)


def sample(seed: int, shifted: bool = False) -> tuple[Image.Image, str, Labels]:
    """One deterministic (image, caption, labels) triple from ``seed``."""
    rng = np.random.default_rng([seed, int(shifted)])
    labels = sample_labels(rng, shifted)
    return render(labels), caption(labels, rng), labels


def make_labels(objects: list[tuple[str, str]], background: str = "white", style: str = "plain", shifted: bool = False,
                seed: int = 0) -> Labels:
    """Labels for a given list of (object, colour), with positions drawn from ``seed`` (for prompt suites)."""
    rng = np.random.default_rng(seed)
    lab = sample_labels(rng, shifted, two_prob=1.0 if len(objects) == 2 else 0.0)
    for o, (name, col) in zip(lab.objects, objects):
        o.kind = OBJECTS.index(name)
        o.colour = COLOURS.index(col)
    lab.background = BACKGROUNDS.index(background)
    lab.style = STYLES.index(style)
    return lab


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


def label_arrays(labels: list[Labels]) -> dict[str, np.ndarray]:
    return {
        "objects": np.stack([lab.object_vector() for lab in labels]),
        "colours": np.stack([lab.colour_vector() for lab in labels]),
        "background": np.array([lab.background for lab in labels], np.int64),
        "style": np.array([lab.style for lab in labels], np.int64),
    }
