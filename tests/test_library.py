"""The membrane folder: listing from headers, safe resolution, cache by (path, mtime, size)."""

import os

import pytest
import torch

from spm.checkpoint import save_membrane
from spm.library import Library, LibraryError, describe_file
from spm.membrane import Membrane, MembraneInfo, MembraneLayer


def tiny(name="m", concepts=("cat",), surrogate="", steps=None, ctx=32):
    layers = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": MembraneLayer("linear", ctx, 16),
        "lora_unet_down_blocks_0_attentions_0_proj_in": MembraneLayer("conv", 16, 16),
    }
    info = MembraneInfo(concepts=list(concepts), surrogate=surrogate, architecture="custom-ctx32", context_dim=ctx,
                        training={"steps": steps} if steps else {})
    return Membrane(layers, info, name=name)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "spm"
    (root / "styles").mkdir(parents=True)
    (root / "other").mkdir()
    save_membrane(tiny(concepts=("nudity",), steps=3000), root / "nudity.safetensors")
    save_membrane(tiny(concepts=("Van Gogh",), surrogate="painting"), root / "styles" / "van_gogh.safetensors")
    save_membrane(tiny(concepts=("Pikachu",)), root / "styles" / "pika.safetensors")
    save_membrane(tiny(concepts=("Pikachu 2",)), root / "other" / "pika.safetensors")
    save_membrane(tiny(concepts=("猫",)), root / "猫.safetensors")
    (root / "notes.txt").write_text("ignored")
    return root


def test_listing_is_recursive_with_metadata(folder):
    lib = Library(folder)
    entries = {e.name: e for e in lib.refresh()}
    assert set(entries) == {"nudity", "styles/van_gogh", "styles/pika", "other/pika", "猫"}
    assert entries["nudity"].concepts == ["nudity"] and entries["nudity"].steps == 3000
    vg = entries["styles/van_gogh"]
    assert vg.surrogate == "painting" and vg.context_dim == 32 and vg.rank == 1 and vg.modules == 2
    assert "Van Gogh" in vg.description() and "→ painting" in vg.description()
    assert lib.problem is None


def test_metadata_is_read_from_the_header_only(folder, tmp_path):
    src = folder / "nudity.safetensors"
    data = src.read_bytes()
    cut = tmp_path / "cut.safetensors"
    header_len = int.from_bytes(data[:8], "little")
    cut.write_bytes(data[: 8 + header_len + 4])  # tensors truncated
    e = describe_file(cut, "cut")
    assert e.error is None and e.concepts == ["nudity"]
    lib = Library(tmp_path)
    lib.refresh()
    with pytest.raises(LibraryError, match="truncated"):
        lib.load("cut")


def test_same_stem_in_subfolders(folder):
    lib = Library(folder)
    lib.refresh()
    assert lib.load("styles/pika").concepts == ["Pikachu"]
    assert lib.load("other/pika").concepts == ["Pikachu 2"]
    with pytest.raises(LibraryError, match="ambiguous.*other/pika.*styles/pika"):
        lib.resolve("pika")
    assert lib.canonical_name("van_gogh") == "styles/van_gogh"  # unique stem resolves
    assert lib.load("猫").concepts == ["猫"]


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "", "a\\b"])
def test_unsafe_names_refused(folder, bad):
    lib = Library(folder)
    lib.refresh()
    with pytest.raises(LibraryError):
        lib.resolve(bad)


