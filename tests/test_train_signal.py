"""The trainer's erasure signal (spm/train/signal.py): its statistic, early stopping, the reported result, resume."""

from __future__ import annotations

import json

import pytest
import torch

from spm.attach import MembraneStack
from spm.checkpoint import info_dict, load_membrane, read_file
from spm.hosts.diffusers import DiffusersBackend
from spm.membrane import Membrane
from spm.naming import find_targets
from spm.train import TrainConfig, Trainer
from spm.train import signal as sg
from spm.train.loop import Trainer as LoopTrainer
from spm.train.state import state_path
from tests.test_train_models import tiny_sd_pipe

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(anchors=1, pool_size=2, max_denoising_steps=4, lr=3e-3, lr_scheduler="constant", lr_warmup_steps=0)
KEYS = ("erased", "signal", "threshold", "message")


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend(tiny_sd_pipe())


def _probe(backend, membrane, **kw):
    stack = MembraneStack(backend.unet, trainable=True)
    stack.add(membrane, 1.0)
    cond = backend.encode(["circle", ""])
    probe = sg.ErasureProbe(backend, stack, cond.rows([0]), cond.rows([1]), cond.rows([1]), steps=4, guidance=3.0,
                            resolution=backend.latent.resolution, surrogate_is_uncond=True, **kw)
    return stack, probe


def test_statistic_is_the_share_of_the_gap_closed_and_the_rule_is_the_bisector():
    torch.manual_seed(0)

    class P:  # the statistic only needs o, s and the level of each probe row
        levels = [1, 2]
        level_of = [1, 1, 2, 2]
        trajectories = 2
        o = torch.randn(4, 4, 3, 3)
        s = torch.randn(4, 4, 3, 3)

    p = P()
    stat = sg.ErasureProbe.statistic.__get__(p)
    u = p.o - p.s
    assert stat(p.o)[0] == pytest.approx(0.0, abs=1e-12) and stat(p.o)[2] == pytest.approx(1.0)
    assert stat(p.s)[0] == pytest.approx(1.0) and stat(p.s)[2] == pytest.approx(0.0, abs=1e-12)
    assert stat(p.s - 1.0 * u)[0] == pytest.approx(2.0)  # the erase goal with g = 1 lies at 1 + g
    # an orthogonal component does not count; the threshold is exactly "at least as close to the mirror image of the
    # original through the surrogate (2s - o) as to the original", i.e. the target's direction is cancelled
    w = torch.randn_like(u)
    w -= (w.flatten() @ u.flatten()) / (u.flatten() @ u.flatten()) * u
    for a in (0.5, 0.01, -0.01, -0.3):
        m = p.s + a * u + 5 * w
        closed = stat(m)[0]
        assert closed == pytest.approx(1 - a)
        closer_to_mirror = float((m - (2 * p.s - p.o)).norm()) < float((m - p.o).norm())
        assert (closed >= sg.THRESHOLD) == closer_to_mirror
        # the target-ward part of a CFG-guided prediction, w_cfg * (m - s) projected on u, vanishes from here on
        assert (float(((m - p.s).flatten() @ u.flatten())) <= 0) == (closed >= sg.THRESHOLD)
    assert len(stat(p.s)[1]) == 2


