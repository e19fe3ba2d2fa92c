"""``bench.erasure`` (the per-object sweep at the CLI defaults on every toy world) and ``bench.signal_vs_scorer``'s
world handling: the parts that decide what is trained and what counts as met, without training."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import erasure as be
from bench import signal_vs_scorer as svs


def test_the_sweep_trains_exactly_what_the_cli_trains():
    from spm.cli import build_parser, config_from_args

    for model, obj in (("toy", "heart"), ("toy2", "fish")):
        args = build_parser().parse_args(["train", "--model", model, "--target", obj, "-o", "x.safetensors"])
        assert config_from_args(args) == be.training_config(obj), "the sweep must train at the CLI defaults"
    assert be.training_config("fish", {"lr": 0.002}).lr == 0.002


def test_every_shipped_base_world_is_swept_by_default():
    from spm import toy

    assert be.base_worlds() == [n for n, m in toy.MODELS.items() if m.which == "base"]
    assert {"toy", "toy2"} <= set(be.base_worlds())
    assert be.main(["--world", "toy-finetune", "--quiet"]) == 2


def test_set_overrides_are_checked(capsys):
    assert be.parse_set(["iterations=300", "la-budget=0.05", "surrogate=a dog"]) == {
        "iterations": 300, "la_budget": 0.05, "surrogate": "a dog"}
    for bad in (["nope=1"], ["iterations"], ["targets=[\"x\"]"], ["iterations=0"]):
        with pytest.raises(ValueError):
            be.parse_set(bad)
    assert be.main(["--set", "nope=1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --set 'nope=1'")


def test_metric_is_checked_and_recorded(capsys):
    assert be.main(["--metric", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --metric 'nope'") and "ngram_tokenuni" in err[0]
    args = argparse.Namespace(metric="robust", threads=1, parallel=False)
    st = be.settings(args, {})
    assert st["metric"] == "robust" and not st["default_metric"] and not st["cli_defaults"]
    assert st["cli_equivalent"].endswith("--metric robust")
    st = be.settings(argparse.Namespace(metric=None, threads=1, parallel=False), {})
    assert st["default_metric"] and st["cli_defaults"]


def _row(lit, par, ident, erased=True):
    return {"erasure": lit, "paraphrase_erasure": par, "nontarget_identical": ident,
            "training": {"erased": erased, "steps": 300, "seconds": 10.0}}


def test_summary_goals_fail_on_any_object_and_on_undefined_values():
    good = {"a": _row(1.0, 1.0, 1.0), "b": _row(0.95, 0.9, 1.0)}
    s = be.summarise(good, {"each_ge_0.90": True})
    assert s["goals"]["all"] and s["erasure"]["min"] == 0.95 and s["erasure"]["mean"] == pytest.approx(0.975)
    assert s["failing"] == {"erasure": [], "paraphrase_erasure": [], "nontarget_identical": []}
    s = be.summarise({**good, "c": _row(0.94, 1.0, 1.0, erased=False)}, {"each_ge_0.90": True})
    assert not s["goals"]["erasure_ge_0.95"] and s["goals"]["paraphrase_ge_0.90"] and not s["goals"]["all"]
    assert s["failing"]["erasure"] == ["c"] and s["trainer_erased"] == 2
    s = be.summarise({**good, "d": _row(None, 1.0, 0.97)}, None)  # the base model never drew d: not a pass
    assert s["erasure"]["undefined"] == 1 and not s["goals"]["erasure_ge_0.95"]
    assert s["failing"]["nontarget_identical"] == ["d"] and not s["goals"]["nontarget_bit_identical"]
    assert not be.summarise(good, {"each_ge_0.90": False})["goals"]["all"]
    json.dumps(s, allow_nan=False)


def test_bad_objects_are_refused_before_loading_anything():
    with pytest.raises(ValueError, match="not objects of toy2"):
        be.sweep_world("toy2", ["circle"], None, "/nonexistent", {}, False, 1, True)


def test_signal_vs_scorer_follows_the_models_world():
    from spm import toy

    assert svs.default_targets("shapes") == list(svs.TARGETS)
    assert svs.default_targets("icons") == list(toy.concepts("icons"))
    assert svs.default_out("shapes").name == "signal_vs_scorer.json"
    assert svs.default_out("icons").name == "signal_vs_scorer_icons.json"
    pipe, world = svs._load("toy2")
    assert world.name == "icons"
    with pytest.raises(SystemExit, match="neither a shipped toy model"):
        svs._load("no-such-model")


@pytest.mark.slow  # trains 2 steps and generates the default suite (about a minute on 2 idle cores)
def test_a_two_step_sweep_of_one_world_object(tmp_path):
    import torch

    n = torch.get_num_threads()
    try:
        rep = be.sweep_world("toy2", ["moon"], None, str(tmp_path), {"iterations": 2}, False, 1, True)
    finally:
        torch.set_num_threads(n)
    row = rep["objects"]["moon"]
    assert rep["world"] == "icons" and rep["multi"] is None and set(rep["summary"]["goals"]) >= {"all"}
    assert row["training"]["steps"] == 2 and row["training"]["budget"] == 2 and not row["training"]["erased"]
    assert 0.0 <= row["nontarget_identical"] <= 1.0 and row["images"]["literal"] == 16
    assert (tmp_path / "toy2" / "moon.safetensors").exists() and (tmp_path / "toy2" / "partial.json").exists()
    again = be.sweep_world("toy2", ["moon"], None, str(tmp_path), {"iterations": 2}, True, 1, True)
    assert again["objects"]["moon"]["training"]["reused"] and again["objects"]["moon"]["erasure"] == row["erasure"]


def test_markdown_table_puts_the_worlds_side_by_side(tmp_path, capsys):
    def world(objs):
        rows = {o: {**_row(1.0, 0.875, 1.0), "training": {"erased": o != "b", "signal": 1.2, "steps": 330, "budget": 600,
                                                          "seconds": 1.0}} for o in objs}
        multi = {"targets": objs[:2], "erasure": {o: 1.0 for o in objs[:2]},
                 "paraphrase_erasure": {o: 0.5 for o in objs[:2]}, "nontarget_identical": 1.0, "each_ge_0.90": True}
        return {"objects": rows, "multi": multi, "summary": be.summarise(rows, multi)}

    report = {"worlds": {"toy": world(["a", "b", "c"]), "toy2": world(["x", "y"])}}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(report))
    assert be.main(["--table", str(f)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].count("object |") == 2 and len(lines) == 2 + 3 + 2
    assert "| a | 1.00 | 0.88 | 1.00 | erased (1.20, 330/600) | x |" in lines[2]
    assert "not erased" in lines[3] and lines[4].rstrip(" |").endswith("erased (1.20, 330/600)")
    assert "2 of 3 erased" in lines[5] and "2 together: x, y" in lines[6]
    assert be.main(["--table", str(tmp_path / "missing.json")]) == 2


def test_transport_strengths_of_the_suite(tmp_path, capsys):
    """Every literal prompt names the target, so the default metric gives it full strength (tokenuni); the counts
    cover the whole suite and the examples are the misses."""
    from spm import toy
    from tests.test_eval_cli import _membrane

    pipe = toy.load("toy")
    m = _membrane(pipe.unet, ["circle"], 0.0)
    r = be.transport_strengths(pipe, m, "shapes")
    assert r["literal_below_1"] == 0 and r["literal_examples"] == []
    assert r["literal_prompts"] == 16 and r["paraphrase_prompts"] == 8 and r["nontarget_prompts"] == 29
    for part, key in (("paraphrase", "paraphrase_below_1"), ("nontarget", "nontarget_above_0")):
        assert 0 <= r[key] <= r[f"{part}_prompts"] and len(r[f"{part}_examples"]) == min(4, r[key])
    assert r["metric"] and {"lo", "hi", "weak"} <= set(r["calibration"])

    from spm.checkpoint import save_membrane

    out = tmp_path / "m"
    (out / "toy").mkdir(parents=True)
    save_membrane(m, out / "toy" / "circle.safetensors")
    res = tmp_path / "t.json"
    assert be.main(["--transport-only", "--world", "toy", "--objects", "circle", "--out", str(out), "--result", str(res),
                    "--threads", "1", "--json"]) == 0
    rep = json.loads(res.read_text())
    assert rep["worlds"]["toy"]["objects"]["circle"] == r and rep["worlds"]["toy"]["literal_below_1"] == {}
    assert be.main(["--transport-only", "--world", "toy", "--objects", "star", "--out", str(out), "--result", str(res)]) == 2


def test_signal_vs_scorer_merge_names_the_targets_not_run(tmp_path):
    def target(sig, er):
        pts = [{"step": 10 * (i + 1), "signal": s, "aggregate": s, "per_level": [s], "remaining": 0.5, "erasure": e,
                "paraphrase_erasure": e, "level_ratio": [s + 0.1], "per_seed": [[s - 0.2, s + 0.1]]}
               for i, (s, e) in enumerate(zip(sig, er))]
        return {"iterations": 30, "points": pts}

    part = {"model": "toy2", "world": "icons", "targets_run": ["sun", "house", "moon"],
            "targets": {"sun": target([0.2, 1.1, 1.2], [0.0, 1.0, 1.0]), "house": target([0.5, 0.9, 1.1], [0.0, 0.2, 0.5])}}
    f = tmp_path / "part.json"
    f.write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    assert svs.main(["--merge", str(f), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["targets_not_run"] == ["moon"] and set(rep["targets"]) == {"sun", "house"}
    d = rep["summary"]["decision_vs_erasure_0.9"]
    assert rep["summary"]["points"] == 6 and d["both_erased"] == 2 and d["signal_erased_scorer_not"] == 1
    # the other rules on the same points: the plain ratio calls more erased, the least-closed seed fewer
    r = rep["summary"]["level_ratio_min"]["decision_vs_erasure_0.9"]
    assert r["both_erased"] == 2 and r["signal_erased_scorer_not"] == 2
    m = rep["summary"]["single_seed_min"]["decision_vs_erasure_0.9"]
    assert m["both_erased"] == 1 and m["signal_erased_scorer_not"] == 0 and m["scorer_erased_signal_not"] == 1
    assert out.with_suffix(".png").stat().st_size > 0


def test_reuse_takes_a_setting_the_file_predates_as_its_value_of_that_time(tmp_path):
    """``--reuse``: a membrane trained before a setting existed (the file does not record it) is reused when the
    sweep asks for the value the setting had then (``contexts`` came in off, its default now is on), and trained
    again when it asks for another value, the current default included."""
    from spm.checkpoint import save_membrane
    from tests.helpers import random_membrane
    from tests.test_train_models import tiny_sd_pipe

    folder = tmp_path / "toy"
    folder.mkdir()
    m = random_membrane(tiny_sd_pipe().unet, name="circle", concepts=("circle",))
    cfg = be.training_config("circle").to_dict()
    assert cfg["contexts"] > 0  # the default now
    m.info.training = {k: v for k, v in cfg.items() if k != "contexts"}  # as saved before ``contexts`` existed
    save_membrane(m, folder / "circle.safetensors")
    (folder / "circle.train.json").write_text(json.dumps({"steps": 7, "history": []}))
    said = []
    got, rec = be.train_object(None, "circle", folder, {"contexts": 0}, True, said.append)
    assert rec == {"steps": 7, "reused": True} and said == [f"circle: reusing {folder / 'circle.safetensors'}"]
    for over in ({}, {"contexts": 4}):  # another value: it trains again (here on no pipeline at all)
        with pytest.raises(AttributeError):
            be.train_object(None, "circle", folder, over, True, said.append)
        assert said[-2] == "circle: circle.safetensors was trained with other settings; training again"
    # a file that records it is reused at the value it records
    m.info.training = dict(cfg)
    save_membrane(m, folder / "circle.safetensors")
    assert be.train_object(None, "circle", folder, {}, True, said.append)[1]["reused"]
    # context_words came in as "mixed": a file without it drew function words only
    m.info.training = {k: v for k, v in cfg.items() if k != "context_words"}
    save_membrane(m, folder / "circle.safetensors")
    assert be.train_object(None, "circle", folder, {"context_words": "function"}, True, said.append)[1]["reused"]
    with pytest.raises(AttributeError):
        be.train_object(None, "circle", folder, {}, True, said.append)


def test_rows_split_the_images_found_after_into_kept_and_new(monkeypatch):
    from spm.toy import evaluate as ev

    per = {"literal_per_target": [{"target": "a", "erasure": 0.5, "found_before": 0.5, "found_after": 0.25, "kept": 1,
                                   "new": 1}, {"target": "b", "erasure": 1.0, "kept": 0, "new": 0}],
           "paraphrase_per_target": [{"target": "a", "erasure": 1.0, "kept": 0, "new": 0}],
           "mixed_found_before": 0.75, "mixed_found_after": 0.5, "mixed_kept": 2, "mixed_new": 1}
    row = be.object_row(per, {})
    assert row["literal_found_after"] == [1, 1] and row["paraphrase_found_after"] == [0, 0]
    assert row["mixed_found"] == [0.75, 0.5] and row["mixed_found_after"] == [2, 1]
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: per)
    multi = be.multi_row(None, None, None, ["a", "b"], {"a": None, "b": None})
    assert multi["literal_found_after"] == {"a": [1, 1], "b": [0, 0]}
    assert multi["paraphrase_found_after"] == {"a": [0, 0]} and multi["min_erasure"] == 0.5


def test_suite_seed_draws_another_sample_for_every_row(monkeypatch, tmp_path):
    """``--suite-seed S``: every evaluation of the sweep, the objects' and the multi row's, uses the suite seed S
    (another sample of prompts and seeds), and the JSON's settings record it."""
    from spm.toy import evaluate as ev

    seen = []

    def fake_evaluate(*a, suite=None, **k):
        seen.append(suite)
        return {"literal_per_target": [], "paraphrase_per_target": []}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    monkeypatch.setattr(be, "train_object", lambda pipe, obj, *a, **k: (obj, {"steps": 1, "erased": True, "seconds": 1.0}))
    monkeypatch.setattr(be, "object_row", lambda r, rec: {"erasure": None, "paraphrase_erasure": None,
                                                          "nontarget_identical": None, "training": rec})
    be.sweep_world("toy2", ["sun", "moon"], None, str(tmp_path), {}, True, 1, True, None, 4321)
    assert seen == [{"seed": 4321}] * 3  # two objects and the multi row
    seen.clear()
    be.sweep_world("toy2", ["sun"], None, str(tmp_path), {}, True, 1, True)
    assert seen == [None]
    st = be.settings(argparse.Namespace(metric=None, threads=1, parallel=False, suite_seed=4321), {})
    assert st["suite"]["seed"] == 4321 and st["suite"]["n_literal"] == ev.SUITE_DEFAULTS["n_literal"]


