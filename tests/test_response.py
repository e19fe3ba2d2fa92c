"""The response gate (:mod:`spm.response`; ``response`` = max(ngram_tokenuni, membrane gate, response gate)): it asks the UNet whether a
row draws the concept, gives exactly 0 at the level of random words (those images stay bit-identical), measures
each distinct row once, runs inside the stack's own hook without disturbing it, falls back to its words part where
no host runs the UNet for it, and runs in the WebUI (A1111 and Forge stubs) with its gates built before sampling."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from spm.attach import MembraneStack, Transport
from spm.transport import METRICS, uses_response
from tests.helpers import random_membrane
from tests.test_webui_lifecycle import world  # noqa: F401  (the stub WebUI with the extension loaded)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    from spm.toy.model import load_toy_pipeline

    return load_toy_pipeline("base")


@pytest.fixture(scope="module")
def responder(pipe):
    from spm.hosts.diffusers import DiffusersBackend
    from spm.response import Responder

    return Responder(DiffusersBackend(pipe))


def _membrane(pipe, concept="circle", std=0.05):
    m = random_membrane(pipe.unet, concept, concepts=(concept,), std=std)
    m.info.context_dim = 64
    return m


def test_response_is_a_metric_of_its_own():
    assert "response" in METRICS and uses_response("response")
    assert not any(uses_response(m) for m in METRICS if m != "response")


def test_gate_is_one_for_the_concept_and_zero_for_random_words_and_other_objects(pipe, responder):
    from spm.response import NULL_RANK, null_words

    g = responder.gate("circle")
    assert g.usable and g.rows == 16
    assert g.q <= g.lo < g.hi <= g.top and g.lo == max(g.q, g.empty)
    be = responder.backend
    concept = g.map(responder.closures(g, be.encode(["circle", "a circle", "the circle"]).context))
    assert torch.equal(concept, torch.ones(3))
    # the null itself: at most NULL_RANK - 1 random words above q, so at most that many above lo
    words = null_words()
    assert (g.map(responder.closures(g, be.encode(words).context)) > 0).sum() <= NULL_RANK - 1
    others = ["a red square on a white background", "a yellow star", "a blue triangle, black background", ""]
    assert torch.equal(g.map(responder.closures(g, be.encode(others).context)), torch.zeros(len(others)))


def test_each_distinct_row_is_measured_once(pipe, responder):
    be = responder.backend
    g = responder.gate("circle")
    calls, restore = _counting_rows(be)
    try:
        ctx = be.encode(["a green heart", "a green heart", "an orange ring"]).context
        first = responder.closures(g, ctx)
        assert sum(calls) == 2 * g.rows  # two distinct rows, each on every probe
        assert first[0] == first[1]
        again = responder.closures(g, ctx[[2, 0]])
        assert sum(calls) == 2 * g.rows and torch.equal(again, first[[2, 0]])
    finally:
        restore()


def test_bypass_runs_the_original_model_and_keeps_the_stack_as_it_was(pipe):
    unet = pipe.unet
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample

    base = run()
    stack = MembraneStack(unet)
    try:
        stack.add(_membrane(pipe, std=0.5))
        stack.set_strengths([1.0])
        on = run()
        assert not torch.equal(on, base)
        with stack.bypassed():
            assert torch.equal(run(), base)
        assert torch.equal(run(), on) and stack.current_strengths is not None
    finally:
        stack.detach()


def test_response_metric_opens_for_text_the_model_draws_and_leaves_other_images_bit_identical(pipe):
    from spm.hosts.diffusers import PipelineMembranes

    m = _membrane(pipe, std=0.5)
    # the discrete attack's free placement found this text for the circle (bench.attack): no concept word, and the
    # model draws a circle for it; the words metric gives it 0
    prompts = ["roar zl allocated francesco", "a red square on a white background"]

    def images(metric):
        with PipelineMembranes(pipe, [(m, 1.0)], metric=metric) as pm:
            out = pipe(prompts, num_inference_steps=4, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                       output_type="pt").images
            return out, pm.stack.current_strengths

    with torch.no_grad():
        base = pipe(prompts, num_inference_steps=4, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                    output_type="pt").images
    words, s_words = images("ngram_tokenuni")
    resp, s_resp = images("response")
    assert torch.equal(words, base)  # the words metric leaves both alone
    assert torch.equal(resp[1], base[1])  # another object: bit-identical under the response gate too
    assert not torch.equal(resp[0], base[0])  # the text that draws a circle now gets the membrane
    assert float(s_resp.max()) > 0.5 and float(s_words.max()) == 0.0


def test_without_a_host_responder_the_metric_is_its_words_part(encode, caplog):
    from spm.membrane import Membrane, MembraneInfo, MembraneLayer

    mem = Membrane({"lora_unet_x_attn2_to_k": MembraneLayer("linear", 768, 320)}, MembraneInfo(["cat"]), "cat")
    a, b = Transport(encode, metric="response"), Transport(encode, metric="ngram_tokenuni")
    ctx, toks = encode(["a photo of a cat", "a red car"])
    with caplog.at_level(logging.WARNING, logger="spm"):
        sa = a.scores(ctx, [mem], toks)
        a.scores(ctx, [mem], toks)
    assert torch.equal(sa, b.scores(ctx, [mem], toks))
    assert sum("needs a host that runs its UNet" in r.message for r in caplog.records) == 1


def test_sdxl_backends_get_no_gate(caplog):
    from types import SimpleNamespace

    from spm.response import Responder

    r = Responder(SimpleNamespace(is_xl=True))
    with caplog.at_level(logging.WARNING, logger="spm"):
        assert r.gate("cat") is None and r.gate("dog") is None
    assert sum("text states alone" in rec.message for rec in caplog.records) == 1
    assert torch.equal(r.scores(torch.zeros(2, 77, 8), [SimpleNamespace(info=SimpleNamespace(concepts=["cat"]))]),
                       torch.zeros(2, 1))


def test_explain_cli_prints_the_response_gate(pipe, tmp_path, capsys):
    import json

    from spm.checkpoint import save_membrane
    from spm.cli import main

    path = tmp_path / "circle.safetensors"
    save_membrane(_membrane(pipe), path)
    assert main(["explain", "--membrane", str(path), "--metric", "response", "--prompt", "a circle",
                 "--prompt", "a yellow star", "--json", "--threads", "1"]) == 0
    circle, star = json.loads(capsys.readouterr().out)
    r = circle["membranes"][0]["response"][0]
    assert r["concept"] == "circle" and r["score"] == 1.0 and r["calibration"]["usable"]
    assert star["membranes"][0]["response"][0]["score"] == 0.0 and star["membranes"][0]["strength"] == 0.0
    assert main(["explain", "--membrane", str(path), "--metric", "response", "--prompt", "a circle"]) == 0
    text = capsys.readouterr().out
    assert "response gate 'circle': score 1.000" in text and "random words close up to" in text


def _counting_rows(backend):
    """Count the UNet rows ``backend`` runs: ``(counter list, restore())``."""
    calls = []
    predict = backend.predict

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return predict(x, t, cond)

    own = "predict" in vars(backend)
    backend.predict = counting

    def restore() -> None:
        if own:
            backend.predict = predict
        else:
            del backend.predict

    return calls, restore


@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory):
    """A membrane trained for a few steps on the toy model: its file holds the response calibration."""
    import spm.response
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer
    from tests.test_train import FAST

    out = tmp_path_factory.mktemp("trained") / "circle.safetensors"
    # FAST's 4 denoising steps: the host's responder draws this concept's probes as the trainer did, not with its own
    # default 30 (a run with other settings would otherwise never match)
    cfg = TrainConfig(targets=["circle"], iterations=2, la_mode="off", synonyms="off", **FAST)
    phases = []
    with pytest.MonkeyPatch.context() as mp:  # 2 iterations pay for no calibration: lift the bound here
        mp.setattr(spm.response, "BUDGET_SHARE", 1e9)
        Trainer(DiffusersBackend(pipe), cfg, out, progress_bar=False, on_phase=phases.append).train()
    # counted in prompts scored (null, empty prompt, literal forms), reported after each target
    assert [(p.done, p.total) for p in phases if p.name == "response"] == [(0, 133), (133, 133)]
    return out


def test_the_trainer_stores_the_calibration_and_a_host_on_the_same_unet_skips_the_null(pipe, trained):
    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import DiffusersBackend
    from spm.response import FINGERPRINT_RTOL, Responder, stored_calibration

    m = load_membrane(trained)
    stored = stored_calibration(m, "circle")
    assert stored is not None and stored["params"]["probe_seed"] and len(stored["fingerprint"]["proj"]) > 0
    assert stored_calibration(m, "square") is None
    fresh_be = DiffusersBackend(pipe)
    calls, restore = _counting_rows(fresh_be)
    try:
        fresh = Responder(fresh_be, steps=stored["params"]["steps"]).build("circle")  # computed as the trainer did
        computed_rows = sum(calls)
        calls.clear()
        from_file = Responder(fresh_be).build("circle", stored)
        file_rows = sum(calls)
    finally:
        restore()
    assert fresh.source == "computed" and from_file.source == "file" and "within" in from_file.reason
    assert (from_file.q, from_file.top, from_file.empty) == (stored["q"], stored["top"], stored["empty"])
    assert (from_file.q, from_file.top, from_file.lo, from_file.hi) == pytest.approx((fresh.q, fresh.top, fresh.lo, fresh.hi))
    assert torch.equal(from_file.x_t, fresh.x_t)  # the trainer's probe settings, not the host's default 30 steps
    # the null (NULL_WORDS random words, "" and the literal forms, each on every probe row) is not scored again
    assert computed_rows - file_rows >= 100 * fresh.rows and file_rows < computed_rows / 5
    assert FINGERPRINT_RTOL < 1


def test_a_calibration_from_another_unet_or_other_probe_settings_is_recomputed(pipe, trained):
    import copy

    from spm.checkpoint import load_membrane
    from spm.hosts.diffusers import DiffusersBackend
    from spm.response import Responder, stored_calibration

    stored = stored_calibration(load_membrane(trained), "circle")
    moved = copy.deepcopy(stored)
    moved["fingerprint"]["proj"] = [v * 1.2 for v in moved["fingerprint"]["proj"]]  # another UNet (a fine-tune)
    moved["q"] = 0.9
    g = Responder(DiffusersBackend(pipe)).build("circle", moved)
    assert g.source == "computed" and "otherwise" in g.reason and g.q != pytest.approx(0.9)
    other = copy.deepcopy(stored)
    other["params"]["resolution"] = 16
    g = Responder(DiffusersBackend(pipe)).build("circle", other)
    assert g.source == "computed" and "other probe settings" in g.reason
    broken = {**stored, "q": "not a number"}
    g = Responder(DiffusersBackend(pipe)).build("circle", broken)
    assert g.source == "computed" and "unreadable" in g.reason


def test_a_short_run_stores_no_calibration_and_the_host_size_is_the_webuis(pipe, monkeypatch):
    import spm.response
    from spm.hosts.diffusers import DiffusersBackend
    from spm.response import build_gate, calibration_rows, training_response

    be = DiffusersBackend(pipe)
    kw = dict(steps=4, guidance=3.0, levels=4)
    rows = calibration_rows(4, 4)
    gate = build_gate(be, "circle", steps=4, guidance=3.0, levels=4)
    assert rows > 133 * gate.rows  # the null, "" and the forms on every probe, and the probes' trajectories
    # more than BUDGET_SHARE of the training's planned rows: not stored (computed on first use)
    assert training_response(be, None, ["circle"], planned=int(rows / spm.response.BUDGET_SHARE) - 1, **kw) == {}
    # the WebUI sets the probe size of its Settings on the training backend: the stored calibration is made at it
    be.response_resolution = 16
    native = be.latent.resolution
    assert native > 16
    # at a smaller probe size it costs less: (16 / native)^2 of the rows, within the same budget
    got = training_response(be, None, ["circle"], planned=int(rows * (16 / native) ** 2 / spm.response.BUDGET_SHARE) + 1,
                            **kw)
    assert got["concepts"]["circle"]["params"]["resolution"] == 16
    assert got["concepts"]["circle"]["fingerprint"]["dim"] == math.prod(be.latent.shape(1, 16, 16))


def test_explain_says_where_the_calibration_came_from(trained, capsys):
    from spm.cli import main

    assert main(["explain", "--membrane", str(trained), "--metric", "response", "--prompt", "a circle",
                 "--threads", "1"]) == 0
    assert "calibration: stored in the file" in capsys.readouterr().out


def _open_every_row(responder):
    """Make every built gate give every row full strength (its closure is still measured in the hook)."""
    for g in responder.gates.values():
        g.usable, g.lo, g.hi = True, -1e30, -1e30 + 1.0


@pytest.mark.parametrize("forge", [False, True])
def test_the_webui_builds_gates_before_sampling_and_scores_rows_inside_the_hook(tmp_path, tokenizer, text_encoder, forge):
    from tests import webui_stub as stub
    from tests import webui_stub_train as tstub
    from tests.test_webui_lifecycle import World

    w = World(tmp_path, tokenizer, text_encoder, forge=forge)
    try:
        assert w.env.shared.opts.data_labels["spm_response_resolution"].default == 0  # 0: the model's native size
        w.env.shared.opts.data["spm_response_resolution"] = 16  # Settings -> SPM: the stub's tiny UNet at 16 px
        if forge:  # the schedule a loaded Forge model carries (KModel.predictor), on every copy of forge_objects
            for fo in (w.model.forge_objects, w.model.forge_objects_original):
                fo.unet.model.predictor = tstub.Prediction("epsilon")
        else:
            w.model = tstub.A1111Model(w.unet, stub.HijackedCLIP(tokenizer, text_encoder))
            w.env.shared.sd_model = w.model
            stub.fire("model_loaded", w.model)
        w.add_membrane("m", concepts=("cat",))
        words = w.run(["a red car <spm:m>"], args=(False, [], "", "ngram_tokenuni", 1.0))
        assert all(s is None or float(s.max()) == 0.0 for s in w.strengths)  # the words part leaves the car alone
        first = w.run(["a red car <spm:m>"], args=(False, [], "", "response", 1.0))
        r = w.state.runtime().attachment.transport.responder
        assert r is not None and not r.lazy and set(r.gates) == {"cat"} and r.gates["cat"] is not None
        assert r.resolution == 16 and tuple(r.gates["cat"].x_t.shape[-2:]) == (16 // r.backend.latent.downscale,) * 2
        assert not w.p.comments
        if not r.gates["cat"].usable:  # a random tiny model may draw nothing like the concept: then it scores 0
            assert torch.equal(first.images[0], words.images[0])
        _open_every_row(r)
        out = w.run(["a blue house <spm:m>"], args=(False, [], "", "response", 1.0))
        base = w.run(["a blue house <spm:m>"], args=(False, [], "", "ngram_tokenuni", 1.0))
        assert r.gates["cat"].seen  # rows were measured inside the UNet hook (a reentrant call, membranes bypassed)
        assert not torch.equal(out.images[0], base.images[0])
        assert max(float(s.max()) for s in w.strengths if s is not None) == 0.0  # (the base run's strengths)
    finally:
        w.close()


def test_the_webui_explains_the_response_gate(world):  # noqa: F811
    from spm.webui.explain import explain_prompt

    world.add_membrane("m")
    text, _ = explain_prompt("a cat", True, ["m"], "", "response", 1.0)
    # the lifecycle stub's model has no noise schedule: the gate cannot run there, which is said, and words still apply
    assert "membrane m: strength 1.000" in text and "response gate: not available on this host" in text


def test_the_empty_rule_starts_the_ramp_at_the_empty_prompts_closure(monkeypatch):
    """``spm.response.LO_RULE`` (bench.attack --response-lo): "null", the default, opens above random words' second-largest
    closure; "empty" above the empty prompt's own (0 by construction when the surrogate is "")."""
    import spm.response as R

    z = torch.zeros(1)
    g = R.ResponseGate("circle", z, z, z, z, q=0.4, top=0.9, empty=0.0)
    g._place()
    assert (g.lo, g.hi, g.usable) == pytest.approx((0.4, 0.4 + 0.5 * R.HI_FRAC, True))
    monkeypatch.setattr(R, "LO_RULE", "empty")
    g._place()
    assert (g.lo, g.hi, g.usable) == pytest.approx((0.0, 0.4 + 0.5 * R.HI_FRAC, True))
    assert g.map(torch.tensor([-0.1, 0.0, 0.25])).tolist() == pytest.approx([0.0, 0.0, 0.25 / g.hi])


