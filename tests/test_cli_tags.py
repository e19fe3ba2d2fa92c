"""``<spm:NAME[:WEIGHT]>`` tags in ``python -m spm generate`` prompts: the WebUI's tag, on the command line."""

from __future__ import annotations

import pytest

from spm.checkpoint import save_membrane
from spm.cli import CliError, _prompt_membranes, main
from tests.helpers import random_membrane

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two membranes for the shipped toy model that change its images: circle.safetensors beside the tests'
    outputs, and lib/shapes/square.safetensors in a membrane folder."""
    from spm import toy

    unet = toy.load("toy").unet
    root = tmp_path_factory.mktemp("tags")
    circle = root / "circle.safetensors"
    save_membrane(random_membrane(unet, "circle", ("circle",), seed=1, std=0.5), circle)
    (root / "lib" / "shapes").mkdir(parents=True)
    square = root / "lib" / "shapes" / "square.safetensors"
    save_membrane(random_membrane(unet, "square", ("square",), seed=2, std=0.5), square)
    return {"circle": circle, "square": square, "lib": root / "lib"}


def _items(files, weight=1.0):
    from spm.checkpoint import load_membrane

    return [(load_membrane(files["circle"]), weight)]


def test_prompts_without_tags_keep_the_membrane_files(files):
    items = _items(files, 0.7)
    assert _prompt_membranes(["a circle", "a red  square"], items, None) == [("a circle", items), ("a red  square", items)]


def test_a_tag_sets_the_weight_of_the_file_of_its_name_for_its_prompt_only(files):
    items = _items(files, 0.0)
    plans = _prompt_membranes(["a <spm:circle:0.8> circle", "a circle <spm:circle>", "a circle"], items, None)
    assert [p for p, _ in plans] == ["a circle", "a circle", "a circle"]
    assert [[(m.name, w) for m, w in chosen] for _, chosen in plans] == [[("circle", 0.8)], [("circle", 1.0)], [("circle", 0.0)]]


def test_a_tag_adds_a_membrane_from_the_folder(files):
    plans = _prompt_membranes(["a square <spm:square:0.5> <spm:shapes/square:0.25>", "a square"], _items(files),
                              str(files["lib"]))
    first, second = plans
    assert first[0] == "a square"
    assert [(m.name, w) for m, w in first[1]] == [("circle", 1.0), ("shapes/square", 0.25)]  # the later tag wins
    assert [(m.name, w) for m, w in second[1]] == [("circle", 1.0)]


@pytest.mark.parametrize("prompt, folder, expect", [
    ("a <spm:square> x", False, "<spm:square>: no membrane of that name (given: circle); give its file with --membrane"),
    ("a <spm:nothere:1> x", True, "<spm:nothere:1>: no membrane named 'nothere' in"),
    ("a <spm:circle:1:2> x", False, "too many ':' fields"),
    ("a <spm:circle:abc> x", False, "<spm:circle:abc>"),
    ("a <spm:> x", False, "<spm:>"),
    ("a <spm:../circle> x", True, "<spm:../circle>"),
])
def test_bad_tags_are_refused_naming_the_tag(files, prompt, folder, expect):
    with pytest.raises(CliError) as e:
        _prompt_membranes(["fine", prompt], _items(files), str(files["lib"]) if folder else None)
    assert expect in str(e.value)


def test_two_files_of_one_name_make_its_tag_ambiguous(files):
    items = _items(files) + _items(files, 0.5)
    assert _prompt_membranes(["a circle"], items, None) == [("a circle", items)]  # both kept without a tag
    with pytest.raises(CliError, match="2 --membrane files are named 'circle'"):
        _prompt_membranes(["a <spm:circle:1> circle"], items, None)


def _png(tmp_path, name, *argv):
    out = tmp_path / name
    rc = main(["generate", "--model", "toy", "--device", "cpu", "--steps", "3", "-o", str(out), *argv])
    assert rc == 0
    return out.read_bytes()


def test_a_tag_generates_what_the_same_membrane_file_does(files, tmp_path, capsys):
    """The tag's membrane and weight, and the prompt without the tag, give the image the file at that weight gives;
    the tag's text never reaches the text encoder."""
    by_file = _png(tmp_path, "file.png", "--membrane", f"{files['circle']}:0.9", "--prompt", "a circle")
    by_tag = _png(tmp_path, "tag.png", "--membrane", f"{files['circle']}:0", "--prompt", "a circle <spm:circle:0.9>")
    plain = _png(tmp_path, "plain.png", "--prompt", "a circle")
    assert by_tag == by_file and by_tag != plain
    folder = _png(tmp_path, "folder.png", "--spm-dir", str(files["lib"]), "--prompt", "a square <spm:square:0.9>")
    direct = _png(tmp_path, "direct.png", "--membrane", f"{files['square']}:0.9", "--prompt", "a square")
    assert folder == direct


def test_a_bad_tag_fails_in_one_line_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    import spm.cli

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(spm.cli, "_load_pipe", no_model)
    out = tmp_path / "g.png"
    rc = main(["generate", "--model", "toy", "--prompt", "a <spm:circle:x> circle", "--membrane", str(files["circle"]),
               "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "<spm:circle:x>" in err, err
    assert not out.exists()


def test_explain_strips_the_tags_and_explains_their_membranes(files, capsys):
    """``spm explain`` reads a prompt's tags as ``generate`` does: the strengths are those of the prompt without them,
    for the --membrane files and the folder's tagged membranes."""
    import json

    rc = main(["explain", "--membrane", str(files["circle"]), "--spm-dir", str(files["lib"]), "--json",
               "--prompt", "a circle <spm:square:0.5>", "--prompt", "a circle"])
    out = capsys.readouterr().out
    assert rc == 0, out
    tagged, plain = json.loads(out)
    assert tagged["prompt"] == plain["prompt"] == "a circle"
    assert [m["name"] for m in tagged["membranes"]] == ["circle", "shapes/square"]
    assert [m["name"] for m in plain["membranes"]] == ["circle"]
    assert tagged["membranes"][0] == plain["membranes"][0]
    rc = main(["explain", "--membrane", str(files["circle"]), "--prompt", "a <spm:square> circle"])
    assert rc == 2 and "--spm-dir" in capsys.readouterr().err


def test_a_missing_folder_and_an_unknown_name_say_so_in_command_line_words(files, tmp_path):
    with pytest.raises(CliError, match="--spm-dir .*nope: no such folder"):
        _prompt_membranes(["a <spm:square> x"], [], str(tmp_path / "nope"))
    with pytest.raises(CliError) as e:
        _prompt_membranes(["a <spm:nothere> x"], [], str(files["lib"]))
    assert "no membrane named 'nothere'" in str(e.value) and "refresh" not in str(e.value)
