"""The toy world's label space and captions: the shapes world's vocabulary, as the product knows it.

The text side of the toy world (``bench/toyworld/data.py`` renders the pictures): the 8 object concepts that the
shipped toy models know and can erase, their paraphrases, colours, backgrounds and textures, the labels of one
picture and the WebUI-style captions made from them.

* ``OBJECTS``     the 8 object concepts (the erasure targets)
* ``PARAPHRASES`` 2 paraphrases per object that never contain the literal object word
* ``COLOURS``     6 object colours, ``BACKGROUNDS`` 3 background colours, ``STYLES`` 3 background textures
* ``HEADS``       the scorer's heads: name -> (size, "multi" (sigmoid, a set) | "single" (softmax, one class))

Every world's captions module has the same interface (``OBJECTS``, ``PARAPHRASES``, ``COLOURS``, ``BACKGROUNDS``,
``HEADS``, ``sample_labels``, ``caption``, ``label_arrays``, ``single_prompt``, ``pair_prompt``, ``grid_prompt``);
world 2's is :mod:`spm.toy.captions_icons`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
HEADS: dict[str, tuple[int, str]] = {"objects": (len(OBJECTS), "multi"), "colours": (len(COLOURS), "multi"),
                                     "background": (len(BACKGROUNDS), "single"), "style": (len(STYLES), "single")}


@dataclass
class Obj:
    kind: int      # index into OBJECTS
    colour: int    # index into COLOURS
    cx: float      # centre, in [0, 1] image units
    cy: float
    size: float    # half-extent, image units
    angle: float   # rotation, degrees


class LabelVectors:
    """What every world's ``Labels`` derives from its objects, in that world's label space (the subclass sets
    ``OBJECT_NAMES`` and ``COLOUR_NAMES``; plain class attributes, not dataclass fields)."""

    OBJECT_NAMES: tuple = ()
    COLOUR_NAMES: tuple = ()

    @property
    def object_names(self) -> list[str]:
        return [self.OBJECT_NAMES[o.kind] for o in self.objects]

    def object_vector(self) -> np.ndarray:
        v = np.zeros(len(self.OBJECT_NAMES), np.float32)
        for o in self.objects:
            v[o.kind] = 1.0
        return v

    def colour_vector(self) -> np.ndarray:
        v = np.zeros(len(self.COLOUR_NAMES), np.float32)
        for o in self.objects:
            v[o.colour] = 1.0
        return v


@dataclass
class Labels(LabelVectors):
    objects: list[Obj]
    background: int
    style: int
    shifted: bool = False
    texture_phase: float = 0.0
    extra: dict = field(default_factory=dict)
    OBJECT_NAMES = tuple(OBJECTS)
    COLOUR_NAMES = tuple(COLOURS)


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


def label_arrays(labels: list[Labels]) -> dict[str, np.ndarray]:
    return {
        "objects": np.stack([lab.object_vector() for lab in labels]),
        "colours": np.stack([lab.colour_vector() for lab in labels]),
        "background": np.array([lab.background for lab in labels], np.int64),
        "style": np.array([lab.style for lab in labels], np.int64),
    }


# ----------------------------------------------------------------------------------------------- prompt suites
def single_prompt(obj: str, rng: np.random.Generator, seed: int, paraphrase: bool) -> tuple[str, list[str]]:
    """A one-object prompt for the harness's suites: (text, the colours it names); ``paraphrase``: the object is
    named only through one of its paraphrases."""
    col = COLOURS[int(rng.integers(len(COLOURS)))]
    lab = make_labels([(obj, col)], BACKGROUNDS[int(rng.integers(3))], STYLES[int(rng.integers(3))], seed=seed)
    text = caption(lab, rng, paraphrase_prob=1.0 if paraphrase else 0.0)
    return text, [col] if col in text else []


def pair_prompt(a: str, b: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A two-object prompt (both coloured, with a background): (text, the two colours)."""
    ca, cb = rng.choice(len(COLOURS), 2, replace=False)
    bg = BACKGROUNDS[int(rng.integers(3))]
    pa = object_phrase(OBJECTS.index(a), int(ca), rng, 0.0, True)
    pb = object_phrase(OBJECTS.index(b), int(cb), rng, 0.0, True)
    return f"{pa} and {pb} on a {bg} background", [COLOURS[int(ca)], COLOURS[int(cb)]]


def grid_prompt(obj: str, colour: str, background: str) -> str:
    return f"a {colour} {obj} on a {background} background"