@pytest.mark.parametrize("transport", [None, {}, {"response": "x"}, {"response": {"concepts": ["circle"]}},
                                       {"response": {"concepts": {"circle": 3}}}])
def test_a_malformed_stored_calibration_reads_as_none(transport):
    """A hand-edited or foreign ``spm_transport["response"]`` never breaks a generation: the host calibrates."""
    from types import SimpleNamespace

    from spm.response import stored_calibration

    assert stored_calibration(SimpleNamespace(info=SimpleNamespace(transport=transport)), "circle") is None


def _with_ramp(name, concepts, ramp):
    from types import SimpleNamespace

    transport = {} if ramp is None else {"response": {"ramp": ramp}}
    return SimpleNamespace(name=name, info=SimpleNamespace(concepts=list(concepts), transport=transport))


def test_a_membrane_file_names_its_ramp_and_the_responder_scores_each_membrane_by_its_own(caplog):
    """``spm_transport["response"]["ramp"]`` (the trainer writes "empty" for robust training): rows between the empty
    prompt's closure and random words' second-largest open a robust membrane a little and leave a plain one shut, on
    one shared gate; a file naming no ramp, or one this version does not know (logged), takes LO_RULE."""
    from types import SimpleNamespace

    import spm.response as R

    z = torch.zeros(1)
    g = R.ResponseGate("circle", z, z, z, z, q=0.4, top=0.9, empty=0.0)
    g._place()
    plain, robust = _with_ramp("plain", ["circle"], None), _with_ramp("robust", ["circle"], "empty")
    odd = _with_ramp("odd", ["circle"], "sideways")
    assert R.membrane_ramp(plain) is None and R.membrane_ramp(robust) == "empty"
    with caplog.at_level("WARNING", logger="spm"):
        assert R.membrane_ramp(odd) is None
    assert "names the response ramp 'sideways'" in caplog.text
    assert g.ramp() == (g.lo, g.hi, g.usable) and g.ramp("empty")[0] == 0.0 and g.ramp("null")[0] == pytest.approx(0.4)
    assert g.to_dict("empty")["ramp"] == "empty" and g.to_dict()["ramp"] == R.LO_RULE
    r = R.Responder(SimpleNamespace(is_xl=False))
    r.gates["circle"] = g
    ctx = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    for i, c in enumerate([0.2, -0.3, 0.8]):  # nearer the concept than "", below "", the concept itself
        g.seen[R._digest(ctx[i])] = c
    s = r.scores(ctx, [plain, robust, odd])  # every row already measured: no UNet call
    assert s[:, 0].tolist() == [0.0, 0.0, 1.0]
    assert s[:, 1].tolist() == pytest.approx([0.2 / g.hi, 0.0, 1.0]) and s[:, 2].tolist() == s[:, 0].tolist()