def test_symlink_out_of_folder_refused(folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_membrane(tiny(), outside)
    os.symlink(outside, folder / "link.safetensors")
    lib = Library(folder)
    names = [e.name for e in lib.refresh()]
    assert "link" not in names
    with pytest.raises(LibraryError, match="outside the membrane folder"):
        lib.resolve("link")


def test_unknown_name_hint(folder):
    lib = Library(folder)
    lib.refresh()
    with pytest.raises(LibraryError, match="no membrane named 'gogh'.*styles/van_gogh"):
        lib.resolve("gogh")


def test_missing_folder_is_a_clear_problem(tmp_path):
    lib = Library(tmp_path / "nope")
    assert lib.refresh() == []
    assert "does not exist" in lib.problem


def test_deleted_between_listing_and_loading(folder):
    lib = Library(folder)
    lib.refresh()
    (folder / "nudity.safetensors").unlink()
    with pytest.raises(LibraryError, match="deleted or moved"):
        lib.load("nudity")


def test_cache_keyed_by_mtime_and_size(folder):
    lib = Library(folder)
    lib.refresh()
    a = lib.load("nudity")
    assert lib.load("nudity") is a
    path = folder / "nudity.safetensors"
    m = tiny(concepts=("nudity", "nsfw"))
    with torch.no_grad():
        next(iter(m.layers.values())).lora_up.weight.fill_(0.5)
    save_membrane(m, path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    b = lib.load("nudity")
    assert b is not a and b.concepts == ["nudity", "nsfw"]


def test_unreadable_file_is_listed_with_error(folder):
    (folder / "junk.safetensors").write_bytes(b"\x00" * 3)
    lib = Library(folder)
    e = {e.name: e for e in lib.refresh()}["junk"]
    assert e.error and "unreadable" in e.description()
    with pytest.raises(LibraryError):
        lib.load("junk")


def test_rescan_reads_only_new_or_changed_headers(folder, monkeypatch):
    """An unchanged folder costs a directory scan: no header is parsed again; a touched, replaced or new file
    is read once; a deleted one disappears; the signature changes exactly when the listing does."""
    import spm.library as library

    reads = []
    real = library._read_header
    monkeypatch.setattr(library, "_read_header", lambda path: reads.append(path.name) or real(path))
    lib = Library(folder)
    first = {e.name: e for e in lib.refresh()}
    assert len(reads) == 5 and lib.headers_read == 5
    sig = lib.signature
    reads.clear()
    again = {e.name: e for e in lib.refresh()}
    assert reads == [] and lib.signature == sig
    assert again["nudity"] is first["nudity"]  # the cached description itself
    # a touched file (same bytes, new mtime) is re-read; nothing else is
    path = folder / "nudity.safetensors"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    lib.refresh()
    assert reads == ["nudity.safetensors"] and lib.signature != sig
    # a replaced file with other metadata, a new file and a deleted file
    reads.clear()
    save_membrane(tiny(concepts=("nsfw",)), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 20_000_000))
    save_membrane(tiny(concepts=("dog",)), folder / "dog.safetensors")
    (folder / "猫.safetensors").unlink()
    entries = {e.name: e for e in lib.refresh()}
    assert sorted(reads) == ["dog.safetensors", "nudity.safetensors"]
    assert entries["nudity"].concepts == ["nsfw"] and entries["dog"].concepts == ["dog"] and "猫" not in entries
    sig2 = lib.signature
    reads.clear()
    lib.refresh()
    assert reads == [] and lib.signature == sig2
    assert Library(folder).refresh() and Library(folder).signature == ""  # not scanned yet: no signature


def test_signature_of_a_missing_folder_differs_from_an_empty_one(tmp_path):
    empty = Library(tmp_path)
    empty.refresh()
    missing = Library(tmp_path / "nope")
    missing.refresh()
    assert empty.signature and missing.signature and empty.signature != missing.signature


def test_a_skipped_file_is_reported_once_not_on_every_rescan(folder, caplog):
    save_membrane(tiny(), folder / "a,b.safetensors")  # ',' cannot appear in a tag
    lib = Library(folder)
    with caplog.at_level("WARNING", logger="spm"):
        lib.refresh()
        lib.refresh()
    assert [r.getMessage() for r in caplog.records if "a,b" in r.getMessage()] != []
    assert len([r for r in caplog.records if "a,b" in r.getMessage()]) == 1
    assert "a,b" not in lib.names()
