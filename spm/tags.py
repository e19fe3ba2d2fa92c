"""The ``<spm:…>`` prompt tag and the ``name:weight, …`` list: parsing, validation, formatting.

Host-agnostic, pure functions.  Accepted forms::

    <spm:NAME>            weight = the default (1.0 unless the caller says otherwise)
    <spm:NAME:WEIGHT>     WEIGHT a finite decimal number, e.g. 0.8, -1, 1e-1

``NAME`` is a membrane's name in the membrane folder: its path relative to the folder, without the
``.safetensors`` suffix, with ``/`` between sub-folders (``styles/van_gogh``).  Any Unicode letters are
allowed.  Refused, each with its own message: an empty name (``<spm:>``), a third field
(``<spm:a:b:c>`` — the Lora-style text-encoder weight has no meaning for SPM, which adapts only the
UNet), a weight that is not a finite number (``<spm:x:abc>``, ``nan``, ``inf``), and any name that could
leave the folder (``..``, absolute paths, backslashes, drive letters, empty path segments, control
characters).

The WebUI finds extra-network tags with ``<(\\w+):([^>]+)>`` and splits the arguments on ``:``; these
functions see exactly the same tags (``<spm:>`` is the one form the WebUI does not match, and so leaves
in the prompt: we report it).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

TAG_RE = re.compile(r"<spm:([^>]*)>")
NAME_MAX = 200


@dataclass(frozen=True)
class Tag:
    """One well-formed tag. ``weight`` is None when the tag gives none (the caller's default applies)."""

    name: str
    weight: float | None
    text: str


@dataclass(frozen=True)
class TagProblem:
    """A tag that was ignored, and why (a sentence fit to show the user)."""

    text: str
    message: str


class TagError(ValueError):
    """A malformed tag or an unsafe membrane name."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a membrane in the folder, or None when it can."""
    if not name or not name.strip():
        return "the membrane name is empty"
    if len(name) > NAME_MAX:
        return f"the membrane name is longer than {NAME_MAX} characters"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return "the membrane name contains control characters"
    if "\\" in name:
        return "use '/' between sub-folders, not '\\'"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute paths are not allowed; names are relative to the membrane folder"
    parts = name.split("/")
    if any(part in ("..", ".") for part in parts):
        return "'..' and '.' are not allowed in membrane names (a name cannot leave the membrane folder)"
    if any(not part.strip() for part in parts):
        return "the membrane name has an empty path segment"
    if any(c in name for c in ":<>,"):
        return "':', ',', '<' and '>' cannot appear in membrane names (rename the file)"
    return None


def check_name(name: str) -> str:
    """``name`` stripped of surrounding spaces, or :class:`TagError` naming the problem."""
    name = name.strip()
    problem = name_problem(name)
    if problem:
        raise TagError(f"invalid membrane name {name!r}: {problem}")
    return name


def parse_weight(text: str) -> float:
    """A finite float from ``text`` or :class:`TagError`."""
    t = text.strip()
    try:
        w = float(t)
    except ValueError:
        raise TagError(f"weight {t!r} is not a number (write e.g. 0.8)") from None
    if not math.isfinite(w):
        raise TagError(f"weight {t!r} is not a finite number")
    return w


def parse_tag_args(args: str) -> tuple[str, float | None]:
    """The inside of ``<spm:…>`` → (name, weight or None); :class:`TagError` when malformed."""
    fields = args.split(":")
    if len(fields) > 2:
        raise TagError(f"too many ':' fields ({len(fields)}); write <spm:NAME> or <spm:NAME:WEIGHT>")
    name = check_name(fields[0])
    weight = parse_weight(fields[1]) if len(fields) == 2 else None
    return name, weight


def parse_tags(prompt: str) -> tuple[list[Tag], list[TagProblem]]:
    """All ``<spm:…>`` tags of ``prompt``, in order, and the problems of the malformed ones."""
    tags: list[Tag] = []
    problems: list[TagProblem] = []
    for m in TAG_RE.finditer(prompt or ""):
        try:
            name, weight = parse_tag_args(m.group(1))
        except TagError as e:
            problems.append(TagProblem(m.group(0), f"{m.group(0)} ignored: {e}"))
            continue
        tags.append(Tag(name, weight, m.group(0)))
    return tags, problems


def tag_weights(prompt: str, default: float = 1.0) -> tuple[dict[str, float], list[TagProblem]]:
    """``{name: weight}`` from the tags of one prompt (a later tag for the same name wins)."""
    tags, problems = parse_tags(prompt)
    return {t.name: (default if t.weight is None else t.weight) for t in tags}, problems


def strip_tags(prompt: str) -> str:
    """``prompt`` without its ``<spm:…>`` tags (malformed ones included)."""
    return TAG_RE.sub("", prompt or "")


def format_tag(name: str, weight: float = 1.0) -> str:
    """``<spm:NAME:WEIGHT>`` for a valid name (the text a card click inserts)."""
    return f"<spm:{check_name(name)}:{format_number(weight)}>"


def format_number(w: float) -> str:
    """Short, round-trippable: 1.0, 0.8, 0.125."""
    r = repr(float(w))
    return r if len(r) <= 8 else f"{w:.4g}"


def parse_weight_list(text: str, default: float = 1.0) -> tuple[dict[str, float], list[str]]:
    """``"nudity:1.0, styles/van_gogh:0.8, cat"`` → ``{name: weight}`` and problem messages.

    The format of the panel's weight field and of the ``SPM:`` infotext.  Entries are separated by
    commas (or new lines); an entry without ``:WEIGHT`` gets ``default``.
    """
    out: dict[str, float] = {}
    problems: list[str] = []
    for raw in re.split(r"[,\n]", text or ""):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, weight = entry.rpartition(":")
        if not sep:
            name, weight = entry, ""
        try:
            n = check_name(name)
            out[n] = parse_weight(weight) if weight.strip() else default
        except TagError as e:
            problems.append(f"{entry!r} ignored: {e}")
    return out, problems


def format_weight_list(weights: dict[str, float]) -> str:
    """``{name: weight}`` → ``"nudity:1.0, van_gogh:0.8"`` (insertion order)."""
    return ", ".join(f"{n}:{format_number(w)}" for n, w in weights.items())


__all__ = [
    "NAME_MAX", "TAG_RE", "Tag", "TagError", "TagProblem", "check_name", "format_number", "format_tag",
    "format_weight_list", "name_problem", "parse_tag_args", "parse_tags", "parse_weight", "parse_weight_list",
    "strip_tags", "tag_weights",
]
