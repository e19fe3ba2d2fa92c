"""``python -m spm eval``: the toy-world harness end to end on the shipped toy model, with a small suite.

Membranes are built by hand so that their effect is known without training: a *zero* membrane (up = 0, the
identity) and a *strong* one (random up weights of std 1 on every module, which wrecks every image it touches).
Nothing here assumes how well the shipped model or scorer performs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from spm.cli import main
from spm.toy import harness

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--n-literal", "2", "--n-paraphrase", "1", "--n-per-other", "1", "--n-pairs", "0", "--n-mixed", "1", "--quiet"]
METRIC_KEYS = {"targets", "images", "erasure", "paraphrase_erasure", "literal_per_target", "paraphrase_per_target",
               "nontarget_fidelity_before", "nontarget_fidelity_after", "nontarget_drop_pt", "nontarget_exact_before",
               "nontarget_exact_after", "psnr_unrelated_db", "ssim_unrelated", "nontarget_identical", "mixed_erasure",
               "mixed_other_found_before", "mixed_other_found_after", "mixed_found_before", "mixed_found_after",
               "mixed_kept", "mixed_new"}


def _membrane(unet, concepts, std, seed=0):
    from spm.membrane import Membrane, MembraneInfo
    from spm.naming import context_dim, describe_architecture, find_targets

    ctx = context_dim(unet)
    info = MembraneInfo(concepts=list(concepts), architecture=describe_architecture(ctx), context_dim=ctx)
    torch.manual_seed(seed)
    m = Membrane.for_targets(find_targets(unet), info=info)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_up.weight.normal_(0.0, std) if std else layer.lora_up.weight.zero_()
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from spm.checkpoint import save_membrane
    from spm.toy.model import load_toy_pipeline

    d = tmp_path_factory.mktemp("membranes")
    unet = load_toy_pipeline("base").unet
    out = {"zero": d / "zero.safetensors", "strong": d / "strong.safetensors", "dog": d / "dog.safetensors"}
    save_membrane(_membrane(unet, ["circle"], 0.0), out["zero"])
    save_membrane(_membrane(unet, ["star"], 1.0), out["strong"])
    save_membrane(_membrane(unet, ["dog"], 0.0), out["dog"])
    return out


def _check_metrics(r: dict, targets: list[str]) -> None:
    assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
    assert r["targets"] == targets
    for key in ("nontarget_fidelity_before", "nontarget_fidelity_after", "nontarget_exact_before", "nontarget_exact_after",
                "mixed_other_found_before", "mixed_other_found_after"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["nontarget_drop_pt"] == pytest.approx(100 * (r["nontarget_fidelity_before"] - r["nontarget_fidelity_after"]))
    assert 0.0 < r["psnr_unrelated_db"] <= 100.0 and -1.0 <= r["ssim_unrelated"] <= 1.0 + 1e-6
    for part, name in (("literal", "erasure"), ("paraphrase", "paraphrase_erasure")):
        per = r[f"{part}_per_target"]  # targets in suite order; a tiny suite may give a paraphrase to only some
        got = [p["target"] for p in per]
        assert got == (targets if part == "literal" else [t for t in targets if t in got])
        assert sum(p["images"] for p in per) == r["images"][part]
        for p in per:
            assert 0.0 <= p["found_before"] <= 1.0 and 0.0 <= p["found_after"] <= 1.0
            # the images found after split into those the base model drew the target in too, and new ones
            assert p["kept"] + p["new"] == round(p["found_after"] * p["images"])
            assert p["kept"] <= round(p["found_before"] * p["images"])
            if p["found_before"] == 0:  # the model never drew it: erasure undefined, not invented
                assert p["erasure"] is None
            else:
                assert p["erasure"] == pytest.approx(1 - p["found_after"] / p["found_before"]) and p["erasure"] <= 1.0
        defined = [p["erasure"] for p in per if p["erasure"] is not None]
        assert r[name] == (pytest.approx(sum(defined) / len(defined)) if defined else None)


def test_zero_membrane_changes_nothing(files, capsys):
    rc = main(["eval", "--membrane", str(files["zero"]), "--steps", "6", *SMALL])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    _check_metrics(r, ["circle"])
    assert r["images"] == {"literal": 2, "paraphrase": 1, "nontarget": 7, "mixed": 1}
    assert r["erasure"] in (0.0, None) and r["paraphrase_erasure"] in (0.0, None)
    assert r["psnr_unrelated_db"] == 100.0 and r["ssim_unrelated"] == pytest.approx(1.0, abs=1e-6)
    assert r["nontarget_identical"] == 1.0
    assert r["nontarget_drop_pt"] == 0.0 and r["nontarget_exact_before"] == r["nontarget_exact_after"]
    assert r["mixed_other_found_before"] == r["mixed_other_found_after"]
    # the same mixed images: the target found before is found after, none new
    assert r["mixed_new"] == 0 and r["mixed_kept"] == round(r["mixed_found_before"] * r["images"]["mixed"])
    assert r["mixed_found_before"] == r["mixed_found_after"]
    for p in r["literal_per_target"] + r["paraphrase_per_target"]:  # the same images: every one found is kept
        assert p["new"] == 0 and p["kept"] == round(p["found_before"] * p["images"])
    assert not {"each", "multi", "transfer"} & set(r)
    s = r["settings"]
    assert s["steps"] == 6 and s["cfg"] == harness.DEFAULT_CFG and s["transport"] and s["metric"] and s["suite"]["n_literal"] == 2
    assert r["membranes"] == [{"name": "zero", "weight": 1.0, "targets": ["circle"]}]
    assert r["generated"] == {"without_membranes": 11, "with_membranes": 11} and r["seconds"] > 0
    json.dumps(r, allow_nan=False)  # strict JSON: undefined values are null, never NaN


def test_several_membranes_each_multi_transfer(files, tmp_path, capsys):
    out = tmp_path / "sub" / "eval.json"
    rc = main(["eval", "--membrane", str(files["zero"]), "--membrane", f"{files['strong']}:0.9",
               "--membrane", str(files["zero"]), "--no-transport", "--transfer", "--steps", "4", "-o", str(out), *SMALL,
               "--n-per-other", "0", "--n-pairs", "1"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    r = json.loads(out.read_text())
    _check_metrics(r, ["circle", "star"])
    # literal, paraphrase and mixed prompts are counted per target: each target has as many as alone
    assert {p["target"]: p["images"] for p in r["literal_per_target"]} == {"circle": 2, "star": 2}
    assert r["images"]["literal"] == 4 and r["images"]["paraphrase"] == 2 and r["images"]["mixed"] == 2
    assert r["settings"]["transport"] is False and r["settings"]["metric"] is None
    assert [(m["name"], m["weight"], m["targets"]) for m in r["membranes"]] == [
        ("zero", 1.0, ["circle"]), ("strong", 0.9, ["star"]), ("zero#2", 1.0, ["circle"])]
    assert set(r["each"]) == {"zero", "strong", "zero#2"}
    _check_metrics(r["each"]["zero"], ["circle"])
    _check_metrics(r["each"]["strong"], ["star"])
    # alone, the zero membrane leaves every image as it was; the strong one (transport off) changes them all
    assert r["each"]["zero"]["psnr_unrelated_db"] == 100.0 and r["each"]["zero"]["erasure"] in (0.0, None)
    assert r["each"]["strong"]["psnr_unrelated_db"] < 40 and r["each"]["strong"]["ssim_unrelated"] < 0.95
    assert r["each"]["zero"]["nontarget_identical"] == 1.0 and r["each"]["strong"]["nontarget_identical"] < 1.0
    assert r["psnr_unrelated_db"] < 40
    m = r["multi"]
    assert m["membranes"] == 3 and set(m["erasure_alone"]) == {"circle", "star"} and set(m["erasure_together"]) == {"circle", "star"}
    assert m["min_erasure"] == r["min_erasure"] and m["nontarget_drop_pt"] == r["nontarget_drop_pt"]
    assert m["nontarget_drop_pt_worst_alone"] == max(e["nontarget_drop_pt"] for e in r["each"].values())
    _check_metrics(r["transfer"], ["circle", "star"])
    assert r["transfer"]["images"] == r["images"] and r["transfer"]["psnr_unrelated_db"] < 40
    # baselines are generated once: the two zero membranes share the circle suite's baseline
    n = {k: sum(v["images"].values()) for k, v in r["each"].items()}
    together = sum(r["images"].values())
    assert r["generated"]["without_membranes"] == 2 * together + n["zero"] + n["strong"]
    assert r["generated"]["with_membranes"] == 2 * together + n["zero"] + n["zero#2"] + n["strong"]


def test_target_override(files, capsys):
    rc = main(["eval", "--membrane", str(files["dog"]), "--target", "Ring, heart", "--steps", "2", *SMALL])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["targets"] == ["ring", "heart"] and r["membranes"][0]["targets"] == ["ring", "heart"]
    assert r["psnr_unrelated_db"] == 100.0


def _err(capsys) -> str:
    """The one error line (loading a diffusers folder may draw a progress bar before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and not any("error" in x for x in lines[:-1]), lines
    return lines[-1]


def test_clear_errors(files, tmp_path, capsys, monkeypatch):
    zero = str(files["zero"])

    def run(*argv):
        return main(["eval", *argv, "--steps", "1", *SMALL])

    assert run("--membrane", str(tmp_path / "missing.safetensors")) == 2
    assert "no such file" in _err(capsys)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    assert run("--membrane", str(bad)) == 2
    assert "truncated" in _err(capsys)
    assert run("--membrane", str(files["dog"])) == 2
    e = _err(capsys)
    assert "'dog'" in e and "not a toy-world object" in e and "--target" in e and "circle" in e
    assert run("--membrane", zero, "--target", "dog") == 2
    assert "not a toy-world object" in _err(capsys)
    assert run("--membrane", zero, "--membrane", zero, "--target", "circle") == 2
    assert "one --target per --membrane" in _err(capsys)
    assert run("--membrane", zero, "--metric", "nope") == 2
    assert "unknown transport metric" in _err(capsys)
    assert run("--membrane", zero, "--model", "finetune", "--transfer") == 2
    assert "--transfer" in _err(capsys)

    # a model that is not the toy model: the scorer cannot read its images
    from tests.test_train_models import tiny_sd_pipe

    tiny = tmp_path / "tiny"
    pipe = tiny_sd_pipe()
    pipe.save_pretrained(str(tiny))
    assert run("--membrane", zero, "--model", str(tiny)) == 2
    e = _err(capsys)
    assert "not the toy-world model" in e and "scorer" in e and str(tiny) in e
    # a membrane made for another model does not fit the toy UNet
    from spm.checkpoint import save_membrane

    other = tmp_path / "other.safetensors"
    save_membrane(_membrane(pipe.unet, ["circle"], 0.0), other)
    assert run("--membrane", str(other)) == 2
    assert "other.safetensors" in (e := _err(capsys)) and "context 32" in e

    # the toy world's assets missing
    import spm.toy.model as toy_model

    monkeypatch.setattr(toy_model, "ASSETS", tmp_path / "no_assets")
    assert run("--membrane", zero) == 2
    assert "assets are missing" in _err(capsys)


@pytest.fixture(scope="module")
def icons_zero(tmp_path_factory):
    from spm.checkpoint import save_membrane
    from spm.toy import load

    path = tmp_path_factory.mktemp("icons") / "zero_sun.safetensors"
    save_membrane(_membrane(load("toy2").unet, ["sun"], 0.0), path)
    return path


def test_eval_runs_on_world_2_by_name_and_by_folder(icons_zero, capsys):
    """``spm eval --model toy2`` measures with world 2's suite and scorer; a world-2 asset folder with ``--transfer``
    is compared on world 2's fine-tune (it used to fall back to world 1's and fail)."""
    from spm.toy.model import asset_dir

    rc = main(["eval", "--model", "toy2", "--membrane", str(icons_zero), "--steps", "2", *SMALL])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out)
    _check_metrics(r, ["sun"])
    assert r["world"] == "icons" and r["nontarget_identical"] == 1.0 and r["psnr_unrelated_db"] == 100.0
    rc = main(["eval", "--model", str(asset_dir("base", "icons")), "--membrane", str(icons_zero), "--transfer",
               "--steps", "1", *SMALL])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out)
    assert r["world"] == "icons" and r["transfer"]["targets"] == ["sun"]


