"""``spm explain``: why a prompt gets its transport strength (the core function, its text, and the CLI)."""

import json

import pytest

from spm.attach import Transport
from spm.checkpoint import save_membrane
from spm.explain import explain, explain_text
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explain_reports_score_window_and_calibration(encode):
    m = random_membrane(tiny_diffusers_unet(ctx=32), "shapes", concepts=("circle", "star"))
    tr = Transport(encode)
    ex = explain(tr, [m], "a red circle on a white background")
    (mem,) = ex["membranes"]
    assert mem["name"] == "shapes" and mem["strength"] == 1.0
    circle, star = mem["concepts"]
    assert circle["concept"] == "circle" and circle["score"] == 1.0 and circle["tokenuni"] == 1.0
    assert circle["window"] == "circle" and circle["similarity"] == pytest.approx(1.0, abs=1e-5)
    cal = circle["calibration"]
    assert cal["source"] == "computed" and "no transport calibration" in cal["reason"]
    assert cal["lo"] < cal["hi"] < 1 and cal["null_quantiles"]["second"] <= cal["null_quantiles"]["max"]
    assert star["tokenuni"] == 0.0 and 0.0 <= star["score"] <= 1.0
    # the explanation is the score generation uses
    ctx, toks = encode(["a red circle on a white background"])
    assert tr.scores(ctx, [m], toks)[0, 0].item() == mem["strength"]
    text = explain_text(tr, [m], "a blue square")
    assert "membrane shapes: strength" in text and "concept 'circle'" in text and "calibration (computed" in text


def test_explain_reference_metric_has_no_calibration(encode):
    m = random_membrane(tiny_diffusers_unet(ctx=32), "m", concepts=("cat",))
    ex = explain(Transport(encode, metric="clipcos_tokenuni"), [m], "a cat")
    c = ex["membranes"][0]["concepts"][0]
    assert "calibration" not in c and c["score"] == 1.0


def test_explain_cli_json_on_the_toy_model(tmp_path, capsys):
    from spm.cli import main
    from spm.toy.model import load_toy_pipeline

    pipe = load_toy_pipeline("base")
    m = random_membrane(pipe.unet, "circle", concepts=("circle",))
    m.info.context_dim = 64
    path = tmp_path / "circle.safetensors"
    save_membrane(m, path)
    assert main(["explain", "--membrane", str(path), "--prompt", "a round disc", "--prompt", "a blue square",
                 "--json", "--threads", "1"]) == 0
    disc, square = json.loads(capsys.readouterr().out)
    assert disc["membranes"][0]["strength"] == 1.0 and disc["membranes"][0]["concepts"][0]["window"] == "disc"
    assert square["membranes"][0]["strength"] == 0.0
    assert main(["explain", "--membrane", str(tmp_path / "missing.safetensors"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_vocabulary_lists_the_words_that_open_a_membrane(tmp_path, capsys):
    """``spm explain --vocabulary`` on the shipped toy model: the whole-word scan finds circle's paraphrase word
    ("disc", as generation scores it) and no unrelated word; a reference metric is refused with a clear error."""
    from spm.cli import main
    from spm.explain import vocabulary
    from spm.hosts.diffusers import pipeline_transport
    from spm.toy.model import load_toy_pipeline
    from spm.transport import vocabulary_matches

    pipe = load_toy_pipeline("base")
    m = random_membrane(pipe.unet, "circle", concepts=("circle",))
    m.info.context_dim = 64
    path = tmp_path / "circle.safetensors"
    save_membrane(m, path)
    assert main(["explain", "--membrane", str(path), "--vocabulary", "--json", "--threads", "1"]) == 0
    voc = json.loads(capsys.readouterr().out)
    (c,) = voc["membranes"][0]["concepts"]
    assert c["concept"] == "circle" and c["count"] == len(c["words"]) >= 1
    assert [w["word"] for w in c["words"]] == ["disc"] and c["words"][0]["strength"] == 1.0
    # every listed word opens the membrane in a prompt too, and a word off the list does not
    tr = pipeline_transport(pipe)
    ctx, toks = tr.encode(["disc", "hoop"])
    tr.registry.record(ctx, toks)
    assert tr.scores(ctx, [m], toks)[:, 0].tolist() == [1.0, 0.0]
    # an explicit word list, the concept's own token left out
    ce = tr.concepts.get(["circle"], tr.encode, tr.encoder_key)[0]
    cal = tr.prepare_calibrations([m])[0]
    ids = [pipe.tokenizer(w).input_ids[1] for w in ("circle", "disc", "hoop", "car")]
    assert [w for w, _, _ in vocabulary_matches(ce, tr.phrases, tr.encode_ids, cal, words=ids)] == [ids[1]]
    with pytest.raises(ValueError, match="calibrated metric"):
        vocabulary(pipeline_transport(pipe, metric="clipcos_tokenuni"), [m])
    assert main(["explain", "--membrane", str(path), "--metric", "tokenuni", "--vocabulary"]) == 2
    assert "calibrated metric" in capsys.readouterr().err
    assert main(["explain", "--membrane", str(path)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["explain", "--membrane", str(path), "--vocabulary", "--limit", "-1"]) == 2
    assert "--limit -1" in capsys.readouterr().err