def test_each_level_is_judged_by_its_lower_confidence_bound_over_the_held_out_seeds():
    # Student's t quantiles (exact at 1 and 2 degrees of freedom; tables: 2.353, 1.895, 1.697)
    assert sg.t_quantile(0.95, 1) == pytest.approx(6.3138, abs=1e-4)
    assert sg.t_quantile(0.95, 2) == pytest.approx(2.9200, abs=1e-4)
    for dof, table in ((3, 2.353), (7, 1.895), (30, 1.697)):
        assert sg.t_quantile(0.95, dof) == pytest.approx(table, rel=3e-3)
    # the point estimate is the ratio of sums; one sample has no spread to bound
    num, den = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])
    r, lb = sg.ratio_lower_bound(num, den)
    assert r == pytest.approx(4 / 3) and lb < r
    assert sg.ratio_lower_bound(num[:1], den[:1]) == (1.0, 1.0)
    # every seed closes its gap alike: no spread, the bound is the ratio
    assert sg.ratio_lower_bound(2 * den, den) == pytest.approx((2.0, 2.0))

    class P:  # one level, 8 seeds: a ratio above 1 on average with two seeds below is not erased
        levels = [3]
        level_of = [3] * 8
        trajectories = 8
        o = torch.zeros(8, 1, 1, 1)
        s = -torch.ones(8, 1, 1, 1)  # u = o - s = 1 for every seed

    closed_per_seed = torch.tensor([1.02, 1.22, 1.64, 1.24, 1.38, 0.92, 0.91, 0.96])
    m = (P.o - closed_per_seed.reshape(8, 1, 1, 1))  # closed_i = <o - m, u> / |u|^2
    closed, bound, remaining, ratio = sg.ErasureProbe.statistic.__get__(P())(m)
    assert ratio[0] == pytest.approx(float(closed_per_seed.mean())) == pytest.approx(closed)
    assert ratio[0] > sg.THRESHOLD > bound[0]  # on average past the threshold, not with 95 % confidence
    p = P()
    sg.ErasureProbe.statistic.__get__(p)(m)
    check = sg.Check(0, min(bound), bound, remaining, closed, ratio, p.last_per_seed)
    assert not check.passed and check.to_dict()["level_ratio"] == ratio
    assert check.to_dict()["per_seed"] == [[round(float(v), 4) for v in closed_per_seed]]  # each seed's own ratio
    # the same seeds all further on: erased
    closed, bound, _, _ = sg.ErasureProbe.statistic.__get__(P())(P.o - (closed_per_seed + 0.3).reshape(8, 1, 1, 1))
    assert bound[0] > sg.THRESHOLD


def test_the_signal_pools_each_trajectory_over_its_levels_and_bounds_over_trajectories():
    """The signal is the lower bound over held-out trajectories of each trajectory's ratio pooled over its noise
    levels (weighted by the concept's effect there), not the worst level: a level that carries little of the
    concept's effect and is left half-closed does not decide, one trajectory left open does pull the bound down."""

    class P:  # 2 levels x 4 trajectories, rows ordered level by level (as the probe builds them)
        levels = [2, 7]
        level_of = [2] * 4 + [7] * 4
        trajectories = 4
        o = torch.zeros(8, 1, 1, 1)
        s = -torch.cat([torch.full((4, 1, 1, 1), 3.0), torch.full((4, 1, 1, 1), 0.5)])  # |u|: 3 at level 2, 0.5 at 7

    def measure(closed_per_row):
        p = P()
        u = P.o - P.s
        m = P.o - torch.tensor(closed_per_row).reshape(8, 1, 1, 1) * u  # closed_i = <o - m, u> / |u|^2
        closed, bound, _, ratio = sg.ErasureProbe.statistic.__get__(p)(m)
        return p.last_pooled, closed, bound, ratio

    # the noisy level is cancelled (1.3 in every trajectory), the quiet one only half (0.5): pooled 1.3*9+0.5*0.25 / 9.25
    (r, lb), closed, bound, ratio = measure([1.3] * 4 + [0.5] * 4)
    assert r == pytest.approx((1.3 * 9 + 0.5 * 0.25) / 9.25) == pytest.approx(closed)
    assert lb == pytest.approx(r) and lb >= sg.THRESHOLD  # every trajectory alike: no spread
    assert min(bound) < sg.THRESHOLD  # the old rule, the worst level's bound, said not erased
    # one trajectory left open at the level that matters: its pooled ratio is low and the bound falls under 1
    (r2, lb2), *_ = measure([1.3, 1.3, 1.3, 0.2] + [0.5] * 4)
    assert r2 > sg.THRESHOLD > lb2


