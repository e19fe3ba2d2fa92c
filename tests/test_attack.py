"""The attack harness (spm.attack, python -m spm attack): prompts, the loss, the gate seeing candidates, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from spm import attack
from spm.cli import main
from spm.toy.model import asset_dir

pytestmark = pytest.mark.usefixtures("one_thread")
needs_assets = pytest.mark.skipif(not (asset_dir("base") / "unet").is_dir(), reason="toy-world assets not built")


def test_cheap_prompts_cover_every_kind_and_are_deterministic():
    cp = attack.cheap_prompts("circle", ["round disc", "disc"])
    kinds = {k for k, _ in cp}
    assert kinds == {"synonym", "misspelling", "split", "language", "case", "long"}
    assert cp == attack.cheap_prompts("circle", ["round disc", "disc"])
    texts = [p for _, p in cp]
    assert "circle" not in [t for k, t in cp if k in ("misspelling", "split", "language", "synonym")]
    assert any("circle" in t for k, t in cp if k == "long")
    assert all(m != "circle" and len(m) >= 4 for m in attack.misspellings("circle"))
    assert len(set(texts)) == len(texts)
    # a concept without translations gets none, short words no misspellings
    assert not [p for k, p in attack.cheap_prompts("zorblax") if k == "language"]
    assert attack.misspellings("ox") == []


def test_random_attack_prompts_are_seeded_short_and_apart_from_the_calibration_null():
    from spm.gate import null_prompts
    from spm.tokenizer import clip_tokenizer

    b = attack.Budget()
    rp = attack.random_attack_prompts(b)
    assert rp == attack.random_attack_prompts(attack.Budget())
    assert len(rp) == len(attack.RANDOM_LENGTHS) * b.random_per_length and all(p.strip() for p in rp)
    tok = clip_tokenizer()
    assert max(len(tok(p).input_ids) - 2 for p in rp) <= max(attack.RANDOM_LENGTHS)
    assert not set(rp) & set(null_prompts())  # another seed than the gate's calibration null
    b.seed = 1
    assert attack.random_attack_prompts(b) != rp
    assert len(attack.random_attack_prompts(attack.Budget.quick())) == len(attack.RANDOM_LENGTHS)


@pytest.fixture(scope="module")
def toy():
    from spm.toy.model import load_toy_pipeline

    torch.manual_seed(0)
    return load_toy_pipeline("base")


def _membrane(unet, concepts, std):
    from spm.membrane import Membrane, MembraneInfo
    from spm.naming import context_dim, describe_architecture, find_targets

    ctx = context_dim(unet)
    info = MembraneInfo(concepts=list(concepts), architecture=describe_architecture(ctx), context_dim=ctx)
    torch.manual_seed(0)
    m = Membrane.for_targets(find_targets(unet), info=info)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_up.weight.normal_(0.0, std) if std else layer.lora_up.weight.zero_()
    return m


@pytest.fixture(scope="module")
def zero_membrane_file(toy, tmp_path_factory):
    from spm.checkpoint import save_membrane

    f = tmp_path_factory.mktemp("attack") / "zero.safetensors"
    save_membrane(_membrane(toy.unet, ["circle"], 0.0), f)
    return f


@needs_assets
def test_attack_loss_prefers_the_target_prompt(toy):
    """On latents of circles, the unprotected model denoises best when told 'circle': the loss is meaningful."""
    b = attack.Budget.quick()
    b.references, b.noise_draws = 2, 4
    ref = attack.make_reference(toy, ["a red circle on a white background"], [0, 1], None, b)
    loss = attack.AttackLoss(toy, ref)
    ts = attack.TextSide(toy)
    ids = torch.tensor([ts.layout([], "a red circle on a white background")[0], ts.layout([], "a blue square")[0]])
    with torch.no_grad():
        lo = loss(ts.encode(ids))
    assert lo.shape == (2,) and torch.isfinite(lo).all()
    assert lo[0] < lo[1]


@needs_assets
def test_discrete_attack_scores_candidates_through_the_gate(toy):
    """Every candidate is recorded with its token ids, so the transport gate scores it like a user's prompt."""
    from spm.hosts.diffusers import PipelineMembranes

    m = _membrane(toy.unet, ["circle"], 0.05)
    b = attack.Budget.quick()
    ref = attack.make_reference(toy, ["a circle"], [0], None, b)
    loss = attack.AttackLoss(toy, ref)
    with PipelineMembranes(toy, [(m, 1.0)]) as pm:
        before = len(pm.transport.registry.tokens())
        res = attack.discrete_attack(toy, pm, loss, b, suffix="", seed=3)
        assert len(pm.transport.registry.tokens()) > before
    assert len(res["loss_history"]) == b.steps
    assert all(a >= c - 1e-9 for a, c in zip(res["loss_history"], res["loss_history"][1:]))  # best-so-far never rises
    assert isinstance(res["prompt"], str) and res["prompt"]