def test_evaluate_api_caches_baselines(files):
    """The importable function: a shared :class:`Generations` never generates a baseline twice."""
    from spm.checkpoint import load_membrane
    from spm.toy.evaluate import Generations, evaluate
    from spm.toy.model import load_toy_pipeline
    from spm.toy.scorer import load_scorer

    pipe, scorer = load_toy_pipeline("base"), load_scorer()
    zero = load_membrane(files["zero"])
    small = {"n_literal": 2, "n_paraphrase": 0, "n_per_other": 1, "n_pairs": 0, "n_mixed": 0}
    gen = Generations(steps=2, cfg=6.0)
    r1 = evaluate(pipe, scorer, [(zero, 1.0)], steps=2, cfg=6.0, suite=small, generations=gen)
    assert "paraphrase_erasure" not in r1 and "mixed_erasure" not in r1 and r1["images"]["paraphrase"] == 0
    r2 = evaluate(pipe, scorer, [(zero, 0.5)], metric="tokenuni", steps=2, cfg=6.0, suite=small, generations=gen)
    assert gen.generated == {"without_membranes": 9, "with_membranes": 18}
    assert r2["settings"]["metric"] == "tokenuni" and r2["psnr_unrelated_db"] == 100.0
    with pytest.raises(ValueError, match="other steps"):
        evaluate(pipe, scorer, [(zero, 1.0)], steps=3, suite=small, generations=gen)
    with pytest.raises(ValueError, match="every toy-world object"):
        from bench.toyworld import data

        evaluate(pipe, scorer, [(zero, 1.0)], [list(data.OBJECTS)], steps=2, suite=small, generations=gen)
    assert not math.isnan(r1["seconds"])
