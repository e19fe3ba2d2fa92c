"""``python -m spm train / generate``: argument handling and a tiny end-to-end run on a saved diffusers folder."""

from __future__ import annotations

import json

import pytest

from spm.checkpoint import load_membrane
from spm.cli import build_parser, config_from_args, main, parse_membrane_arg
from tests.test_train_models import tiny_sd_pipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_sd_pipe().save_pretrained(str(d))
    return d


def test_train_args_map_to_config(capsys):
    args = build_parser().parse_args(["train", "--model", "m", "--target", "circle, ring", "--target", "star",
                                      "-o", "x.safetensors", "--iterations", "7", "--la-mode", "fixed",
                                      "--reference-schedule", "--control", "a dog", "--preset", "style"])
    cfg = config_from_args(args)
    assert cfg.targets == ["circle", "ring", "star"] and cfg.iterations == 7 and cfg.la_mode == "fixed"
    assert cfg.schedule == "reference" and cfg.control_prompts == ["a dog"] and cfg.anchors == 6  # style preset
    base = ["train", "--model", "m", "--target", "c", "-o", "x.safetensors"]
    from spm.train import TrainConfig

    assert config_from_args(build_parser().parse_args(base)).neighbours == TrainConfig(targets=["c"]).neighbours
    assert config_from_args(build_parser().parse_args([*base, "--neighbours"])).neighbours is True
    assert config_from_args(build_parser().parse_args([*base, "--no-neighbours"])).neighbours is False
    assert config_from_args(build_parser().parse_args(base)).contexts == TrainConfig(targets=["c"]).contexts == 16
    assert config_from_args(build_parser().parse_args([*base, "--contexts", "0"])).contexts == 0
    with pytest.raises(ValueError, match="contexts"):
        config_from_args(build_parser().parse_args([*base, "--contexts", "-1"]))
    assert config_from_args(build_parser().parse_args(base)).lr_layers == "gain"  # the per-layer rates by default
    assert config_from_args(build_parser().parse_args([*base, "--lr-layers", "fixed"])).lr_layers == "fixed"
    assert config_from_args(build_parser().parse_args(base)).context_words == "mixed"
    assert config_from_args(build_parser().parse_args([*base, "--context-words", "function"])).context_words == "function"
    # a word that is not one of a setting's choices: argparse's error, naming the flag and the choices
    for flag, word, choices in (("--lr-layers", "per-layer", "'gain', 'fixed'"), ("--context-words", "any", "'mixed', 'function'"),
                                ("--precision", "fp8", "'fp32', 'fp16', 'bf16'")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, flag, word])
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid choice: '{word}'" in err and choices in err, err


def test_membrane_weight_syntax():
    assert parse_membrane_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_membrane_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_membrane_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)