@needs_assets
def test_embedding_attack_rows_show_the_gate_their_text_as_a_host_would(toy):
    """The embedding attack's rows are recorded as a host records a prompt with a textual-inversion embedding in
    it: the suffix's token ids, and no token at the free positions.  So the token metric opens for a literal
    concept in the suffix (the membrane itself is attacked) and gives the free placement nothing, and the final
    conditioning that generation uses is looked up with the same ids."""
    from spm.hosts.diffusers import PipelineMembranes
    from spm.transport import content_tokens

    m = _membrane(toy.unet, ["circle"], 0.05)
    b = attack.Budget.quick()
    b.embed_steps = 2
    ref = attack.make_reference(toy, ["a circle"], [0], None, b)
    loss = attack.AttackLoss(toy, ref)
    ts = attack.TextSide(toy)
    circle = content_tokens(ts.ids("circle"))
    with PipelineMembranes(toy, [(m, 1.0)], metric="tokenuni") as pm:
        for suffix, opens in (("a circle", True), ("", False)):
            res = attack.embedding_attack(toy, pm, loss, b, suffix=suffix, seed=1)
            seen = pm.transport.registry.lookup(res["conditioning"])[0]
            assert seen is not None
            assert content_tokens(seen) == content_tokens(ts.ids(suffix))  # the free positions: no token
            assert (circle <= content_tokens(seen)) is opens
            strength = float(pm.transport.scores(res["conditioning"], [m])[0, 0])
            assert strength == (1.0 if opens else 0.0)


