"""Fuzzing (hypothesis) of the membrane file loader and of the ``<spm:…>`` tag parser.

Loader: random bytes, random safetensors-looking headers with random tensors, and mutations of a real
membrane file must either load or raise :class:`MembraneFileError` — never another exception, never hang.
Tags: the parsers raise nothing but :class:`TagError` (``parse_tags`` raises nothing at all), valid tags
round-trip, and no accepted name can leave the membrane folder.

Bounded: a fixed number of examples per test, no example database, so the file runs in well under 30 s.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from spm.checkpoint import MembraneFileError, load_membrane
from spm.membrane import Membrane
from spm.naming import find_targets

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@contextmanager
def no_hang(seconds: int = 60):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def boom(signum, frame):
        raise TimeoutError(f"fuzz example did not finish within {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def real_file_bytes():
    """A real (small) membrane file: three targets of the tiny UNet, written by safetensors."""
    from tests.archs import tiny_diffusers_unet

    targets = find_targets(tiny_diffusers_unet())[:3]
    m = Membrane.for_targets(targets, name="real")
    from spm.checkpoint import metadata_for

    return save(m.reference_state_dict(), metadata=metadata_for(m))


def load_bytes(tmp_path, data: bytes, name: str = "fuzz.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    with no_hang():
        try:
            return load_membrane(p)
        except MembraneFileError as e:
            assert str(e)  # a message, naming something
            return None


# --- loader ------------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes(tmp_path_factory, data):
    assert load_bytes(tmp_path_factory.mktemp("rb"), data) is None


STEMS = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_x", "lora_te_text_model_x", "junk"]
PARTS = [".lora_down.weight", ".lora_up.weight", ".alpha", ""]
DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "XYZ": 4}

entry = st.fixed_dictionaries({
    "key": st.tuples(st.sampled_from(STEMS), st.sampled_from(PARTS)).map("".join),
    "dtype": st.sampled_from(sorted(DTYPES)),
    "shape": st.lists(st.integers(0, 5), max_size=4),
    "consistent": st.booleans(),
    "offsets": st.one_of(st.tuples(st.integers(-2, 80), st.integers(-2, 80)).map(list),
                         st.lists(st.one_of(st.integers(-2, 80), st.text(max_size=2), st.booleans(), st.none()), max_size=3),
                         st.none(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
})
meta_value = st.one_of(st.text(max_size=20), st.integers(), st.lists(st.integers(), max_size=2), st.none())


@FUZZ
@given(entries=st.lists(entry, max_size=6), meta=st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["prompts", "spm_concepts", "spm_training", "spm_format_version", "rank", "alpha", "x"]),
    meta_value, max_size=4)), payload=st.binary(max_size=256), extra=st.integers(-8, 8))
def test_random_headers(tmp_path_factory, entries, meta, payload, extra):
    """Headers that look like safetensors: consistent or lying sizes, odd dtypes/shapes/metadata."""
    header: dict = {}
    pos = 0
    for e in entries:
        if e["consistent"]:
            n = DTYPES[e["dtype"]] * math.prod(e["shape"])
            offs = [pos, pos + n]
            pos += n
        else:
            offs = e["offsets"]
        header[e["key"]] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": offs}
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    body = (payload * (pos // max(len(payload), 1) + 1))[:pos] if payload else bytes(pos)
    data = struct.pack("<Q", max(len(raw) + extra, 0)) + raw + body
    m = load_bytes(tmp_path_factory.mktemp("rh"), data)
    if m is not None:  # whatever loads is usable: finite, low-rank, one layer per stem
        for layer in m.layers.values():
            assert torch.isfinite(layer.lora_down.weight).all() and torch.isfinite(layer.lora_up.weight).all()
            assert layer.rank >= 1 and math.isfinite(float(layer.alpha))


@FUZZ
@given(ops=st.lists(st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]),
                              st.floats(0, 1, allow_nan=False), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_real_file(tmp_path_factory, real_file_bytes, ops):
    data = bytearray(real_file_bytes)
    for op, where, byte in ops:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if not data:
            break
        if op == "flip":
            data[i] ^= 1 << (byte % 8)
        elif op == "set":
            data[i] = byte
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = bytes([byte]) * (1 + byte % 7)
        else:
            del data[i:i + 1 + byte % 7]
    load_bytes(tmp_path_factory.mktemp("mu"), bytes(data))


def test_real_file_loads(tmp_path, real_file_bytes):
    """The unmutated file loads (so the mutation test starts from a valid file)."""
    assert load_bytes(tmp_path, real_file_bytes) is not None


# --- tags --------------------------------------------------------------------------------------
tags = pytest.importorskip("spm.tags")

name_chars = st.sampled_from(list("abcXYZ_- .éßжк漢/\\:<>,") + ["..", "\x00", "\u200b", "C:"])
any_name = st.lists(name_chars, max_size=12).map("".join)
weight_text = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=6),
                        st.sampled_from(["1", "-0.5", "1e-1", "nan", "inf", "abc", ""]))


@FUZZ
@given(prompt=st.text(max_size=80), inner=st.lists(st.tuples(any_name, st.one_of(st.none(), weight_text)), max_size=3))
def test_tag_parser_never_raises(prompt, inner):
    text = prompt + "".join(f"<spm:{n}>" if w is None else f"<spm:{n}:{w}>" for n, w in inner)
    found, problems = tags.parse_tags(text)
    for t in found:
        assert tags.name_problem(t.name) is None
        assert t.weight is None or math.isfinite(t.weight)
    assert all(p.message for p in problems)
    weights, _ = tags.tag_weights(text)
    assert set(weights) == {t.name for t in found}
    stripped = tags.strip_tags(text)
    assert len(stripped) == len(text) - sum(len(t.text) for t in found) - sum(len(p.text) for p in problems)
    tags.parse_weight_list(text)  # the panel's list format: never raises either


@FUZZ
@given(name=any_name, weight=st.one_of(st.none(), weight_text))
def test_tag_args_raise_only_tag_error(name, weight):
    args = name if weight is None else f"{name}:{weight}"
    try:
        n, w = tags.parse_tag_args(args)
    except tags.TagError as e:
        assert str(e)
        return
    assert tags.name_problem(n) is None and (w is None or math.isfinite(w))


valid_segment = st.text(alphabet=st.sampled_from(list("abcxyz_-0123456789éßжк漢 ")), min_size=1, max_size=8).filter(
    lambda s: s.strip() not in ("", ".", ".."))
valid_name = st.lists(valid_segment, min_size=1, max_size=3).map("/".join).filter(lambda n: tags.name_problem(n) is None)


@FUZZ
@given(name=valid_name, weight=st.floats(-1e6, 1e6, allow_nan=False))
def test_valid_tags_round_trip(name, weight):
    text = tags.format_tag(name, weight)
    found, problems = tags.parse_tags(f"a photo, {text}, more words")
    assert problems == [] and len(found) == 1
    assert found[0].name == name.strip()
    assert found[0].weight == pytest.approx(weight, rel=1e-3, abs=1e-3)
    assert found[0].weight == float(tags.format_number(weight))
    listed, probs = tags.parse_weight_list(tags.format_weight_list({name.strip(): weight}))
    assert probs == [] and list(listed) == [name.strip()]


@FUZZ
@given(name=any_name)
def test_no_accepted_name_leaves_the_folder(tmp_path_factory, name):
    root = os.path.realpath(str(tmp_path_factory.getbasetemp()))
    try:
        ok = tags.check_name(name)
    except tags.TagError:
        return
    target = os.path.normpath(os.path.join(root, ok + ".safetensors"))
    assert target.startswith(root + os.sep)
    assert ".." not in ok.split("/") and not os.path.isabs(ok)


@pytest.mark.parametrize("bad", ["../../x", "..", "a/../../b", "/etc/passwd", "C:/x", "a\\..\\b", "a//b", "./a"])
def test_traversal_refused(bad):
    with pytest.raises(tags.TagError):
        tags.check_name(bad)
    found, problems = tags.parse_tags(f"<spm:{bad}:1>")
    assert found == [] and len(problems) == 1


# --- library listing -------------------------------------------------------------------------------
library = pytest.importorskip("spm.library")

json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=3)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                          max_leaves=6)


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["__metadata__", "lora_unet_x_attn2_to_k.lora_down.weight", "other"]),
                              json_value, max_size=3))
def test_library_listing_never_raises(tmp_path_factory, header):
    """Listing reads only headers and records problems per file; it must not raise on any header."""
    d = tmp_path_factory.mktemp("lib")
    raw = json.dumps(header).encode()
    (d / "odd.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with no_hang():
        entries = library.Library(d).refresh()
    assert [e.name for e in entries] == ["odd"]
