"""The real CLIP tokenizer, built offline from the BPE vocabulary that ``open_clip_torch`` ships.

SD1.x, SD2.x and both SDXL text encoders use the same 49408-token byte-level BPE vocabulary
(``bpe_simple_vocab_16e6.txt.gz``).  ``open_clip_torch`` carries that file in its wheel; we find it
*without importing* ``open_clip`` (whose import pulls torchvision/timm) and turn it into the
``vocab.json`` + ``merges.txt`` pair that :class:`transformers.CLIPTokenizer` reads.

Token ids are therefore exactly those of OpenAI's CLIP: ``a photo of a cat`` →
``49406 320 1125 539 320 2368 49407``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77


class TokenizerUnavailable(RuntimeError):
    """The CLIP vocabulary file could not be found."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte → printable-unicode table (the standard published mapping)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def find_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package.

    ``SPM_CLIP_BPE`` may point at the file directly.
    """
    env = os.environ.get("SPM_CLIP_BPE")
    if env:
        p = Path(env)
        if p.is_file():
            return p
        raise TokenizerUnavailable(f"SPM_CLIP_BPE={env} does not name a file")
    spec = importlib.util.find_spec("open_clip")  # finds the package without executing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / BPE_FILENAME
            if p.is_file():
                return p
    raise TokenizerUnavailable(
        f"{BPE_FILENAME} not found. Install the vocabulary with "
        "`pip install --no-deps open_clip_torch` (no-deps: its own dependencies pull a CUDA torch), "
        "or set SPM_CLIP_BPE to the file."
    )


def _cache_dir() -> Path:
    base = os.environ.get("SPM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "spm"
    )
    return Path(base) / "clip-tokenizer"


def write_tokenizer_files(out_dir: str | os.PathLike, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``out_dir``.

    The result loads with ``CLIPTokenizer.from_pretrained(out_dir)`` in transformers 4.x and 5.x.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Path(bpe_path) if bpe_path else find_bpe_file()
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerUnavailable(f"{bpe} gives {len(vocab)} tokens, expected {VOCAB_SIZE}")
    tmp = out / "vocab.json.tmp"
    tmp.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / "vocab.json")
    tmp = out / "merges.txt.tmp"
    tmp.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    os.replace(tmp, out / "merges.txt")
    special = {
        "unk_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    cfg = dict(special, model_max_length=MAX_LENGTH, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return out


def tokenizer_dir() -> Path:
    """A directory holding the tokenizer files, built once and cached (``SPM_CACHE``)."""
    d = _cache_dir()
    if not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file() and (d / "tokenizer_config.json").is_file()):
        write_tokenizer_files(d)
    return d


@lru_cache(maxsize=2)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer. ``pad_token`` is ``<|endoftext|>`` for SD1.x, ``!`` for SD2.x / SDXL's second encoder."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir()), pad_token=pad_token)
    tok.model_max_length = MAX_LENGTH
    return tok


def load_tokenizer(folder: str | os.PathLike):
    """A pipeline's CLIP tokenizer from its ``tokenizer/`` folder, in either layout diffusers writes:

    * ``vocab.json`` + ``merges.txt`` (transformers 4.x): :class:`transformers.CLIPTokenizer`;
    * ``tokenizer.json`` alone (current transformers): :class:`transformers.CLIPTokenizerFast` (needs ``tokenizers``).

    Anything else raises :class:`TokenizerUnavailable` naming the files that are missing.
    """
    d = Path(folder)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(d))
    if (d / "tokenizer.json").is_file():
        try:
            from transformers import CLIPTokenizerFast
        except ImportError as e:
            raise TokenizerUnavailable(f"{d} holds only tokenizer.json, which needs the `tokenizers` package ({e})") from None
        try:
            return CLIPTokenizerFast.from_pretrained(str(d))
        except Exception as e:  # tokenizers raises its own types on a corrupt file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerUnavailable(f"{d / 'tokenizer.json'} cannot be read as a CLIP tokenizer ({first})") from None
    have = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    raise TokenizerUnavailable(f"{d}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json); "
                               f"it holds {', '.join(have) if have else 'nothing'}")
