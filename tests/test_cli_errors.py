"""Every bad command-line argument ends in one ``error:`` line on stderr and exit 2: no traceback, no output file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spm.cli import main, parse_membrane_arg

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def membrane_file(tmp_path_factory):
    """A real (identity) membrane for the shipped toy model."""
    from spm import toy
    from spm.checkpoint import save_membrane
    from spm.membrane import Membrane, MembraneInfo
    from spm.naming import context_dim, describe_architecture, find_targets

    unet = toy.load("toy").unet
    ctx = context_dim(unet)
    m = Membrane.for_targets(find_targets(unet), info=MembraneInfo(concepts=["circle"], architecture=describe_architecture(ctx),
                                                                   context_dim=ctx), name="circle")
    f = tmp_path_factory.mktemp("m") / "circle.safetensors"
    save_membrane(m, f)
    return f


def _one_line(capsys, argv, expect: str) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, err
    return err


def _gen(tmp_path, *extra):
    return ["generate", "--model", "toy", "--prompt", "a circle", "--device", "cpu", "-o", str(tmp_path / "g.png"), *extra]


@pytest.mark.parametrize("weight, expect", [("nan", "not a finite number"), ("inf", "not a finite number"),
                                            ("-inf", "not a finite number"), ("abc", "is not a number"),
                                            ("", "is not a number")])
def test_generate_bad_membrane_weights(tmp_path, capsys, membrane_file, weight, expect):
    _one_line(capsys, _gen(tmp_path, "--membrane", f"{membrane_file}:{weight}"), expect)
    assert not (tmp_path / "g.png").exists()


def test_membrane_spec_rules(tmp_path):
    assert parse_membrane_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_membrane_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
    assert parse_membrane_arg("C:\\x\\b.safetensors:2") == ("C:\\x\\b.safetensors", 2.0)
    with pytest.raises(ValueError, match="not a number"):
        parse_membrane_arg("a/b.safetensors:abc")
    odd = tmp_path / "odd:abc"  # an existing file whose name has a colon is read as that file
    odd.write_bytes(b"")
    assert parse_membrane_arg(str(odd)) == (str(odd), 1.0)


@pytest.mark.parametrize("extra, expect", [
    (("--steps", "0"), "argument --steps: 0 is not positive"),
    (("--steps", "-3"), "argument --steps: -3 is not positive"),
    (("-n", "0"), "argument -n: 0 is not positive"),
    (("--cfg", "nan"), "argument --cfg: 'nan' is not a finite number"),
    (("--cfg", "abc"), "argument --cfg: 'abc' is not a number"),
    (("--factor", "nan"), "argument --factor: 'nan' is not a finite number"),
    (("--width", "0"), "argument --width: 0 is not positive"),
    (("--height", "-32"), "argument --height: -32 is not positive"),
])
def test_generate_bad_numbers_are_argparse_one_liners(tmp_path, capsys, extra, expect):
    _one_line(capsys, _gen(tmp_path, *extra), expect)


def test_generate_size_not_a_multiple_of_the_latent_factor(tmp_path, capsys):
    from spm import toy

    pipe = toy.load("toy")
    factor = pipe.vae_scale_factor
    _one_line(capsys, _gen(tmp_path, "--width", str(factor * 8 + 1)), f"not a multiple of {factor}")
    assert not (tmp_path / "g.png").exists()


def test_generate_unknown_metric_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from spm import cli

    monkeypatch.setattr(cli, "_load_pipe", lambda args: pytest.fail("the model was loaded"))
    err = _one_line(capsys, _gen(tmp_path, "--metric", "bogus"), "unknown transport metric 'bogus'")
    assert "--metric" in err and "response" in err  # names the flag and the choices
    assert not (tmp_path / "g.png").exists()


def test_missing_membrane_gets_a_command_line_hint(tmp_path, capsys):
    err = _one_line(capsys, _gen(tmp_path, "--membrane", str(tmp_path / "gone.safetensors")), "no such file")
    assert "press refresh" not in err and ".safetensors membrane" in err
    err = _one_line(capsys, ["info", str(tmp_path / "gone.safetensors")], "no such file")
    assert "press refresh" not in err
    # the WebUI's own text is unchanged
    from spm.checkpoint import MembraneFileError, read_file

    with pytest.raises(MembraneFileError, match="press refresh"):
        read_file(tmp_path / "gone.safetensors")


def test_wrong_model_paths(tmp_path, capsys, membrane_file):
    err = _one_line(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "-o",
                             str(tmp_path / "g.png")], "no such file or folder")
    assert "not a shipped toy model (toy, toy-finetune, toy2, toy2-finetune)" in err  # a mistyped name: the names
    (tmp_path / "empty").mkdir()
    _one_line(capsys, ["generate", "--model", str(tmp_path / "empty"), "--prompt", "x", "-o", str(tmp_path / "g.png")],
              "not a diffusers pipeline")
    _one_line(capsys, ["generate", "--model", str(membrane_file), "--prompt", "x", "-o", str(tmp_path / "g.png")],
              "holds no Stable Diffusion UNet")
    # a single-file checkpoint without --config: the fix is named (diffusers cannot reach the hub offline)
    from safetensors.torch import save_file

    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(ckpt))
    _one_line(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", "-o", str(tmp_path / "g.png")], "--config")
    pt = tmp_path / "model.ckpt"
    pt.write_bytes(b"x")
    _one_line(capsys, ["train", "--model", str(pt), "--target", "c", "-o", str(tmp_path / "o.safetensors")], "pickled")


@pytest.mark.parametrize("extra, expect", [
    (("--iterations", "0"), "argument --iterations: 0 is not positive"),
    (("--lr", "nan"), "argument --lr: 'nan' is not a finite number"),
    (("--lr", "-1"), "argument --lr: '-1' is not positive"),
    (("--anchors", "-1"), "argument --anchors: -1 is negative"),
    (("--threads", "0"), "argument --threads: 0 is not positive"),
    (("--preset", "nope"), "unknown preset"),
    (("--la-mode", "nope"), "argument --la-mode: invalid choice: 'nope' (choose from 'adaptive', 'fixed', 'off')"),
])
def test_train_bad_arguments(tmp_path, capsys, extra, expect):
    _one_line(capsys, ["train", "--model", "toy", "--target", "circle", "-o", str(tmp_path / "o.safetensors"), *extra], expect)
    assert not (tmp_path / "o.safetensors").exists()


def test_eval_bad_arguments(tmp_path, capsys, membrane_file):
    _one_line(capsys, ["eval", "--membrane", str(membrane_file), "--steps", "0"], "argument --steps: 0 is not positive")
    _one_line(capsys, ["eval", "--membrane", f"{membrane_file}:nan"], "not a finite number")
    _one_line(capsys, ["eval", "--membrane", str(tmp_path / "gone.safetensors")], "no such file")


def test_no_traceback_from_the_real_entry_point(tmp_path, membrane_file):
    """``python -m spm generate --steps 0`` (once a ZeroDivisionError) and ``FILE:nan`` (once an all-black image)."""
    for extra in (["--steps", "0"], ["--membrane", f"{membrane_file}:nan"]):
        r = subprocess.run([sys.executable, "-m", "spm", *_gen(tmp_path, *extra)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "g.png").exists()


def test_standalone_tab_wrong_model_is_one_line(tmp_path, capsys):
    from spm.ui.__main__ import main as ui_main

    with pytest.raises(SystemExit) as e:
        ui_main(["--model", str(tmp_path / "nope"), "--membranes", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "not a shipped toy model" in err


@pytest.mark.parametrize("target", ["", " , "])
def test_train_with_an_empty_target_names_the_flag(tmp_path, capsys, target):
    out = tmp_path / "m.safetensors"
    _one_line(capsys, ["train", "--model", "toy", "--target", target, "-o", str(out)], "--target")
    assert not out.exists()
