"""Bad input never crashes a generation or loses data: each case gets a clear error naming the cause.

Complements tests/test_checkpoint.py (which covers the basic truncation, NaN, text-encoder keys, pickle
suffixes, missing alpha and the SD1→SDXL message at the resolve level) with: truncation at every kind of
cut point, headers that lie, wrong dtypes, Inf, mismatched ranks, missing halves, shapes that do not fit a
model of the same context width, the disk filling up during a save, files vanishing between listing and
loading, and — for each — that the membranes already attached keep working and nothing else changes.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from spm.attach import MembraneStack
from spm.checkpoint import IncompatibleMembrane, MembraneFileError, load_membrane, read_file, save_membrane
from spm.naming import file_key
from tests.archs import diffusers_unet, tiny_diffusers_unet
from tests.helpers import random_membrane

STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def header_file(path, header: dict, data: bytes = b"") -> None:
    """Write a hand-made safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def pair(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None = None, stem: str = STEM) -> dict:
    out = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        out[f"{stem}.alpha"] = alpha
    return out


@pytest.fixture(scope="module")
def unet():
    return tiny_diffusers_unet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([400, 400]), torch.randn(2, 77, 32, generator=g)


def run(unet, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


@pytest.fixture
def good_file(tmp_path, unet):
    return save_membrane(random_membrane(unet, "good", seed=11), tmp_path / "good.safetensors")


# --- truncation and corruption ---------------------------------------------------------------
@pytest.mark.parametrize("cut", ["4 bytes", "length only", "mid header", "end of header", "mid data", "one byte short"])
def test_truncated_at_every_kind_of_point(tmp_path, good_file, cut):
    data = good_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    keep = {"4 bytes": 4, "length only": 8, "mid header": 8 + n // 2, "end of header": 8 + n,
            "mid data": 8 + n + (len(data) - 8 - n) // 2, "one byte short": len(data) - 1}[cut]
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:keep])
    with pytest.raises(MembraneFileError, match=r"cut\.safetensors.*(truncated|empty)"):
        load_membrane(p)
    assert good_file.read_bytes() == data  # the source is untouched


def test_header_lying_about_sizes(tmp_path):
    p = tmp_path / "liar.safetensors"
    # offsets claim 4 bytes, but shape × dtype need 8
    header_file(p, {f"{STEM}.lora_down.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(MembraneFileError, match=r"liar\.safetensors is corrupt"):
        load_membrane(p)
    # offsets past the end of the file
    header_file(p, {f"{STEM}.lora_down.weight": {"dtype": "F32", "shape": [1, 1000], "data_offsets": [0, 4000]}}, b"\0" * 40)
    with pytest.raises(MembraneFileError, match=r"truncated: its tensors need \d+ bytes, the file has \d+"):
        load_membrane(p)
    # header length larger than the file
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(MembraneFileError, match="header claims 10000 bytes"):
        load_membrane(p)
    # offsets that are not two non-negative integers
    for offs in (["a", "b"], [-4, 0], [8, 4], [0], None):
        header_file(p, {"x": {"dtype": "F32", "shape": [1], "data_offsets": offs}}, b"\0" * 8)
        with pytest.raises(MembraneFileError, match="data offsets"):
            load_membrane(p)


def test_header_not_an_object_or_not_utf8(tmp_path):
    p = tmp_path / "h.safetensors"
    raw = b"[1, 2, 3]"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MembraneFileError, match="not a JSON object"):
        load_membrane(p)
    raw = b"\xff\xfe{}"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MembraneFileError, match="unreadable safetensors header"):
        load_membrane(p)


def test_pickle_payload_renamed_safetensors_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for proto in (2, 3, 4, 5):
        p = tmp_path / f"evil{proto}.safetensors"
        p.write_bytes(pickle.dumps(Evil(), protocol=proto))
        with pytest.raises(MembraneFileError, match="pickle.*never unpickles"):
            load_membrane(p)
    for suffix in (".pth", ".pkl", ".CKPT"):
        p = tmp_path / f"evil{suffix}"
        p.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(MembraneFileError, match="pickles, which can run code"):
            load_membrane(p)
    assert not marker.exists()


def test_not_a_file_and_wrong_suffix(tmp_path):
    d = tmp_path / "folder.safetensors"
    d.mkdir()
    with pytest.raises(MembraneFileError, match="is not a file"):
        load_membrane(d)
    t = tmp_path / "notes.txt"
    t.write_text("hello")
    with pytest.raises(MembraneFileError, match=r"notes\.txt: not a \.safetensors file"):
        load_membrane(t)