def test_levels_interval_and_earliest_stop_follow_the_run():
    assert sg.probe_levels(30, 4) == [5, 12, 19, 26] and sg.probe_levels(4, 4) == [1, 2, 3]
    assert all(1 <= k <= 29 for k in sg.probe_levels(30, 7))
    assert sg.check_interval(600, 20) == 30 and sg.check_interval(1000, 20) == 50 and sg.check_interval(19, 20) == 19
    assert sg.min_steps(600, 500, 30, 2) == 100  # the capped warm-up
    assert sg.min_steps(600, 0, 30, 2) == 60  # two checks


def test_zero_membrane_is_not_erased_and_a_surrogate_membrane_is(backend):
    zero = Membrane.for_targets(find_targets(backend.unet))
    stack, probe = _probe(backend, zero)
    try:
        c = probe.measure(0)
        assert c.signal == pytest.approx(0.0, abs=1e-4) and c.remaining == pytest.approx(1.0, abs=1e-4) and not c.passed
        assert probe.rows == 8 * 3  # 8 held-out seeds x 3 levels
        # strength 0 reproduces the original exactly; the probes are held out of (and independent of) the membrane
        assert probe.measure(0, strength=0.0).signal == pytest.approx(0.0, abs=1e-4)
    finally:
        stack.detach()
    # a few steps of training on the target move the signal towards erased
    cfg = TrainConfig(targets=["circle"], iterations=8, la_mode="off", stop_when_erased=False, contexts=0, **FAST)
    res = Trainer(backend, cfg, progress_bar=False).train()
    stack, probe = _probe(backend, res.membrane)
    try:
        after = probe.measure(8)
    finally:
        stack.detach()
    assert after.signal > 0.5, after
    assert res.erasure["signal"] == pytest.approx(after.signal, rel=1e-4)  # the trainer measured the same probes
    assert set(KEYS) <= set(res.erasure) and res.erasure["erased"] is after.passed
    assert res.erasure["threshold"] == sg.THRESHOLD == 1.0
    assert res.erasure["message"].startswith("erased" if after.passed else "not erased")


def _scripted(monkeypatch, values: dict[int, float], calls: list[int]):
    def fake(self, stack, cond, step, ac):
        calls.append(step)
        v = values.get(step, 0.0)
        return sg.Check(step, v, [v], 1 - v)

    monkeypatch.setattr(LoopTrainer, "_check", fake)


def test_early_stop_waits_for_consecutive_passing_checks(backend, tmp_path, monkeypatch):
    calls: list[int] = []
    # 40 iterations, 20 checks: every 2 steps, never before 2 checks (step 4)
    _scripted(monkeypatch, {2: 1.2, 4: 0.8, 6: 1.2, 8: 1.4, 10: 1.8}, calls)
    cfg = TrainConfig(targets=["circle"], iterations=40, **FAST)
    out = tmp_path / "e.safetensors"
    res = Trainer(backend, cfg, out, progress_bar=False).train()
    assert calls == [2, 4, 6, 8] and res.steps == 8 and not res.interrupted  # 1.2 then 0.8 resets; 6 and 8 pass
    assert res.erasure["erased"] and res.erasure["stopped_early"] and res.erasure["signal"] == 1.4
    assert "stopped at step 8 of 40" in res.erasure["message"]
    assert [h.get("erasure_signal") for h in res.history if "erasure_signal" in h] == [1.2, 0.8, 1.2, 1.4]
    # the result is in the file: spm_training.erasure and the spm_erasure key
    _, meta = read_file(out)
    e = json.loads(meta["spm_erasure"])
    assert {k: e[k] for k in KEYS} == {k: res.erasure[k] for k in KEYS}
    assert load_membrane(out).info.training["erasure"]["erased"] is True and info_dict(out)["erasure"]["erased"]
    assert [c["step"] for c in load_membrane(out).info.training["signal_history"]] == [2, 4, 6, 8]

    # disabled: the whole budget runs, and the end is still measured and reported
    calls.clear()
    res = Trainer(backend, cfg.with_(stop_when_erased=False), progress_bar=False).train()
    assert res.steps == 40 and calls == list(range(2, 41, 2)) and res.erasure["erased"] is False
    assert res.erasure["message"].startswith("not erased") and "--iterations" in res.erasure["message"]