def test_signal_summary_scores_each_part_of_the_in_context_signal_on_the_same_points():
    def pt(alone, in_context, erasure):
        return {"signal": min(alone, in_context), "aggregate": alone, "per_level": [min(alone, in_context)],
                "parts": {"alone": alone, "in_context": in_context}, "erasure": erasure, "paraphrase_erasure": erasure}

    per = {"x": {"points": [pt(1.2, 0.5, 1.0), pt(1.1, 1.05, 1.0), pt(0.4, 0.2, 0.1), pt(1.3, 0.9, 0.5)]}}
    s = svs.summarise(per)
    # the decision rule (the lesser part) misses the first point; the target alone calls the last one erased
    assert s["decision_vs_erasure_0.9"]["scorer_erased_signal_not"] == 1
    assert s["decision_vs_erasure_0.9"]["signal_erased_scorer_not"] == 0
    assert s["alone_only"]["points"] == 4 and s["alone_only"]["decision_vs_erasure_0.9"]["signal_erased_scorer_not"] == 1
    assert s["alone_only"]["decision_vs_erasure_0.9"]["scorer_erased_signal_not"] == 0
    assert s["in_context_only"]["decision_vs_erasure_0.9"]["agree"] == 0.75
    # points recorded before context prompts have no parts: no per-part rules
    old = {"x": {"points": [{k: v for k, v in p.items() if k != "parts"} for p in per["x"]["points"]]}}
    assert svs.summarise(old)["alone_only"] is None