def test_unreadable_file(tmp_path, good_file, monkeypatch):
    import builtins

    real_open = builtins.open

    def deny(file, *a, **k):
        if str(file) == str(good_file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(MembraneFileError, match=r"good\.safetensors cannot be read: Permission denied"):
        load_membrane(good_file)


# --- tensor contents -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["down", "up"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_inf_and_nan_weights(tmp_path, where, value):
    down, up = torch.randn(1, 32), torch.randn(320, 1)
    (down if where == "down" else up).view(-1)[0] = value
    p = tmp_path / "inf.safetensors"
    save_file(pair(down, up), str(p))
    with pytest.raises(MembraneFileError, match=f"{STEM}.lora_{where} contains NaN or Inf"):
        load_membrane(p)


def test_float64_overflowing_float32_is_inf(tmp_path):
    p = tmp_path / "f64.safetensors"
    save_file(pair(torch.full((1, 32), 1e300, dtype=torch.float64), torch.randn(320, 1)), str(p))
    with pytest.raises(MembraneFileError, match="NaN or Inf"):
        load_membrane(p)


@pytest.mark.parametrize("alpha", [torch.tensor(float("inf")), torch.tensor([1.0, 2.0]), torch.tensor(True)])
def test_bad_alpha(tmp_path, alpha):
    p = tmp_path / "alpha.safetensors"
    save_file(pair(torch.randn(1, 32), torch.randn(320, 1), alpha), str(p))
    with pytest.raises(MembraneFileError, match=f"{STEM}.alpha must be one finite number"):
        load_membrane(p)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_wrong_dtypes(tmp_path, dtype):
    p = tmp_path / "dtype.safetensors"
    save_file(pair(torch.ones(1, 32).to(dtype), torch.randn(320, 1)), str(p))
    with pytest.raises(MembraneFileError, match=rf"lora_down has dtype {dtype}; membranes are float16"):
        load_membrane(p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load(tmp_path, dtype):
    p = tmp_path / "half.safetensors"
    down, up = torch.randn(1, 32), torch.randn(320, 1)
    save_file(pair(down.to(dtype), up.to(dtype)), str(p))
    m = load_membrane(p)
    assert torch.equal(m.layers[STEM].lora_down.weight, down.to(dtype).float())


def test_mismatched_ranks_and_missing_halves(tmp_path):
    p = tmp_path / "r.safetensors"
    save_file(pair(torch.randn(2, 32), torch.randn(320, 1)), str(p))
    with pytest.raises(MembraneFileError, match="rank mismatch: lora_down has rank 2, lora_up 1"):
        load_membrane(p)
    for missing in ("lora_down", "lora_up"):
        t = pair(torch.randn(1, 32), torch.randn(320, 1), torch.tensor(1.0))
        del t[f"{STEM}.{missing}.weight"]
        save_file(t, str(p))
        with pytest.raises(MembraneFileError, match=f"{STEM} lacks its {missing} weight"):
            load_membrane(p)
    save_file({f"{STEM}.alpha": torch.tensor(1.0)}, str(p))
    with pytest.raises(MembraneFileError, match="lacks its lora_down"):
        load_membrane(p)


def test_not_low_rank_shapes_and_empty_rank(tmp_path):
    p = tmp_path / "s.safetensors"
    save_file(pair(torch.randn(1, 32, 3, 3), torch.randn(320, 1, 1, 1)), str(p))
    with pytest.raises(MembraneFileError, match=r"shapes \(1, 32, 3, 3\) / \(320, 1, 1, 1\), not a low-rank pair"):
        load_membrane(p)
    save_file(pair(torch.randn(1, 32), torch.randn(320, 1, 1, 1)), str(p))
    with pytest.raises(MembraneFileError, match="not a low-rank pair"):
        load_membrane(p)
    save_file(pair(torch.randn(0, 32), torch.randn(320, 0)), str(p))
    with pytest.raises(MembraneFileError, match="is empty"):
        load_membrane(p)


def test_unknown_and_extra_keys(tmp_path):
    p = tmp_path / "extra.safetensors"
    t = pair(torch.randn(1, 32), torch.randn(320, 1))
    save_file(dict(t, **{"model.diffusion_model.foo": torch.zeros(1), "something_else": torch.zeros(1)}), str(p))
    with pytest.raises(MembraneFileError, match="keys SPM does not understand: model.diffusion_model.foo, something_else"):
        load_membrane(p)
    save_file({"a": torch.zeros(1)}, str(p), metadata={"prompts": "x"})
    with pytest.raises(MembraneFileError, match="keys SPM does not understand: a"):
        load_membrane(p)
    save_file({}, str(p))
    with pytest.raises(MembraneFileError, match="no membrane tensors"):
        load_membrane(p)


def test_bad_metadata_values(tmp_path):
    p = tmp_path / "meta.safetensors"
    t = pair(torch.randn(1, 32), torch.randn(320, 1))
    save_file(t, str(p), metadata={"spm_format_version": "abc"})
    with pytest.raises(MembraneFileError, match="spm_format_version='abc' is not a number"):
        load_membrane(p)
    # malformed JSON fields degrade to defaults instead of failing the load
    save_file(t, str(p), metadata={"spm_training": "[1, 2]", "spm_concepts": "{not json", "prompts": "cat, dog"})
    m = load_membrane(p)
    assert m.info.training == {} and m.concepts == ["cat", "dog"]


# --- cases that must simply work -------------------------------------------------------------
def test_rank_gt_1_attaches_and_matches_by_hand(tmp_path, unet, inputs):
    m = random_membrane(unet, "r3", rank=3, seed=4)
    for layer in m.layers.values():
        layer.alpha.fill_(1.5)
    back = load_membrane(save_membrane(m, tmp_path / "r3.safetensors"))
    assert back.rank == 3 and all(layer.scale == 0.5 for layer in back.layers.values())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    mod = dict(unet.named_modules())[name]
    x = torch.randn(2, 77, 32)
    with torch.no_grad():
        base = mod(x)
        with MembraneStack(unet) as stack:
            stack.add(back)
            stack.set_strengths([[1.0], [0.25]])
            got = mod(x)
    layer = back.layers[file_key(name)]
    delta = x @ layer.down_matrix().T @ layer.up_matrix().T * 0.5
    torch.testing.assert_close(got, base + delta * torch.tensor([1.0, 0.25])[:, None, None])


def test_missing_alpha_is_rank_and_logged(tmp_path, caplog):
    p = tmp_path / "noalpha.safetensors"
    save_file(pair(torch.randn(4, 32), torch.randn(320, 4)), str(p))
    with caplog.at_level(logging.INFO, logger="spm"):
        m = load_membrane(p)
    assert float(m.layers[STEM].alpha) == 4.0 and m.layers[STEM].scale == 1.0
    assert any("no alpha" in r.getMessage() and "alpha = rank" in r.getMessage() for r in caplog.records)


# --- fitting the model, and nothing lost ---------------------------------------------------------
def test_other_architecture_exact_message_nothing_attached(tmp_path):
    """An SD1.x file on a full-size SDXL UNet: the exact message, no hook, and the stack stays usable."""
    sd1 = diffusers_unet("sd1")
    m = random_membrane(sd1, "nudity", concepts=("nudity",), std=0.0)
    p = save_membrane(m, tmp_path / "nudity.safetensors")
    xl = diffusers_unet("sdxl")
    stack = MembraneStack(xl)
    with pytest.raises(IncompatibleMembrane) as e:
        stack.add(load_membrane(p))
    assert str(e.value) == "nudity.safetensors is for SD1.x (context 768); the loaded model is SDXL (context 2048)"
    assert stack.names == [] and not any(mod._forward_hooks for mod in xl.modules()) and not xl._forward_pre_hooks
    # an SDXL-shaped membrane still attaches afterwards
    stack.add(random_membrane(xl, "ok", std=0.0))
    assert stack.names == ["ok"]
    # SD2 file on SD1: same form
    sd2 = random_membrane(diffusers_unet("sd2"), "sd2thing", std=0.0)
    with pytest.raises(IncompatibleMembrane, match=r"^sd2thing.safetensors is for SD2.x \(context 1024\); the loaded model is SD1.x \(context 768\)$"):
        MembraneStack(sd1).add(sd2)


def test_shapes_not_fitting_same_context_width(tmp_path, unet, inputs):
    """Right context width and architecture label, wrong inner widths: a clear error, and the attached
    membrane keeps working with bit-identical output."""
    good = random_membrane(unet, "good", seed=1)
    # a model with the same context width (32) but other channel widths
    from diffusers import UNet2DConditionModel

    wide = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(48, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    bad = random_membrane(wide, "bad", seed=2)
    stack = MembraneStack(unet)
    stack.add(good)
    before = run(unet, inputs)
    with pytest.raises(IncompatibleMembrane, match=r"bad.safetensors does not fit the loaded model \(custom-ctx32 \(context 32\)\): "
                                                   r"0 modules not found, \d+ with other shapes \(first: lora_unet_.*: file \d+→\d+, model \d+→\d+\)"):
        stack.add(bad)
    with pytest.raises(IncompatibleMembrane):
        stack.set_membranes([(good, 1.0), (bad, 1.0)])
    assert stack.names == ["good"]
    assert torch.equal(run(unet, inputs), before)
    # a key for a module this model does not have
    extra = random_membrane(unet, "extra", seed=5)
    extra.layers["lora_unet_down_blocks_7_attentions_0_proj_in"] = next(iter(extra.layers.values()))
    with pytest.raises(IncompatibleMembrane, match="1 modules not found, 0 with other shapes"):
        stack.add(extra)
    assert stack.names == ["good"] and torch.equal(run(unet, inputs), before)
    stack.detach()


def test_failed_load_leaves_generation_running(tmp_path, unet, inputs):
    """A library-style loop: bad files are reported and skipped, good ones attach, the UNet runs."""
    (tmp_path / "a_corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    (tmp_path / "b_pickle.safetensors").write_bytes(pickle.dumps({"x": 1}))
    save_membrane(random_membrane(unet, "c_good", seed=3), tmp_path / "c_good.safetensors")
    stack = MembraneStack(unet)
    errors = {}
    for p in sorted(tmp_path.glob("*.safetensors")):
        try:
            stack.add(load_membrane(p))
        except MembraneFileError as e:
            errors[p.name] = str(e)
    assert set(errors) == {"a_corrupt.safetensors", "b_pickle.safetensors"}
    assert all(name in msg for name, msg in errors.items())
    assert stack.names == ["c_good"]
    out = run(unet, inputs)
    assert torch.isfinite(out).all()
    stack.detach()


# --- files changing under us -----------------------------------------------------------------
def test_file_deleted_between_listing_and_loading(tmp_path, unet):
    """At the checkpoint level: a vanished file is one clear error (library level: the test below)."""
    for n in ("x", "y"):
        save_membrane(random_membrane(unet, n), tmp_path / f"{n}.safetensors")
    listing = sorted(tmp_path.glob("*.safetensors"))
    listing[0].unlink()
    with pytest.raises(MembraneFileError, match=r"x\.safetensors does not exist \(deleted or moved"):
        load_membrane(listing[0])
    assert load_membrane(listing[1]).name == "y"


def test_library_file_vanishing_mid_load_and_unreadable_folder(tmp_path, unet, inputs, monkeypatch):
    """Through spm.library: a file deleted in the window between the library's stat and the read is one
    clear error, the cached and other membranes keep working, and an unreadable folder is a reported problem."""
    library = pytest.importorskip("spm.library")
    for n in ("x", "y"):
        save_membrane(random_membrane(unet, n, seed=len(n)), tmp_path / f"{n}.safetensors")
    lib = library.Library(tmp_path)
    assert sorted(e.name for e in lib.refresh()) == ["x", "y"]
    y = lib.load("y")
    real = library.load_membrane

    def vanish(path, name=None):
        path.unlink()
        return real(path, name=name)

    monkeypatch.setattr(library, "load_membrane", vanish)
    with pytest.raises(library.LibraryError, match=r"x\.safetensors does not exist \(deleted or moved"):
        lib.load("x")
    monkeypatch.undo()
    assert lib.load("y") is y  # cached membrane unaffected
    stack = MembraneStack(unet)
    stack.add(y)
    assert torch.isfinite(run(unet, inputs)).all()
    stack.detach()
    assert [e.name for e in lib.refresh()] == ["y"]

    def denied(self, pattern):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(type(tmp_path), "rglob", denied)
    assert lib.refresh() == [] and "cannot be read: Permission denied" in lib.problem


def _enospc_after(nbytes: int):
    """A stand-in for safetensors' ``save_file`` that writes ``nbytes`` of the real file, then fails like a full disk."""
    from safetensors.torch import save

    def fake(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[:nbytes])
        raise OSError(errno.ENOSPC, "No space left on device")

    return fake


@pytest.mark.parametrize("written", [0, 100, 5000])
def test_disk_full_during_save_keeps_old_file(tmp_path, unet, monkeypatch, written):
    import safetensors.torch

    target = tmp_path / "m.safetensors"
    save_membrane(random_membrane(unet, "m", seed=1), target)
    old = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc_after(written))
    with pytest.raises(OSError) as e:
        save_membrane(random_membrane(unet, "m", seed=2), target)
    assert e.value.errno == errno.ENOSPC and "No space left" in str(e.value)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # temp file removed
    monkeypatch.undo()
    assert torch.equal(load_membrane(target).layers[STEM].lora_up.weight,
                       random_membrane(unet, "m", seed=1).layers[STEM].lora_up.weight)


def test_disk_full_at_fsync_and_interrupt(tmp_path, unet, monkeypatch):
    import os

    target = tmp_path / "m.safetensors"
    save_membrane(random_membrane(unet, "m", seed=1), target)
    old = target.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        save_membrane(random_membrane(unet, "m", seed=2), target)
    monkeypatch.undo()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_membrane(random_membrane(unet, "m", seed=3), target)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    # a first save that fails leaves nothing behind at all
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        save_membrane(random_membrane(unet, "n"), tmp_path / "new.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_read_file_returns_cpu_tensors_and_str_metadata(good_file):
    tensors, meta = read_file(good_file)
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