def test_no_early_stop_before_the_earliest_step(backend, monkeypatch):
    calls: list[int] = []
    _scripted(monkeypatch, {s: 1.5 for s in range(0, 61)}, calls)
    # warm-up 60 steps (capped at a sixth of the run: 10): the passing checks at 3, 6 and 9 are too early
    cfg = TrainConfig(targets=["circle"], iterations=60, **{**FAST, "lr_warmup_steps": 60})
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert res.steps == 12 and calls == [3, 6, 9, 12]


def test_a_run_that_ends_not_erased_says_what_to_try(backend, monkeypatch):
    _scripted(monkeypatch, {}, [])
    cfg = TrainConfig(targets=["circle"], iterations=20, **FAST)
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert res.steps == 20 and res.erasure["erased"] is False and res.erasure["signal"] == 0.0
    msg = res.erasure["message"]
    for hint in ("--iterations 40", "--lr 0.006", "--guidance-scale 2", "--surrogate"):
        assert hint in msg, msg


def test_resume_keeps_the_signal_state(backend, tmp_path, monkeypatch):
    calls: list[int] = []
    _scripted(monkeypatch, {2: 0.1, 4: 1.1, 6: 1.2}, calls)
    cfg = TrainConfig(targets=["circle"], iterations=40, save_every=4, **FAST)
    out = tmp_path / "r.safetensors"
    res = Trainer(backend, cfg, out, progress_bar=False, should_stop=lambda: bool(calls) and calls[-1] >= 4).train()
    assert res.interrupted and res.steps == 4 and calls == [2, 4]
    assert res.erasure["erased"] is True and res.erasure["signal"] == 1.1  # the last check, reported on interrupt
    # resumed: one passing check already counts, so the next passing check (step 6) stops the run
    res2 = Trainer(backend, cfg, out, resume=True, progress_bar=False).train()
    assert res2.steps == 6 and calls == [2, 4, 6] and res2.erasure["stopped_early"]
    assert [c["step"] for c in load_membrane(out).info.training["signal_history"]] == [2, 4, 6]
    assert state_path(out).exists()


def test_cli_prints_the_result(tmp_path, capsys):
    from spm import cli

    d = tmp_path / "pipe"
    tiny_sd_pipe().save_pretrained(str(d))
    out = tmp_path / "c.safetensors"
    args = ["train", "--model", str(d), "--target", "circle", "-o", str(out), "--iterations", "3", "--pool-size", "2",
            "--max-denoising-steps", "4", "--anchors", "1", "--device", "cpu", "--no-early-stop"]
    assert cli.main(args) == 0
    cap = capsys.readouterr()
    got = json.loads(cap.out)["erasure"]
    assert set(got) == set(KEYS) and got["message"].split(":")[0] in ("erased", "not erased")
    assert got["message"] in cap.err
    assert load_membrane(out).info.training["stop_when_erased"] is False


def test_the_words_closure_is_the_signal_applied_to_another_prompt(backend):
    """:meth:`ErasureProbe.measure_words`: the share of the *target's* gap closed when the prompt is another word.
    With a zero membrane the target itself closes nothing and the surrogate ("") closes it all, exactly."""
    zero = Membrane.for_targets(find_targets(backend.unet))
    stack, probe = _probe(backend, zero)
    try:
        rows = list(range(probe.rows))
        closed = probe.measure_words(rows, backend.encode(["circle", "", "square"]), batch_rows=probe.rows + 1)
        assert closed[0] == pytest.approx(0.0, abs=1e-4) and closed[1] == pytest.approx(1.0, abs=1e-4)
        # the split over UNet calls does not change the values, and the target's value is the signal's own ratio
        split = probe.measure_words(rows, backend.encode(["circle", "", "square"]), batch_rows=1)
        assert split == pytest.approx(closed, abs=1e-5)
        assert closed[0] == pytest.approx(min(probe.measure(0).level_ratio), abs=1e-4)
    finally:
        stack.detach()


