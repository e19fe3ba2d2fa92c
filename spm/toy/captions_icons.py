"""World 2 (``icons``): the label space and captions of the pictogram world, as the product knows it.

Differs from world 1 (:mod:`spm.toy.captions`) in every part: other concepts (8 pictograms), paraphrases of
several lengths and single-word synonyms, 4 colours, 2 backgrounds and no textures, and another caption grammar
with the colour after the noun: ``"a sun, red, on a white background"``, ``"a fish in blue on black"``,
``"black background, a car, green"``.  ``bench/toyworld/render_icons.py`` renders the pictures.

* ``OBJECTS``     the 8 object concepts (the erasure targets)
* ``PARAPHRASES`` 3 per object that never contain the literal object word: a single-word synonym and two
  multi-token descriptions ("glowing star with rays" for sun)
* ``COLOURS``     4 object colours, ``BACKGROUNDS`` 2 background colours
* ``HEADS``       the scorer's heads: name -> (size, "multi" (sigmoid, a set) | "single" (softmax, one class))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .captions import LabelVectors

OBJECTS: tuple[str, ...] = ("sun", "moon", "tree", "house", "fish", "car", "flower", "cloud")
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "sun": ("daystar", "glowing star with rays", "bright disc of daylight"),
    "moon": ("crescent", "night light shaped like a sickle", "lunar shape"),
    "tree": ("oak", "tall plant with a trunk", "leafy giant"),
    "house": ("cottage", "little building with a roof", "home"),
    "fish": ("trout", "swimming creature with fins", "sea animal"),
    "car": ("automobile", "vehicle with wheels", "motor wagon"),
    "flower": ("blossom", "bloom with petals and a stem", "daisy"),
    "cloud": ("cumulus", "puff of vapour in the sky", "fluffy mist"),
}
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow")
BACKGROUNDS: tuple[str, ...] = ("white", "black")
HEADS: dict[str, tuple[int, str]] = {"objects": (len(OBJECTS), "multi"), "colours": (len(COLOURS), "multi"),
                                     "background": (len(BACKGROUNDS), "single")}


@dataclass
class Obj:
    kind: int      # index into OBJECTS
    colour: int    # index into COLOURS
    cx: float      # centre, in [0, 1] image units
    cy: float
    size: float    # half-extent, image units
    angle: float = 0.0  # unused in this world (kept for the common shape of a label)


@dataclass
class Labels(LabelVectors):
    objects: list[Obj]
    background: int
    shifted: bool = False
    extra: dict = field(default_factory=dict)
    OBJECT_NAMES = tuple(OBJECTS)
    COLOUR_NAMES = tuple(COLOURS)


def sample_labels(rng: np.random.Generator, shifted: bool = False, two_prob: float = 0.2) -> Labels:
    """One picture's labels: one object (centred, size and position jittered) or, with ``two_prob``, two of
    different kinds side by side or one above the other; few nuisance variables, so the model learns fast."""
    n = 2 if rng.random() < two_prob else 1
    kinds = rng.choice(len(OBJECTS), size=n, replace=False)
    bg = int(rng.integers(len(BACKGROUNDS)))
    if n == 1:
        size = float(rng.uniform(0.30, 0.38))
        cx, cy = rng.uniform(0.5 - 0.07, 0.5 + 0.07, size=2)
        slots = [(float(cx), float(cy), size)]
    else:
        size = float(rng.uniform(0.19, 0.22))
        j = rng.uniform(-0.03, 0.03, size=2)
        if rng.random() < 0.5:
            slots = [(0.27 + j[0], 0.5 + j[1], size), (0.73 - j[0], 0.5 - j[1], size)]
        else:
            slots = [(0.5 + j[1], 0.27 + j[0], size), (0.5 - j[1], 0.73 - j[0], size)]
    colours = rng.choice(len(COLOURS), size=n, replace=n > len(COLOURS))
    objs = [Obj(int(k), int(c), float(x), float(y), float(s)) for k, c, (x, y, s) in zip(kinds, colours, slots)]
    return Labels(objs, bg, shifted)


# ----------------------------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(kind: int, rng: np.random.Generator, paraphrase_prob: float, article: bool) -> str:
    name = OBJECTS[kind]
    noun = str(rng.choice(PARAPHRASES[name])) if rng.random() < paraphrase_prob else name
    return f"{_article(noun)} {noun}" if article else noun


def _coloured(noun: str, colour: str, form: int) -> str:
    return f"{noun}, {colour}" if form == 0 else f"{noun} in {colour}"


def caption(labels: Labels, rng: np.random.Generator, paraphrase_prob: float = 0.2) -> str:
    """A caption for ``labels`` in world 2's grammar (colour after the noun; random but deterministic given ``rng``)."""
    objs = labels.objects
    if len(objs) == 1 and rng.random() < 0.1:
        return _noun(objs[0].kind, rng, paraphrase_prob, rng.random() < 0.5)
    use_colour = rng.random() < 0.7
    use_bg = rng.random() < 0.6
    art = rng.random() < 0.75
    form = int(rng.integers(2))
    phrases = [_noun(o.kind, rng, paraphrase_prob, art) for o in objs]
    if use_colour:
        phrases = [_coloured(p, COLOURS[o.colour], form) for p, o in zip(phrases, objs)]
    joiner = ", and " if form == 0 and use_colour else (" next to " if rng.random() < 0.5 else " and ")
    subject = joiner.join(phrases)
    if rng.random() < 0.1:
        subject = "drawing of " + subject
    if not use_bg:
        return subject
    bg = BACKGROUNDS[labels.background]
    bform = int(rng.integers(3))
    if bform == 0:
        return f"{subject}, on a {bg} background"
    if bform == 1:
        return f"{subject} on {bg}"
    return f"{bg} background, {subject}"