def test_robust_training_writes_the_ramp_and_explain_says_it(pipe, tmp_path, capsys):
    from spm.checkpoint import load_membrane
    from spm.cli import main
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer
    from tests.test_train import FAST

    out = tmp_path / "rob.safetensors"
    cfg = TrainConfig(targets=["circle"], iterations=2, la_mode="off", synonyms="off", robust="embedding", **FAST)
    Trainer(DiffusersBackend(pipe), cfg, out, progress_bar=False).train()
    m = load_membrane(out)
    assert m.info.transport["response"]["ramp"] == "empty"
    plain = tmp_path / "plain.safetensors"
    Trainer(DiffusersBackend(pipe), cfg.with_(robust="off"), plain, progress_bar=False).train()
    assert "ramp" not in (load_membrane(plain).info.transport.get("response") or {})
    capsys.readouterr()
    assert main(["explain", "--membrane", str(out), "--metric", "response", "--prompt", "a red circle", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "ramp from the empty prompt's closure" in text, text


def test_stored_probe_settings_are_adopted_only_where_a_training_run_could_have_used_them(caplog):
    """A hand-edited or foreign file cannot make the host draw probes of thousands of steps: settings outside the
    model's noise schedule (or levels beyond the steps, a guidance that is not a number) fall back to the host's
    own, and the calibration is then recomputed for the mismatch."""
    from types import SimpleNamespace

    import spm.response as R

    r = R.Responder(SimpleNamespace(is_xl=False, alphas_cumprod=torch.ones(1000)), steps=30, guidance=3.0)
    own = (30, 3.0, r.levels)
    assert r.stored_settings("circle", None) == own and r.stored_settings("circle", {"params": "x"}) == own
    assert r.stored_settings("circle", {"params": {"steps": 50, "guidance": 2.5, "levels": 4}}) == (50, 2.5, 4)
    assert r.stored_settings("circle", {"params": {"steps": 1000, "levels": 1}}) == (1000, 3.0, 1)
    with caplog.at_level("WARNING", logger="spm"):
        for bad in ({"steps": 100000}, {"steps": 0}, {"steps": 10, "levels": 11}, {"guidance": "nan"},
                    {"steps": "many"}, {"steps": 1e400}):
            assert r.stored_settings("circle", {"params": bad}) == own, bad
    assert caplog.text.count("which no training run uses on this model (at most 1000 steps)") == 4