def test_the_end_reports_the_model_synonyms_and_training_does_not_wait_for_them(backend, monkeypatch):
    """The transport opens the membrane for the model synonyms; the end of a run whose target passed says whether
    it erases them too (``synonyms``, ``synonyms_erased``, the message), but the stop does not wait for them."""
    calls: list[int] = []
    _scripted(monkeypatch, {4: 1.2, 6: 1.3}, calls)
    monkeypatch.setattr(LoopTrainer, "_synonyms", lambda self, stack, cond, ac: {"circle": ["disc", "ball"]})
    found = {"disc": 0.3, "ball": 1.2}
    monkeypatch.setattr(LoopTrainer, "_synonym_closures", lambda self, stack, cond, ac: dict(found))
    cfg = TrainConfig(targets=["circle"], iterations=40, **FAST)
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert calls == [2, 4, 6] and res.steps == 6  # stopped on the target's patience, "disc" notwithstanding
    assert res.erasure["erased"] and res.erasure["synonyms"] == found and res.erasure["synonyms_erased"] is False
    msg = res.erasure["message"]
    assert "1 of the 2 words the model draws as the target" in msg and "disc 30%" in msg and "--iterations" in msg
    found["disc"] = 1.1
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert res.erasure["synonyms_erased"] and "so are the 2 words the model draws as the target" in res.erasure["message"]
    # one word: singular, as a sentence should read
    monkeypatch.setattr(LoopTrainer, "_synonym_closures", lambda self, stack, cond, ac: {"disc": 1.1})
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert "so is the word the model draws as the target" in res.erasure["message"]
    monkeypatch.setattr(LoopTrainer, "_synonym_closures", lambda self, stack, cond, ac: {"disc": 0.3})
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert "but the word the model draws as the target (it opens the membrane) still draws it: disc 30%" in res.erasure["message"]


def test_the_synonyms_are_measured_with_the_membrane_on(backend, monkeypatch):
    """The end's synonym measurement runs with the membrane attached, on all of a target's probe rows when the
    probe has no more seeds than the scan takes: a "synonym" that is the target itself then closes exactly what
    the final check measured (a detached membrane would give 0)."""
    from spm.train import synonyms as syn

    monkeypatch.setattr(LoopTrainer, "_synonyms", lambda self, stack, cond, ac: {"circle": ["circle"]})
    monkeypatch.setattr(sg.Check, "passed", property(lambda self: True))
    cfg = TrainConfig(targets=["circle"], iterations=6, la_mode="off", stop_when_erased=False, contexts=0,
                      signal_trajectories=syn.PROBES_PER_LEVEL, **{**FAST, "lr": 3e-2})
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert min(res.erasure["level_ratio"]) > 0.05  # the membrane moved the prediction
    assert res.erasure["synonyms"]["circle"] == pytest.approx(res.erasure["aggregate"], abs=1e-3)


def test_an_unpassed_target_measures_no_synonyms(backend, monkeypatch):
    monkeypatch.setattr(LoopTrainer, "_synonyms", lambda self, stack, cond, ac: {"circle": ["disc"]})
    monkeypatch.setattr(sg.Check, "passed", property(lambda self: False))
    seen = []
    monkeypatch.setattr(sg.ErasureProbe, "measure_words", lambda self, *a, **k: seen.append(a) or [1.0])
    res = Trainer(backend, TrainConfig(targets=["circle"], iterations=4, **FAST), progress_bar=False).train()
    assert seen == [] and "synonyms" not in res.erasure


