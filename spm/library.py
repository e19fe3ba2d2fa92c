"""The membrane folder: what is in it, which file a name means, and a cache of loaded membranes.

Host-agnostic.  A membrane's *name* is its path relative to the folder without ``.safetensors``, with
``/`` between sub-folders (``nudity``, ``styles/van_gogh``), so two files with the same stem in different
sub-folders are both reachable and never ambiguous.  A bare stem (``van_gogh``) also resolves when exactly
one file has it.  Names are validated by :func:`spm.tags.check_name` and the resolved file must lie inside
the folder (symlinks pointing out of it are refused).

Listing reads only the safetensors header (JSON metadata and tensor names), never the tensors, and only for
files that are new or changed since the last scan: descriptions are cached by ``(path, mtime_ns, size)``, so
rescanning an unchanged folder costs one directory walk and a ``stat`` per file.  :attr:`Library.signature`
changes exactly when the listing does (a file added, removed, replaced or touched), for clients that keep a
copy of the list (the WebUI panel and cards).
Loading goes through :func:`spm.checkpoint.load_membrane` (all its validation) and is cached per file,
keyed by ``(path, mtime_ns, size)``: an edited or replaced file is reloaded, a deleted one gives a clear
:class:`LibraryError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import MembraneFileError, load_membrane
from .membrane import Membrane
from .naming import arch_label
from .tags import TagError, check_name

log = logging.getLogger("spm")

SUFFIX = ".safetensors"
HEADER_MAX = 16 * 1024 * 1024


class LibraryError(ValueError):
    """A name that resolves to no usable file, or a folder that cannot be read; the message says what to do."""


@dataclass
class Entry:
    """One file of the folder, described from its header only."""

    name: str
    path: Path
    size: int
    mtime_ns: int
    concepts: list[str] = field(default_factory=list)
    surrogate: str = ""
    architecture: str = "unknown"
    context_dim: int | None = None
    steps: int | None = None
    rank: int | None = None
    modules: int = 0
    source: str = "spm"
    error: str | None = None  # why the header is unreadable; the entry is listed but not loadable

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def description(self) -> str:
        """One line for a card or a tooltip."""
        if self.error:
            return f"unreadable: {self.error}"
        bits = [f"erases: {', '.join(self.concepts) or '(no concepts in metadata)'}"]
        if self.surrogate:
            bits.append(f"→ {self.surrogate}")
        bits.append(arch_label(self.architecture))
        if self.steps:
            bits.append(f"{self.steps} steps")
        return " · ".join(bits)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "file": str(self.path), "concepts": self.concepts, "surrogate": self.surrogate,
            "architecture": self.architecture, "context_dim": self.context_dim, "steps": self.steps,
            "rank": self.rank, "modules": self.modules, "format": self.source, "error": self.error,
        }


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("empty or truncated file")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > HEADER_MAX:
            raise ValueError("not a safetensors file (bad header length)")
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError("truncated safetensors header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header


def _steps_of(training: Any) -> int | None:
    if not isinstance(training, dict):
        return None
    done = training.get("steps_done")  # what SPM's trainer actually did (an interrupted run: fewer than planned)
    if isinstance(done, int) and not isinstance(done, bool) and done >= 0:
        return done
    for key in ("steps", "iterations", "max_train_steps", "train_steps"):
        v = training.get(key)
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
    return None


def _fill_from_header(e: Entry, header: dict) -> list[str]:
    """Fill ``e`` from a parsed header; returns the ``lora_down`` keys. Raises on malformed headers."""
    meta = header.get("__metadata__") or {}
    keys = [k for k in header if k != "__metadata__"]
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    e.modules = len(downs)
    ranks = set()
    for k in downs:
        shape = (header.get(k) or {}).get("shape") or []
        if shape:
            ranks.add(int(shape[0]))
        if k.endswith("attn2_to_k.lora_down.weight") and len(shape) >= 2 and e.context_dim is None:
            e.context_dim = int(shape[1])
    e.rank = max(ranks) if ranks else None
    try:
        concepts = json.loads(meta["spm_concepts"]) if "spm_concepts" in meta else None
    except json.JSONDecodeError:
        concepts = None
    if isinstance(concepts, list):
        e.concepts = [str(c) for c in concepts]
    else:
        e.source = "reference"
        e.concepts = [c.strip() for c in str(meta.get("prompts", "")).split(",") if c.strip()]
    e.surrogate = str(meta.get("spm_surrogate", ""))
    from .naming import describe_architecture

    e.architecture = meta.get("spm_architecture") or (describe_architecture(e.context_dim) if e.context_dim else "unknown")
    try:
        e.steps = _steps_of(json.loads(meta.get("spm_training", "{}") or "{}"))
    except json.JSONDecodeError:
        e.steps = None
    return downs


def describe_file(path: Path, name: str, st: os.stat_result | None = None) -> Entry:
    """An :class:`Entry` from the header of ``path`` (errors are recorded, not raised); ``st``: its ``stat``."""
    st = path.stat() if st is None else st
    e = Entry(name=name, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
    try:
        header = _read_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        e.error = str(getattr(exc, "strerror", None) or exc)
        return e
    try:
        downs = _fill_from_header(e, header)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:  # a header of the wrong shape: one bad file
        e.error = f"unreadable safetensors header ({type(exc).__name__}: {exc})"
        return e
    if not downs:
        e.error = "no membrane tensors (lora_unet_….lora_down.weight) in the file"
    return e


class Library:
    """A membrane folder.  Thread-safe; :meth:`refresh` rescans, :meth:`load` caches."""

    def __init__(self, folder: str | os.PathLike, cache_size: int = 16,
                 unknown_hint: str = "press refresh after adding files"):
        self.folder = Path(folder)
        self.cache_size = cache_size
        self.unknown_hint = unknown_hint  # what an unknown name's error suggests ("" for none: a command-line scan)
        self._entries: dict[str, Entry] = {}
        self._cache: OrderedDict[Path, tuple[tuple[int, int], Membrane]] = OrderedDict()
        self._described: dict[Path, tuple[tuple[int, int], Entry]] = {}
        self._skipped: dict[Path, str] = {}
        self._lock = threading.RLock()
        self.problem: str | None = None
        self.signature: str = ""
        self.headers_read = 0  # how many headers :meth:`refresh` has parsed so far (the cache's effect)

    # --- listing -----------------------------------------------------------------------------
    def refresh(self) -> list[Entry]:
        """Rescan the folder (recursively). A missing or unreadable folder gives an empty list and :attr:`problem`."""
        entries: dict[str, Entry] = {}
        problem = None
        root = self.folder
        if not root.exists():
            problem = f"the membrane folder {root} does not exist (create it, or start the WebUI once to create it)"
        elif not root.is_dir():
            problem = f"the membrane folder {root} is not a folder"
        else:
            try:
                # rglob does not descend into symlinked folders (Python 3.10-3.13), so only a file that is itself
                # a link can lead out of the folder: those are checked with a full resolve, the others cost a stat
                files = sorted(p for p in root.rglob("*") if p.suffix.lower() == SUFFIX)
            except OSError as exc:
                files = []
                problem = f"the membrane folder {root} cannot be read: {exc.strerror or exc}"
            with self._lock:
                described = dict(self._described)
            fresh: dict[Path, tuple[tuple[int, int], Entry]] = {}
            parsed = 0
            skipped: dict[Path, str] = {}
            for path in files:
                try:
                    st = path.lstat()
                    if stat.S_ISLNK(st.st_mode):
                        self._inside(path)
                        st = path.stat()
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    key = (st.st_mtime_ns, st.st_size)
                    hit = described.get(path)
                    if hit is not None and hit[0] == key:
                        entry = hit[1]
                    else:
                        name = "/".join(path.relative_to(root).with_suffix("").parts)
                        check_name(name)
                        entry = describe_file(path, name, st)
                        parsed += 1
                    fresh[path] = (key, entry)
                    entries[entry.name] = entry
                except (TagError, LibraryError, OSError) as exc:
                    skipped[path] = str(exc)
                    if self._skipped.get(path) != skipped[path]:  # once per file and reason, not on every rescan
                        log.warning("SPM: skipping %s: %s", path, exc)
            with self._lock:
                self._described = fresh
                self._skipped = skipped
                self.headers_read += parsed
        digest = hashlib.sha1((problem or "").encode("utf8"))
        for name, e in entries.items():
            digest.update(f"\0{name}\0{e.mtime_ns}\0{e.size}".encode("utf8"))
        with self._lock:
            self._entries = entries
            self.problem = problem
            self.signature = digest.hexdigest()[:16]
        return list(entries.values())

    @property
    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    # --- resolution --------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        real = path.resolve()
        root = self.folder.resolve()
        if real != root and root not in real.parents:
            raise LibraryError(f"{path} points outside the membrane folder {root}; refused")
        return real

    def resolve(self, name: str) -> Path:
        """The file a name means. :class:`LibraryError` for unsafe, unknown or ambiguous names."""
        try:
            name = check_name(name)
        except TagError as e:
            raise LibraryError(str(e)) from None
        with self._lock:
            entries = self._entries
        if name in entries:
            return self._inside(entries[name].path)
        path = self.folder / (name + SUFFIX)
        if path.is_file():
            return self._inside(path)
        if "/" not in name:
            hits = [e for e in entries.values() if e.stem == name]
            if len(hits) == 1:
                return self._inside(hits[0].path)
            if len(hits) > 1:
                raise LibraryError(f"membrane name {name!r} is ambiguous: use one of {', '.join(sorted(e.name for e in hits))}")
        near = sorted(n for n in entries if name.lower() in n.lower())[:5]
        hint = f"; similar: {', '.join(near)}" if near else ""
        after = f" ({self.unknown_hint})" if self.unknown_hint else ""
        raise LibraryError(f"no membrane named {name!r} in {self.folder}{hint}{after}")

    def canonical_name(self, name: str) -> str:
        """The listed name for ``name`` (``van_gogh`` → ``styles/van_gogh``), after :meth:`resolve`."""
        path = self.resolve(name)
        rel = path.relative_to(self.folder.resolve()).with_suffix("")
        return "/".join(rel.parts)

    # --- loading -----------------------------------------------------------------------------
    def load(self, name: str) -> Membrane:
        """The validated membrane for ``name``, from the cache when the file is unchanged."""
        path = self.resolve(name)
        canonical = self.canonical_name(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise LibraryError(f"{canonical}: the file was deleted or moved since the list was made; press refresh") from None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit[0] == key:
                self._cache.move_to_end(path)
                return hit[1]
        try:
            membrane = load_membrane(path, name=canonical)
        except MembraneFileError as e:
            raise LibraryError(str(e)) from None
        except OSError as e:
            raise LibraryError(f"{canonical}: cannot be read ({e.strerror or e}); press refresh") from None
        with self._lock:
            self._cache[path] = (key, membrane)
            self._cache.move_to_end(path)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return membrane

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


__all__ = ["Entry", "Library", "LibraryError", "SUFFIX", "describe_file"]