@needs_assets
def test_spm_attack_cli_runs_and_refuses_bad_input(tmp_path, capsys, zero_membrane_file):
    out = tmp_path / "out"
    rc = main(["attack", "--membrane", str(zero_membrane_file), "--model", "toy", "--quick", "--families", "cheap",
               "--target", "circle", "--out", str(out), "--threads", "1"])
    assert rc == 0
    rep = json.loads((out / "attack.json").read_text())
    assert rep["judge"] == "toy" and rep["target"] == "circle"
    # a zero membrane protects nothing: the protected rate equals the unprotected one, image for image
    assert rep["protected"]["cheap"]["asr"] == rep["unprotected"]["cheap"]["asr"]
    assert any(p.name.startswith("protected_cheap_") for p in out.iterdir())
    capsys.readouterr()
    # the random-text family: one judged image per prompt, the prompts where the judge found the target listed
    out2 = tmp_path / "out2"
    assert main(["attack", "--membrane", str(zero_membrane_file), "--model", "toy", "--quick", "--families", "random",
                 "--out", str(out2), "--threads", "1"]) == 0
    rep = json.loads((out2 / "attack.json").read_text())
    un, pr = rep["unprotected"]["random"], rep["protected"]["random"]
    assert un["prompts"] == pr["prompts"] == attack.random_attack_prompts(attack.Budget.quick())
    assert pr["asr"] == un["asr"] and pr["found"] == un["found"]
    assert un["asr"] == len(un["found"]) / len(un["prompts"])
    assert len([p for p in out2.iterdir() if p.name.startswith("protected_random_")]) == len(pr["prompts"])
    capsys.readouterr()
    assert main(["attack", "--membrane", str(tmp_path / "missing.safetensors"), "--model", "toy"]) == 2
    assert main(["attack", "--membrane", str(zero_membrane_file), "--model", "toy", "--families", "nope"]) == 2
    assert main(["attack", "--membrane", str(zero_membrane_file), "--model", "toy", "--target", "dragon",
                 "--judge", "toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3


@needs_assets
def test_bench_attack_quick_path_prints_the_contract(tmp_path, capsys):
    """``python -m bench.attack --quick --json`` end to end on a micro budget: one JSON object with every row's
    keys, the budget, the metrics and the training cost per trained row."""
    from bench import attack as bench_attack

    micro = ["steps=1", "candidates=2", "topk=4", "embed_steps=1", "references=1", "noise_draws=1", "eval_seeds=1",
             "steps_sample=2", "free_tokens=1"]
    argv = ["--quick", "--json", "--quiet", "--world", "toy", "--world", "toy2", "--processes", "2", "--iterations", "2",
            "--threads", "1", "--membranes", str(tmp_path / "m"), "--out", str(tmp_path / "attack.json")]
    for b in micro:
        argv += ["--budget", b]
    assert bench_attack.main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep == json.loads((tmp_path / "attack.json").read_text())
    assert rep["quick"] is True and rep["budget"]["steps"] == 1 and rep["budget"]["queries_discrete_per_attack"] == 2
    # two worlds, one process each, merged into one report
    assert set(rep["worlds"]) == set(rep["train"]) == {"toy", "toy2"} and rep["processes"] == 2
    assert all(set(rep["worlds"][w]) == {"unprotected", "reference", "robust"} for w in rep["worlds"])
    assert rep["train_seconds"] > 0 and rep["seconds"] > 0
    from spm import transport

    assert rep["metrics"] == {"reference": "clipcos_tokenuni", "robust": transport.RESPONSE_METRIC}
    assert rep["robust_training"] == "embedding" and rep["response_lo"] == "null"  # the robust settings
    keys = ("asr_discrete", "asr_embedding", "asr_cheap", "asr_random", "literal_erasure", "paraphrase_erasure",
            "nontarget_drop_pt")
    for row, d in rep["worlds"]["toy"].items():
        for k in keys[:4]:
            assert 0.0 <= d[k] <= 1.0, (row, k)
        for k in keys[4:]:  # a micro budget's images may show no target at all: then there is nothing to erase
            assert k in d and ((d[k] is None) if row == "unprotected" else (d[k] is None or isinstance(d[k], float))), (row, k)
    assert isinstance(rep["worlds"]["toy"]["robust"]["nontarget_drop_pt"], float)
    tr = rep["train"]["toy"]
    assert set(tr) == {"reference", "robust"}
    (target,) = tr["robust"]
    assert tr["robust"][target]["robust"] == "embedding" and tr["reference"][target]["schedule"] == "reference"
    # a robust-trained file names its response ramp; the reference's names none (the process default applies)
    assert tr["robust"][target]["response_ramp"] == "empty" and tr["reference"][target]["response_ramp"] == "null"
    assert tr["robust"][target]["seconds_per_iteration"] > 0
    # bad input: one line, exit 2
    assert bench_attack.main(["--rows", "robust,nope"]) == 2
    assert bench_attack.main(["--budget", "steps=0"]) == 2
    assert bench_attack.main(["--budget", "nope=1"]) == 2
    assert bench_attack.main(["--metric", "nope"]) == 2
    assert bench_attack.main(["--processes", "0", "--world", "toy"]) == 2
    assert capsys.readouterr().err.count("error:") == 5
    with pytest.raises(SystemExit):  # argparse's own refusal, with the choices
        bench_attack.main(["--response-lo", "nope"])
    assert "invalid choice: 'nope' (choose from 'null', 'empty')" in capsys.readouterr().err


def test_bench_attack_trains_each_row_as_its_name_says():
    """The reference row: the reference's schedule, no context prompts and one rate for every parameter; robust and
    plain: the trainer's defaults (per-layer rates, context prompts) with robust training on or off."""
    from bench import attack as bench_attack
    from spm.train import TrainConfig

    ref = bench_attack.train_config("circle", "reference", None, "embedding", False)
    assert (ref.schedule, ref.contexts, ref.lr_layers) == ("reference", 0, "fixed")
    default = TrainConfig(targets=["circle"])
    for row, robust in (("robust", "embedding"), ("plain", "off")):
        cfg = bench_attack.train_config("circle", row, None, "embedding", False)
        assert cfg.robust == robust
        assert (cfg.schedule, cfg.contexts, cfg.lr_layers) == (default.schedule, default.contexts, default.lr_layers)
