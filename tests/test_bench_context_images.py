"""``bench.context_images``: the trainer's recorded context prompts judged on images, without and with a membrane."""

import json

import pytest

from bench import context_images as ci

pytestmark = pytest.mark.usefixtures("one_thread")


def _membrane(folder, name, contexts):
    """A membrane over the shipped toy UNet that does nothing (``lora_up`` zero), with ``contexts`` recorded."""
    from spm import toy
    from spm.checkpoint import save_membrane
    from spm.membrane import Membrane, MembraneInfo
    from spm.naming import context_dim, find_targets

    unet = toy.load("toy").unet
    info = MembraneInfo(concepts=["circle"], context_dim=context_dim(unet),
                        training={"context_prompts": {"circle": contexts} if contexts else {},
                                  "erasure": {"erased": False, "signal": 0.5,
                                              "signal_parts": {"alone": 1.1, "in_context": 0.5}}})
    save_membrane(Membrane.for_targets(find_targets(unet), info=info, name=name), folder / f"{name}.safetensors")


def test_a_membrane_that_does_nothing_keeps_every_context_image(tmp_path, capsys):
    _membrane(tmp_path, "idle", [["this the circle", "this the"], ["circle by near that", "by near that"]])
    _membrane(tmp_path, "old", [])
    out = tmp_path / "r.json"
    ci.main(["--world", "toy", "--membranes", str(tmp_path), "--seeds", "2", "--threads", "1", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads(out.read_text())
    row = res["objects"]["idle"]["circle"]
    assert row["images"] == 4 and row["base_drew"] >= 3  # the toy model draws a circle for these prompts
    assert row["kept"] == row["base_drew"] and row["new"] == 0 and row["erasure"] == 0.0
    assert row["verdict"] == "not erased" and row["signal_parts"]["in_context"] == 0.5
    assert "skipped" in res["objects"]["old"]["circle"]
    assert res["summary"]["verdict_vs_context_images"]["not erased"]["some_kept"] == 1


@pytest.mark.parametrize("argv, what", [(["--world", "nope"], "--world"), (["--seeds", "0"], "--seeds"),
                                        (["--membranes", "/no/such/dir"], "no such folder")])
def test_bad_arguments_get_a_message(argv, what, capsys):
    with pytest.raises(SystemExit) as e:
        ci.main(argv)
    assert e.value.code == 2 and what in capsys.readouterr().err


def test_a_missing_object_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ci.main(["--world", "toy", "--membranes", str(tmp_path), "--objects", "circle"])
    assert "circle" in capsys.readouterr().err


def test_a_membrane_for_another_world_is_refused_with_a_message(tmp_path, capsys):
    _membrane(tmp_path, "idle", [["this the circle", "this the"]])  # world 1's text width; toy2's is another
    with pytest.raises(SystemExit) as e:
        ci.main(["--world", "toy2", "--membranes", str(tmp_path), "--seeds", "1", "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "idle:" in capsys.readouterr().err