def test_a_verdict_decided_inside_other_words_says_the_target_alone_is_erased():
    """With context probes, a run whose target alone passes but whose target inside other words does not says so,
    and points at checking such prompts rather than only at training longer; a run where the target alone fails too
    gets no such line."""
    cfg = TrainConfig(targets=["sun"])

    def check(alone: float, in_context: float) -> sg.Check:
        return sg.Check(step=1200, signal=min(alone, in_context), per_level=[min(alone, in_context)], remaining=0.1,
                        parts={"alone": alone, "in_context": in_context})

    msg = sg.summary(check(1.29, 0.51), cfg, 1200, False, False, None, None)["message"]
    assert msg.startswith("not erased:") and "(the target alone 129%, inside other words 51%; the lesser decides)" in msg
    assert "the target's own prompt is erased" in msg and "spm eval" in msg
    for alone, ctx in ((0.62, 0.5), (1.1, 1.05)):  # the target alone not erased either; both erased
        assert "own prompt is erased" not in sg.summary(check(alone, ctx), cfg, 1200, False, False, None, None)["message"]
    # the check names the held-out context prompt it found least erased: the message says which to look at
    named = check(1.29, 0.51)
    named.weakest_context = ("sun near crab", 0.031)
    msg = sg.summary(named, cfg, 1200, False, False, None, None)["message"]
    assert "(spm eval, or your own); the least erased held-out one: 'sun near crab' (3%)" in msg
    assert named.to_dict()["weakest_context"] == ["sun near crab", 0.031]


def test_a_verdict_short_only_by_its_confidence_bound_says_so():
    """A run whose plain pooled ratio passes while its lower bound over the held-out probes does not says that the estimate itself is erased and points at looking at images; a plain ratio below the threshold,
    or a single probe (no bound), gets no such line."""
    cfg = TrainConfig(targets=["sun"])

    def check(bound: float, plain: float | None) -> sg.Check:
        return sg.Check(step=600, signal=bound, per_level=[bound] * 2, remaining=0.1, aggregate=plain)

    class Probe:  # what summary reads of the held-out probes
        trajectories, level_t, rows = 8, [900, 500], 16

    msg = sg.summary(check(0.93, 1.08), cfg, 600, False, False, Probe(), None)["message"]
    assert msg.startswith("not erased:") and "(plain ratio 108%), only the 95% bound is short" in msg
    assert "before/after grid" in msg
    for bound, plain in ((0.93, 0.97), (0.93, None), (1.02, 1.1)):
        assert "plain ratio" not in sg.summary(check(bound, plain), cfg, 600, False, False, Probe(), None)["message"]
    Probe.trajectories = 1
    assert "plain ratio" not in sg.summary(check(0.93, 1.08), cfg, 600, False, False, Probe(), None)["message"]


def test_both_hints_of_a_strict_verdict_share_one_before_training_longer():
    cfg = TrainConfig(targets=["sun"])
    check = sg.Check(step=1200, signal=0.9, per_level=[0.9, 1.2], remaining=0.1, aggregate=1.05, level_ratio=[1.05, 1.4],
                     parts={"alone": 1.2, "in_context": 0.9})
    msg = sg.summary(check, cfg, 1200, False, False, None, None)["message"]
    assert "own prompt is erased" in msg and "(plain ratio 105%)" in msg
    assert msg.count("before training longer") == 1 and msg.endswith("to judge before training longer")


def test_parts_ahead_of_a_lagging_part_pause_their_erase_terms():
    assert sg.pause_parts(None) == {} and sg.pause_parts({"alone": 1.4}) == {}  # one part: the stop rule decides
    assert sg.pause_parts({"alone": 1.3, "in_context": 0.8}) == {"alone": 0.0}
    assert sg.pause_parts({"alone": 0.9, "in_context": 1.0, "adversaries": 1.2}) == {"in_context": 0.0, "adversaries": 0.0}
    assert sg.pause_parts({"alone": 1.1, "in_context": 1.0, "adversaries": 1.2}) == {}  # all pass: the next check confirms
    assert sg.pause_parts({"alone": 0.5, "in_context": 0.7}) == {}  # all short: every term works