def test_train_then_generate_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "circle.safetensors"
    rc = main(["train", "--model", str(model_dir), "--target", "circle", "-o", str(out), "--iterations", "3",
               "--pool-size", "2", "--max-denoising-steps", "4", "--anchors", "1", "--save-every", "2", "--device", "cpu",
               "--keep-state"])  # to extend the finished run below
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and report["cost"]["schedule"] == "pool"
    m = load_membrane(out)
    assert m.concepts == ["circle"] and m.info.training["iterations"] == 3
    # refuses to overwrite silently; resume continues
    assert main(["train", "--model", str(model_dir), "--target", "circle", "-o", str(out), "--iterations", "3"]) == 2
    assert "--resume" in capsys.readouterr().err
    rc = main(["train", "--model", str(model_dir), "--target", "circle", "-o", str(out), "--iterations", "4", "--resume",
               "--pool-size", "2", "--max-denoising-steps", "4", "--anchors", "1", "--device", "cpu"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["steps"] == 4
    png = tmp_path / "g.png"
    rc = main(["generate", "--model", str(model_dir), "--membrane", f"{out}:0.8", "--prompt", "a circle", "--prompt", "a dog",
               "--steps", "2", "-n", "2", "-o", str(png), "--device", "cpu"])
    assert rc == 0 and png.exists()
    from PIL import Image

    assert Image.open(png).size == (2 * 16, 2 * 16)


def test_clear_errors(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--target", "c", "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main(["train", "--model", str(tmp_path / "folder"), "--target", "c", "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path), "--target", "c", "-o", str(tmp_path / "o.pt")]) == 2
    assert "saved as .safetensors" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--membrane", str(tmp_path / "missing.safetensors"),
                 "--prompt", "x", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "press refresh" not in err


def test_contexts_in_a_training_request():
    """The API and ``--jobs`` files take ``contexts`` (a whole number >= 0)."""
    from spm.train.jobs import RequestError, parse_request

    assert parse_request({"name": "c", "target": "circle", "contexts": 8}).config().contexts == 8
    assert parse_request({"name": "c", "target": "circle"}).config().contexts == 16  # the default
    assert parse_request({"name": "c", "target": "circle", "contexts": 0}).config().contexts == 0
    with pytest.raises(RequestError, match="contexts must be a whole number"):
        parse_request({"name": "c", "target": "circle", "contexts": 2.5})
    with pytest.raises(RequestError, match="contexts"):
        parse_request({"name": "c", "target": "circle", "contexts": -3}).config()
    # each step draws one context prompt: a run draws at most one per iteration, so a short job keeps the default
    cfg = parse_request({"name": "c", "target": "circle", "iterations": 10}).config()
    assert (cfg.contexts, cfg.context_count) == (16, 10)
    cfg = parse_request({"name": "c", "target": "circle", "iterations": 100, "contexts": 101}).config()
    assert (cfg.contexts, cfg.context_count) == (101, 100)
    # the trainer tab's number field: its default is the trainer's, and 0 turns contexts off
    from spm.train.jobs import preset_values
    from spm.ui.trainer_tab import FORM, form_to_request

    assert "contexts" in FORM and preset_values("object")["contexts"] == 16
    for n in (0, 8):
        req = form_to_request({**{k: None for k in FORM}, "name": "c", "target": "circle", "contexts": n})
        assert parse_request(req).config().contexts == n
    req = form_to_request({**{k: None for k in FORM}, "name": "c", "target": "circle"})  # left empty: the default
    assert parse_request(req).config().contexts == 16


def test_lr_layers_in_a_training_request():
    """The API and ``--jobs`` files take ``lr_layers`` ("gain", the default, or "fixed")."""
    from spm.train.jobs import RequestError, parse_request

    assert parse_request({"name": "c", "target": "circle"}).config().lr_layers == "gain"
    assert parse_request({"name": "c", "target": "circle", "lr_layers": "fixed"}).config().lr_layers == "fixed"
    with pytest.raises(RequestError, match="lr_layers"):
        parse_request({"name": "c", "target": "circle", "lr_layers": "per-layer"}).config()
    with pytest.raises(RequestError, match="lr_layers"):
        parse_request({"name": "c", "target": "circle", "lr_layers": 2})


def test_a_request_refuses_every_unknown_choice_in_its_own_words():
    """Each fixed-choice setting a request takes (``CHOICES``) is refused naming the field and listing the allowed
    words, before the trainer's config is built."""
    from spm.train.config import CHOICES
    from spm.train.jobs import KNOWN, RequestError, parse_request

    taken = [k for k in CHOICES if k in KNOWN and k != "robust"]  # the request's robust is true/false
    assert {"precision", "la_mode", "synonyms", "lr_layers", "context_words"} <= set(taken)
    for key in taken:
        with pytest.raises(RequestError) as e:
            parse_request({"name": "c", "target": "circle", key: "bogus"})
        assert str(e.value) == f"{key} 'bogus' is unknown; choose one of {', '.join(CHOICES[key])}"


def test_context_words_in_a_training_request():
    """The API and ``--jobs`` files take ``context_words`` ("mixed", the default, or "function")."""
    from spm.train.jobs import RequestError, parse_request

    assert parse_request({"name": "c", "target": "circle"}).config().context_words == "mixed"
    req = {"name": "c", "target": "circle", "context_words": "function"}
    assert parse_request(req).config().context_words == "function"
    with pytest.raises(RequestError, match="context_words"):
        parse_request({"name": "c", "target": "circle", "context_words": "all"}).config()
    with pytest.raises(RequestError, match="context_words"):
        parse_request({"name": "c", "target": "circle", "context_words": 1})
    # the trainer tab's radio: left as it opens, the trainer's default; "function" reaches the config
    from spm.ui.trainer_tab import FORM, form_to_request

    assert "context_words" in FORM
    for picked, want in ((None, "mixed"), ("function", "function"), ("mixed", "mixed")):
        req = form_to_request({**{k: None for k in FORM}, "name": "c", "target": "circle", "context_words": picked})
        assert parse_request(req).config().context_words == want


def test_neighbours_in_a_training_request():
    """The API and ``--jobs`` files take ``neighbours`` (true / false); anything else is a clear error."""
    from spm.train import TrainConfig
    from spm.train.jobs import RequestError, parse_request

    assert parse_request({"name": "c", "target": "circle", "neighbours": True}).config().neighbours is True
    assert parse_request({"name": "c", "target": "circle"}).config().neighbours == TrainConfig(targets=["c"]).neighbours
    with pytest.raises(RequestError, match="neighbours must be true or false"):
        parse_request({"name": "c", "target": "circle", "neighbours": "yes"})
    # the trainer tab's checkbox
    from spm.ui.trainer_tab import FORM, form_to_request

    assert "neighbours" in FORM
    for ticked in (True, False):
        req = form_to_request({**{k: None for k in FORM}, "name": "c", "target": "circle", "neighbours": ticked})
        assert parse_request(req).config().neighbours is ticked