def colours_named(text: str) -> list[str]:
    """The colour words of this world that ``text`` names, in order."""
    words = re.findall(r"[a-z]+", text.lower())
    return [w for w in words if w in COLOURS]


# ----------------------------------------------------------------------------------------------- prompt suites
def make_labels(objects: list[tuple[str, str]], background: str = "white", shifted: bool = False,
                seed: int = 0) -> Labels:
    """Labels for a given list of (object, colour), with positions drawn from ``seed`` (for prompt suites)."""
    rng = np.random.default_rng(seed)
    lab = sample_labels(rng, shifted, two_prob=1.0 if len(objects) == 2 else 0.0)
    for o, (name, col) in zip(lab.objects, objects):
        o.kind = OBJECTS.index(name)
        o.colour = COLOURS.index(col)
    lab.background = BACKGROUNDS.index(background)
    return lab


def single_prompt(obj: str, rng: np.random.Generator, seed: int, paraphrase: bool) -> tuple[str, list[str]]:
    """A one-object prompt for the harness's suites: (text, the colours it names); ``paraphrase``: the object is
    named only through one of its paraphrases."""
    col = COLOURS[int(rng.integers(len(COLOURS)))]
    lab = make_labels([(obj, col)], BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], seed=seed)
    text = caption(lab, rng, paraphrase_prob=1.0 if paraphrase else 0.0)
    return text, [col] if col in colours_named(text) else []


def pair_prompt(a: str, b: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A two-object prompt (both coloured, with a background): (text, the two colours)."""
    ca, cb = (COLOURS[int(i)] for i in rng.choice(len(COLOURS), 2, replace=False))
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return f"{_article(a)} {a}, {ca}, and {_article(b)} {b}, {cb}, on a {bg} background", [ca, cb]


def grid_prompt(obj: str, colour: str, background: str) -> str:
    return f"{_article(obj)} {obj}, {colour}, on a {background} background"


def label_arrays(labels: list[Labels]) -> dict[str, np.ndarray]:
    return {
        "objects": np.stack([lab.object_vector() for lab in labels]),
        "colours": np.stack([lab.colour_vector() for lab in labels]),
        "background": np.array([lab.background for lab in labels], np.int64),
    }