def test_the_trainer_pauses_the_terms_of_the_parts_that_pass(backend, monkeypatch):
    """The check's parts decide the next interval's erase terms: the target alone (the objective's erase term), the
    context prompts (their extra rows) and robust training's adversaries (their rows; the search still runs)."""
    import spm.train.loop as lp
    from spm.train.robust import RobustTraining

    script = {2: {"alone": 1.3, "in_context": 0.6, "adversaries": 1.1},
              4: {"alone": 0.9, "in_context": 1.2, "adversaries": 1.0},
              6: {"alone": 1.2, "in_context": 1.1, "adversaries": 1.3}}

    def fake(self, stack, cond, step, ac):
        parts = dict(script.get(step, {"alone": 0.0, "in_context": 0.0, "adversaries": 0.0}))
        v = min(parts.values())
        c = sg.Check(step, v, [v], 1 - v)
        c.parts = parts
        return c

    log: list[dict] = []
    obj, extra, rloss = lp.objective_step, lp.extra_erase_loss, RobustTraining.loss

    def objective(*a, **k):
        log.append({"alone": k.get("erase_weight", 1.0), "context": 0, "adv": None})
        return obj(*a, **k)

    def extra_rows(*a, **k):
        if not torch.is_tensor(a[5]):  # the context prompts' term (its neutral is the surrogate's context rows)
            log[-1]["context"] += 1
        return extra(*a, **k)

    def robust_loss(self, *a, **k):
        log[-1]["adv"] = k.get("erase", True)
        return rloss(self, *a, **k)

    monkeypatch.setattr(LoopTrainer, "_check", fake)
    monkeypatch.setattr(lp, "objective_step", objective)
    monkeypatch.setattr(lp, "extra_erase_loss", extra_rows)
    monkeypatch.setattr(RobustTraining, "loss", robust_loss)
    cfg = TrainConfig(targets=["circle"], iterations=8, signal_checks=4, robust="embedding", stop_when_erased=False,
                      **FAST)
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert res.steps == 8 and len(log) == 8
    assert all(r["context"] == 1 for r in log[:2]), log  # the run has context prompts
    want = [(1.0, 1, True)] * 2 + [(0.0, 1, False)] * 2 + [(1.0, 0, False)] * 2 + [(1.0, 1, True)] * 2
    assert [(r["alone"], r["context"], r["adv"]) for r in log] == want
    searches = res.membrane.info.training["robust_stats"]["searches"]
    assert searches == 4  # every search ran, paused or not


def test_the_words_closure_takes_a_unet_output_in_any_memory_layout(backend, monkeypatch):
    """A WebUI's UNet may hand back a channels-last tensor (real A1111: robust training's check of its adversaries
    failed with "view size is not compatible"): the words closure and the scan's distances read it as it is."""
    from spm.train import synonyms

    zero = Membrane.for_targets(find_targets(backend.unet))
    stack, probe = _probe(backend, zero)
    try:
        rows = list(range(probe.rows))
        words = backend.encode(["circle", "", "square"])
        plain = probe.measure_words(rows, words)
        d_plain = synonyms.distances(backend, stack, probe, rows, words, None)
        predict = backend.predict
        monkeypatch.setattr(backend, "predict", lambda x, t, c: predict(x, t, c).contiguous(memory_format=torch.channels_last))
        assert not backend.predict(probe.x_t[:2], probe.t[:2], words.rows([0, 1])).is_contiguous()
        assert probe.measure_words(rows, words) == pytest.approx(plain, abs=1e-6)
        d_last = synonyms.distances(backend, stack, probe, rows, words, None)
        assert all(torch.allclose(a, b) for a, b in zip(d_last, d_plain))
    finally:
        stack.detach()
