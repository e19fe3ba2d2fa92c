"""The trainer on tiny random diffusers models: objective, anchors, loop, interrupt/resume, cost counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spm.attach import MembraneStack
from spm.backend import Conditioning
from spm.checkpoint import MembraneFileError, load_membrane, read_file
from spm.hosts.diffusers import DiffusersBackend
from spm.membrane import Membrane
from spm.naming import find_targets
from spm.train import AnchorWeight, TrainConfig, Trainer, erase_target, preset, sample_anchors
from spm.train.loop import lr_factor
from spm.train.objective import run_unet
from spm.train.sampling import ddim_timesteps
from spm.train.state import state_path
from tests.test_train_models import tiny_sd_pipe, tiny_sdxl_pipe

FAST = dict(anchors=1, pool_size=2, max_denoising_steps=4, lr=3e-3, lr_scheduler="constant", lr_warmup_steps=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend(tiny_sd_pipe())


def test_erase_target_formula():
    pos, neu = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(erase_target(pos, neu, 1.0), 2 * neu - pos)
    torch.testing.assert_close(erase_target(pos, neu, 0.0), neu)
    torch.testing.assert_close(erase_target(pos, neu, 2.5), neu - 2.5 * (pos - neu))


def test_anchors_count_norm_and_pooled():
    target = Conditioning(torch.randn(1, 77, 32) * 3, torch.randn(1, 16), [[1, 2]])
    a = sample_anchors(target, 7, torch.Generator().manual_seed(0))
    assert a.context.shape == (7, 77, 32) and a.pooled.shape == (7, 16) and len(a.tokens) == 7
    ratio = a.context.reshape(7, -1).norm(dim=1) / target.context.norm()
    assert ((ratio >= 0.8 - 1e-5) & (ratio <= 1.2 + 1e-5)).all() and ratio.std() > 0.01
    pr = a.pooled.norm(dim=1) / target.pooled.norm()
    assert ((pr >= 0.8 - 1e-5) & (pr <= 1.2 + 1e-5)).all()
    assert len(sample_anchors(target, 0, torch.Generator())) == 0
    with pytest.raises(ValueError, match="one target row"):
        sample_anchors(target.repeat(2), 1, torch.Generator())


def test_anchor_acceptance_is_one_minus_cosine():
    # In 2-D the angle is uniform.  Accepting with p = min(1, 1 - cos) gives
    # E[cos | accepted] = E[cos p] / E[p] = (-1/4) / (1 - 1/pi) = -0.367  (without rejection it would be 0).
    target = Conditioning(torch.tensor([[[1.0, 0.0]]]))
    a = sample_anchors(target, 3000, torch.Generator().manual_seed(1))
    cos = F.cosine_similarity(a.context.reshape(-1, 2), torch.tensor([[1.0, 0.0]]), dim=1)
    assert -0.41 < float(cos.mean()) < -0.32


def test_adaptive_anchor_weight_moves_towards_budget():
    aw = AnchorWeight("adaptive", 1.0, budget=0.1, rate=0.1)
    for _ in range(20):
        aw.update(anchor_loss=1.0, signal=1.0)  # drift 1.0 > budget: weight must grow
    grown = aw.value
    assert grown > math.exp(1.5)
    for _ in range(200):
        aw.update(anchor_loss=1e-4, signal=1.0)  # far below budget: weight shrinks to its floor
    assert aw.value < grown and aw.value == pytest.approx(aw.lo)
    fixed = AnchorWeight.from_config(TrainConfig(targets=["x"], la_mode="fixed"))
    assert fixed.update(5.0, 1.0) == 1000.0
    assert AnchorWeight.from_config(TrainConfig(targets=["x"], la_mode="off")).value == 0.0


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="targets"):
        TrainConfig().validate()
    with pytest.raises(ValueError, match="precision='fp8'"):
        TrainConfig(targets=["a"], precision="fp8").validate()
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(targets=["a"], schedule="fast").validate()
    assert TrainConfig(targets="a, b").targets == ["a", "b"]
    assert preset("nudity", targets=["nudity"]).guidance_scale == 2.0
    with pytest.raises(ValueError, match="unknown preset"):
        preset("cats")
    with pytest.raises(ValueError, match="unknown training settings: bogus"):
        TrainConfig.from_dict({"targets": ["a"], "bogus": 1})
    cfg = TrainConfig(targets=["a"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_lr_schedules():
    cfg = TrainConfig(targets=["a"], iterations=3000, lr_warmup_steps=500, lr_cycles=3)
    assert lr_factor(cfg, 0) == pytest.approx(1 / 500) and lr_factor(cfg, 499) == pytest.approx(1.0)
    assert lr_factor(cfg, 500) == pytest.approx(1.0)
    assert lr_factor(cfg, 500 + 833) < 1e-3 and lr_factor(cfg, 500 + 834) > 0.99  # a hard restart
    assert lr_factor(cfg, 500 + 2500 // 6) == pytest.approx(0.5, abs=0.01)
    short = cfg.with_(iterations=60)  # warm-up capped at a sixth of the run
    assert lr_factor(short, 9) == pytest.approx(1.0)
    assert lr_factor(cfg.with_(lr_scheduler="linear"), 2999) < 0.01
    assert lr_factor(cfg.with_(lr_scheduler="constant"), 2000) == 1.0


def _xt_samples(backend, n=6, steps=4, seed=0):
    """x_t as the trainer sees them: the original model's CFG trajectories for the target (no membrane)."""
    from spm.train.objective import CostMeter
    from spm.train.sampling import ReferenceSchedule

    stack = MembraneStack(backend.unet)
    stack.add(Membrane.for_targets(find_targets(backend.unet)))  # identity: the original model
    try:
        src = ReferenceSchedule(backend, stack, steps, 3.0, backend.latent.resolution, False,
                                torch.Generator().manual_seed(seed), CostMeter())
        cond = backend.encode(["circle", ""])
        return [src.draw(cond.rows([0]), cond.rows([1])) for _ in range(n)]
    finally:
        stack.detach()


def _erase_error(backend, membrane, samples, prompt: str = "circle") -> float:
    """Mean MSE between ε'(x_t, prompt) and its erase goal on fixed x_t samples of the target (membrane strength 1)."""
    stack = MembraneStack(backend.unet)
    stack.add(membrane)
    try:
        cond = backend.encode([prompt, ""])
        errs = []
        for s in samples:
            off = run_unet(backend, stack, s.x_t, s.t, cond, [0.0, 0.0], None, False)
            on = run_unet(backend, stack, s.x_t, s.t, cond.rows([0]), [1.0], None, False)
            errs.append(float(F.mse_loss(on, erase_target(off[:1], off[1:], 1.0))))
        return sum(errs) / len(errs)
    finally:
        stack.detach()


def test_training_reduces_erase_error_and_touches_only_the_membrane(backend, tmp_path):
    unet = backend.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.requires_grad_(False)
    first = next(unet.parameters())
    first.requires_grad_(True)  # the trainer freezes the UNet, then must restore exactly this
    cfg = TrainConfig(targets=["circle"], iterations=15, la_mode="off", contexts=0, **{**FAST, "lr": 3e-3})
    res = Trainer(backend, cfg, tmp_path / "c.safetensors", progress_bar=False).train()
    assert res.steps == 15 and not res.interrupted
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert first.requires_grad and not any(p.requires_grad for p in list(unet.parameters())[1:])
    assert not unet._forward_hooks and not unet._forward_pre_hooks  # detached
    fresh = Trainer(backend, cfg, progress_bar=False)._new_membrane()
    xts = _xt_samples(backend)
    e0, e1 = _erase_error(backend, fresh, xts), _erase_error(backend, res.membrane, xts)
    assert e1 < 0.6 * e0, (e0, e1)
    ups = [float(layer.lora_up.weight.detach().abs().sum()) for layer in res.membrane.layers.values()]
    assert all(u > 0 for u in ups)  # every module got gradient
    m = load_membrane(tmp_path / "c.safetensors")
    assert m.concepts == ["circle"] and m.info.training["steps_done"] == 15
    _, meta = read_file(tmp_path / "c.safetensors")
    assert meta["prompts"] == "circle" and meta["spm_surrogate"] == ""
    # no anchors: [positive, neutral] OFF + [target] ON with grad = 2 + 2 per iteration, plus pool restarts
    assert 4.0 <= m.info.training["cost"]["ufe_per_iteration_steady"] <= 6.0


def test_interrupt_flag_and_ctrl_c_leave_valid_files(backend, tmp_path):
    done = []

    def stop():  # polled every step and during the pool warm-up: stop once 3 steps are done
        return len(done) >= 3

    cfg = TrainConfig(targets=["circle"], iterations=50, **FAST)
    out = tmp_path / "i.safetensors"
    res = Trainer(backend, cfg, out, should_stop=stop, progress_bar=False, callback=done.append).train()
    assert res.interrupted and res.steps == 3
    assert load_membrane(out).info.training["steps_done"] == 3 and state_path(out).exists()

    def ctrl_c(progress):
        if progress.step == 2:
            raise KeyboardInterrupt

    out2 = tmp_path / "k.safetensors"
    res2 = Trainer(backend, cfg, out2, callback=ctrl_c, progress_bar=False).train()
    assert res2.interrupted and res2.steps == 2
    m = load_membrane(out2)
    assert m.info.training["interrupted"] is True and not list(tmp_path.glob(".*.tmp"))
    assert not backend.unet._forward_hooks


def test_resume_continues_step_count_and_optimizer(backend, tmp_path):
    out = tmp_path / "r.safetensors"
    cfg = TrainConfig(targets=["circle"], iterations=4, save_every=2, **FAST)
    first = Trainer(backend, cfg, out, progress_bar=False, keep_state=True).train()  # finished, state kept
    w4 = {k: v.clone() for k, v in first.membrane.reference_state_dict().items()}
    seen = []
    res = Trainer(backend, cfg.with_(iterations=7), out, resume=True, progress_bar=False, keep_state=True,
                  callback=lambda p: seen.append(p.step)).train()
    assert seen == [5, 6, 7] and res.steps == 7
    assert load_membrane(out).info.training["steps_done"] == 7
    changed = [k for k, v in res.membrane.reference_state_dict().items() if k.endswith("lora_up.weight")
               and not torch.equal(v.cpu(), w4[k])]
    assert changed
    from safetensors import safe_open

    with safe_open(str(state_path(out)), "pt") as f:
        steps = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".step")}
    assert steps == {7.0}  # the optimizer continued from its saved state (4 + 3 steps)
    with pytest.raises(Exception, match="cannot resume"):
        Trainer(backend, cfg, tmp_path / "none.safetensors", resume=True, progress_bar=False).train()


def test_a_finished_run_deletes_its_state_unless_kept(backend, tmp_path):
    cfg = TrainConfig(targets=["circle"], iterations=2, save_every=1, **FAST)
    out = tmp_path / "s.safetensors"
    Trainer(backend, cfg, out, progress_bar=False).train()
    assert out.exists() and not state_path(out).exists()
    with pytest.raises(MembraneFileError, match="keep_state"):
        Trainer(backend, cfg.with_(iterations=3), out, resume=True, progress_bar=False).train()
    Trainer(backend, cfg, out, progress_bar=False, keep_state=True).train()
    assert state_path(out).exists()


def test_the_latent_pool_is_sized_to_the_job(backend):
    """A job of 2 iterations fills 2 trajectories, not ``pool_size`` 16: a trajectory no iteration draws is
    wasted UNet work.  The fill reports its progress in trajectory steps."""
    from spm.train.loop import Phase

    # (without context prompts: their pair check advances the probes count several pairs at a time)
    cfg = TrainConfig(targets=["circle"], contexts=0, **{**FAST, "pool_size": 16, "max_denoising_steps": 6})
    phases: list[Phase] = []
    short = Trainer(backend, cfg.with_(iterations=2), progress_bar=False, on_phase=phases.append).train()
    goals = [1 + i * 5 // 2 for i in range(2)]  # 2 trajectories staggered over k = 1 .. S-1 = 5
    assert short.cost["setup_ufe"] == 2 * sum(goals)  # one CFG pair (2 rows) per trajectory step
    pool = [(p.done, p.total) for p in phases if p.name == "pool"]
    assert pool[0] == (0, sum(goals)) and pool[-1] == (sum(goals), sum(goals))
    probes = [(p.done, p.total) for p in phases if p.name == "probes"]  # drawn before the steps, counted
    assert probes == [(k, probes[0][1]) for k in range(probes[0][1] + 1)] and probes[0][1] > 1
    assert [p.name for p in phases].index("probes") < [p.name for p in phases].index("training")
    gate = [(p.done, p.total) for p in phases if p.name == "gate"]  # counted in prompts encoded
    assert gate[0] == (0, gate[0][1]) and gate[-1] == (gate[0][1], gate[0][1]) and gate[0][1] > 1
    # 2 iterations pay for no response-gate calibration either (spm.response.BUDGET_SHARE): no phase of it
    assert "response" not in [p.name for p in phases] and "response" not in short.membrane.info.transport
    assert [(p.name, p.done, p.total) for p in phases if p.name not in ("pool", "probes", "gate", "response")] == \
        [("calibration", 0, 1), ("training", 0, 2),  # 2 iterations pay for no model-synonym scan
         ("signal", 0, 1), ("signal", 1, 1), ("saving", 0, 1), ("saving", 1, 1)]
    long = Trainer(backend, cfg.with_(iterations=20), progress_bar=False).train()
    assert long.cost["setup_ufe"] == 2 * sum(1 + i * 5 // 16 for i in range(16))  # pool_size caps it


def test_cost_counter_reference_vs_pool(backend):
    n_anchor = 2 + 1  # two random anchors plus the empty prompt (anchor_empty)
    cfg = TrainConfig(targets=["circle"], iterations=6, contexts=0, **{**FAST, "anchors": 2})  # the paper's objective
    ref = Trainer(backend, cfg.with_(schedule="reference"), progress_bar=False).train()
    # reference: 2k rows to re-denoise, CFG pairs for positive and neutral (2+2), target pair with grad (2 × 2),
    # anchors ON with grad (2N) and OFF (N)
    want = sum(2 * h["k"] + 4 + 4 + 3 * n_anchor for h in ref.history)
    assert ref.cost["ufe"] == want and ref.cost["setup_ufe"] == 0
    assert all(1 <= h["k"] <= 3 for h in ref.history)
    pool = Trainer(backend, cfg, progress_bar=False).train()
    # pool: fill once (staggered over k = 1..S-1), then per iteration one OFF call [pos, neu, anchors…]
    # and one ON call with grad [target, anchors…]; restarts cost one CFG pair (2 rows)
    # (the empty-prompt anchor's OFF output is the neutral row's when the surrogate is "": not computed twice)
    per_it = (2 + n_anchor - 1) + 2 * (1 + n_anchor)
    restarts = (pool.cost["ufe"] - pool.cost["setup_ufe"] - 6 * per_it) / 2
    assert restarts == int(restarts) and 0 <= restarts <= 6
    assert pool.cost["ufe_per_iteration_steady"] <= per_it + 2
    assert pool.cost["calls"] - ref.cost["calls"] < 0
    # context prompts (the default) add two OFF rows and one ON row with grad per iteration, on either schedule
    for sched in ("reference", "pool"):
        with_c = Trainer(backend, cfg.with_(schedule=sched, contexts=16), progress_bar=False).train()
        base = sum(2 * h["k"] + 4 + 4 + 3 * n_anchor for h in with_c.history) if sched == "reference" else None
        if base is not None:
            assert with_c.cost["ufe"] == base + 4 * 6
        else:
            assert with_c.cost["ufe_per_iteration_steady"] == pytest.approx(pool.cost["ufe_per_iteration_steady"] + 4)


def test_ddim_timesteps_match_diffusers():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    s.set_timesteps(30)
    assert ddim_timesteps(1000, 30).tolist() == s.timesteps.tolist()


def test_v_prediction_path_runs_and_erases(tmp_path):
    be = DiffusersBackend(tiny_sd_pipe(v_prediction=True))
    cfg = TrainConfig(targets=["circle"], iterations=4, **FAST)
    res = Trainer(be, cfg, tmp_path / "v.safetensors", progress_bar=False).train()
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert be.parameterization == "v" and load_membrane(tmp_path / "v.safetensors").info.context_dim == 32


def test_sdxl_path_runs_with_surrogate_and_previews(tmp_path):
    be = DiffusersBackend(tiny_sdxl_pipe())
    got = []
    cfg = TrainConfig(targets=["circle"], surrogate="square", iterations=2, sample_every=2, preview_seeds=1,
                      preview_steps=2, control_prompts=["a dog"], **FAST)
    res = Trainer(be, cfg, tmp_path / "xl.safetensors", progress_bar=False, callback=got.append).train()
    assert res.steps == 2 and got[-1].preview is not None and got[-1].preview_path.exists()
    assert got[-1].preview.size == (16 * 2, 16 * 2)  # 2 prompts × (OFF, ON)
    m = load_membrane(tmp_path / "xl.safetensors")
    assert m.info.surrogate == "square" and m.info.context_dim == 64
    # with a surrogate the OFF call also carries the unconditional row for the pool: 3 + N rows
    assert res.cost["ufe_per_iteration_steady"] >= 3 + 1 + 2 * 2


def test_the_trainer_also_erases_the_words_its_transport_opens_for(backend, tmp_path, monkeypatch):
    """``neighbours`` (opt-in): the words the backend's transport opens the membrane for are erased on the target's
    x_t too — one more OFF and one more grad row per step — and recorded in the file; off, they are not asked for."""
    asked = []

    def neighbours(concepts):
        asked.append(list(concepts))
        return {"circle": ["disc"]}

    monkeypatch.setattr(backend, "transport_neighbours", neighbours, raising=False)
    cfg = TrainConfig(targets=["circle"], iterations=15, la_mode="off", **{**FAST, "neighbours": True})
    with_n = Trainer(backend, cfg, tmp_path / "n.safetensors", progress_bar=False).train()
    assert asked == [["circle"]]
    assert load_membrane(tmp_path / "n.safetensors").info.training["neighbour_words"] == {"circle": ["disc"]}
    without = Trainer(backend, cfg.with_(neighbours=False), progress_bar=False).train()
    assert asked == [["circle"]] and without.membrane.info.training["neighbour_words"] == {}
    assert with_n.cost["ufe_per_iteration_steady"] - without.cost["ufe_per_iteration_steady"] == pytest.approx(3.0, abs=0.5)
    xts = _xt_samples(backend)
    assert _erase_error(backend, with_n.membrane, xts, "disc") < _erase_error(backend, without.membrane, xts, "disc")


def test_a_failing_neighbour_search_never_fails_training(backend, monkeypatch, caplog):
    def broken(concepts):
        raise RuntimeError("no vocabulary here")

    monkeypatch.setattr(backend, "transport_neighbours", broken, raising=False)
    cfg = TrainConfig(targets=["circle"], iterations=3, la_mode="off", **{**FAST, "neighbours": True})
    res = Trainer(backend, cfg, progress_bar=False).train()
    assert res.steps == 3 and res.membrane.info.training["neighbour_words"] == {"circle": []}
    assert "training without them" in caplog.text


def _picks_state(seed: int, n: int, picks: int) -> torch.Tensor:
    """The state of a per-step pick generator (seeded ``seed``, one ``randint(n)`` per step) after ``picks`` steps."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(picks):
        torch.randint(n, (1,), generator=g)
    return g.get_state()


def test_resume_continues_the_neighbour_picks(backend, tmp_path, monkeypatch):
    """The generator that picks each step's erased neighbour is resumable state: an interrupted run saves it in the
    ``.trainstate`` and the resumed run goes on from it (one pick per step), not from the seed again."""
    from safetensors.torch import load_file

    from spm.train.loop import NEIGHBOUR_RNG

    monkeypatch.setattr(backend, "transport_neighbours", lambda concepts: {"circle": ["disc", "ball", "round"]},
                        raising=False)
    cfg = TrainConfig(targets=["circle"], iterations=8, la_mode="off", synonyms="off", **{**FAST, "neighbours": True})
    out, steps = tmp_path / "n.safetensors", []
    first = Trainer(backend, cfg, out, progress_bar=False, callback=lambda p: steps.append(p.step),
                    should_stop=lambda: len(steps) >= 3).train()
    assert first.interrupted and first.steps == 3

    def after(picks: int) -> torch.Tensor:
        return _picks_state(cfg.seed + 7919, 3, picks)

    assert torch.equal(load_file(str(state_path(out)))[f"x.{NEIGHBOUR_RNG}"], after(3))
    tr = Trainer(backend, cfg, out, resume=True, progress_bar=False)
    assert tr.train().steps == 8
    assert torch.equal(tr.neighbour_rng.get_state(), after(8))  # 3 + 5 picks, not 5 from the seed


def test_context_prompts_put_the_target_and_the_surrogate_inside_the_same_words():
    from spm.train.contexts import FUNCTION_WORDS, context_prompts

    words = FUNCTION_WORDS
    assert "the" in words and "with" in words and all(w.isalpha() and w.islower() for w in words)
    pairs = context_prompts("red car", "", 24, seed=3)
    assert len(pairs) == 24 and pairs == context_prompts("red car", "", 24, seed=3)
    assert pairs != context_prompts("red car", "", 24, seed=4)
    for with_t, with_s in pairs:
        assert "red car" in with_t and with_t != "red car" and with_s  # at least one word around the target
        assert with_t.replace("red car", "").replace(",", "").split() == with_s.replace(",", "").split()
    sur = context_prompts("red car", "vehicle", 24, seed=3)
    assert [t for t, _ in sur] == [t for t, _ in pairs]
    assert all(s == t.replace("red car", "vehicle") for t, s in sur)
    assert context_prompts("car", "", 0, seed=0) == [] and context_prompts("car", "", 5, 0, words=()) == []


def _pairs_nearer(side: str):
    """A stand-in for :func:`spm.train.synonyms.distances` that puts every context pair's words nearer ``side``
    ("surrogate": every pair is kept; "target": every pair is left out), counting its words as the real one does."""
    def distances(be, stack, probe, rows, words, *a, progress=None, **k):
        if progress is not None:
            progress(len(words))
        near, far = torch.zeros(len(words)), torch.ones(len(words))
        return (far, near) if side == "surrogate" else (near, far)  # (to the target, to the surrogate)

    return distances


def test_the_trainer_erases_the_target_inside_other_words_and_checks_it_there(backend, tmp_path, monkeypatch):
    """``contexts``: each step also erases one context prompt on the target's x_t (two more OFF rows and one more
    grad row: 4 UFE), the erasure check measures held-out probes of the context prompts too and reports the less erased
    of the two, the prompts are recorded in the file, and the picks resume where an interrupted run stopped.  (Every
    pair is kept here: whether a random tiny model's words alone draw its "target" is chance; the check that leaves
    such pairs out has its own test below.)"""
    from safetensors.torch import load_file

    from spm.train import synonyms as syn
    from spm.train.loop import CONTEXT_RNG

    monkeypatch.setattr(syn, "distances", _pairs_nearer("surrogate"))

    cfg = TrainConfig(targets=["circle"], iterations=6, la_mode="off", synonyms="off", signal_checks=3,
                      signal_trajectories=2, signal_levels=2, **{**FAST, "contexts": 4})
    from spm.train.signal import ErasureProbe

    out, steps, phases = tmp_path / "c.safetensors", [], []
    first = Trainer(backend, cfg, out, progress_bar=False, callback=lambda p: steps.append(p.step),
                    should_stop=lambda: len(steps) >= 3, on_phase=phases.append)
    res = first.train()
    assert res.interrupted and res.steps == 3
    assert first.context_probe is not None and first.context_probe.rows == 2 * len(first.context_probe.levels)
    # both probe sets are drawn in one count: the target's (its surrogate "" costs no call), the check of each context
    # pair (one call each; none is left out on this model) and the context prompts' probes (one more call for the
    # words around the surrogate)
    main = ErasureProbe.calls(cfg.max_denoising_steps, 2, True)
    total = main + 4 + ErasureProbe.calls(cfg.max_denoising_steps, 2, False)
    probes = [(p.done, p.total) for p in phases if p.name == "probes"]
    assert probes == [(k, total) for k in range(main + 1)] + [(k, total) for k in range(main + 4, total + 1)]
    texts = load_membrane(out).info.training["context_prompts"]["circle"]
    assert len(texts) == 4 and all("circle" in t for t in texts)

    def after(picks: int) -> torch.Tensor:
        return _picks_state(cfg.seed + 104729, 4, picks)

    assert torch.equal(load_file(str(state_path(out)))[f"x.{CONTEXT_RNG}"], after(3))
    tr = Trainer(backend, cfg, out, resume=True, progress_bar=False)
    with_c = tr.train()
    assert with_c.steps == 6 and torch.equal(tr.context_rng.get_state(), after(6))
    # the reported check is the lesser of the target alone and the target inside other words
    parts = with_c.erasure["signal_parts"]
    assert set(parts) == {"alone", "in_context"} and parts["alone"] != parts["in_context"]
    assert with_c.erasure["signal"] == min(parts.values())
    assert tr.rule.checks[-1]["parts"] == parts
    # the check names the context prompt whose held-out trajectory is least erased, one of the run's own
    text, ratio = tr.rule.checks[-1]["weakest_context"]
    probed = [texts[j % len(texts)] for j in range(tr.context_probe.trajectories)]
    assert text in probed and ratio == pytest.approx(min(tr.context_probe.last_per_trajectory), abs=1e-4)
    assert f"(the target alone {parts['alone']:.0%}, inside other words {parts['in_context']:.0%}; the lesser " \
        "decides)" in with_c.erasure["message"]
    # cost: two more no-grad rows and one more grad row (2 UFE) per step, against the same run without contexts
    fresh = Trainer(backend, cfg, progress_bar=False).train()
    without = Trainer(backend, cfg.with_(contexts=0), progress_bar=False).train()
    assert without.membrane.info.training["context_prompts"] == {} and "signal_parts" not in without.erasure
    assert fresh.cost["ufe_per_iteration_steady"] - without.cost["ufe_per_iteration_steady"] == pytest.approx(4.0)
    # more context prompts than iterations: the run draws one per iteration (each step erases one), no error
    capped = Trainer(backend, cfg.with_(contexts=16), progress_bar=False).train()
    assert len(capped.membrane.info.training["context_prompts"]["circle"]) == cfg.iterations == 6
    assert capped.membrane.info.training["contexts"] == 16 and capped.membrane.info.training["contexts_drawn"] == 6
    assert without.membrane.info.training["contexts_drawn"] == 0


def test_context_pairs_whose_words_alone_draw_the_target_are_left_out(backend, monkeypatch):
    """A context pair whose words around the surrogate already predict nearer the target than the surrogate (on the
    target's held-out probes) is left out: its erase goal would be the target itself.  With every pair left out,
    the run trains as without contexts (no extra rows, no context probe), the probes count still ends at its total,
    and the file records what was left out."""
    from spm.train import synonyms as syn
    from spm.train.loop import Phase
    from spm.train.signal import ErasureProbe

    real = syn.distances

    monkeypatch.setattr(syn, "distances", _pairs_nearer("target"))
    cfg = TrainConfig(targets=["circle"], iterations=3, la_mode="off", synonyms="off", signal_checks=3,
                      signal_trajectories=2, signal_levels=2, **{**FAST, "contexts": 3})
    phases: list[Phase] = []
    tr = Trainer(backend, cfg, progress_bar=False, on_phase=phases.append)
    res = tr.train()
    info = res.membrane.info.training
    assert info["context_prompts"] == {} and len(info["context_dropped"]["circle"]) == 3
    assert tr.context_probe is None and "signal_parts" not in res.erasure
    without = Trainer(backend, cfg.with_(contexts=0), progress_bar=False).train()
    assert res.cost["ufe_per_iteration_steady"] == pytest.approx(without.cost["ufe_per_iteration_steady"])
    main = ErasureProbe.calls(cfg.max_denoising_steps, 2, True)
    total = main + 3 + ErasureProbe.calls(cfg.max_denoising_steps, 2, False)
    probes = [(p.done, p.total) for p in phases if p.name == "probes"]
    # the pair check is counted in pairs, as many per UNet call as fit (here all three in one)
    assert probes == [(k, total) for k in range(main + 1)] + [(main + 3, total), (total, total)]
    # the rule itself (the distances are tested in test_synonyms): a pair is left out when its words' predictions
    # are nearer the target's than the surrogate's
    assert callable(real)
    keep = Trainer(backend, cfg, progress_bar=False)
    monkeypatch.setattr(syn, "distances", lambda *a, progress=None, **k: (torch.tensor([0.4, 0.6, 0.1]),
                                                                          torch.tensor([0.5, 0.5, 0.5])))
    kept = keep.train().membrane.info.training
    assert len(kept["context_prompts"]["circle"]) == 1 and len(kept["context_dropped"]["circle"]) == 2


def test_mixed_context_words_put_vocabulary_words_around_the_target():
    """``context_words="mixed"``: each word around the target is a function word or a random whole vocabulary word;
    without other words the draw is exactly the function-word one."""
    from spm.train.contexts import FUNCTION_WORDS, context_prompts, vocabulary_words

    other = vocabulary_words(64, seed=1)
    assert len(other) == 64 and other == vocabulary_words(64, seed=1) and other != vocabulary_words(64, seed=2)
    assert all(w.isalpha() and len(w) >= 3 and w not in FUNCTION_WORDS for w in other)
    pairs = context_prompts("red car", "", 40, seed=3, other=other)
    words = [w for t, _ in pairs for w in t.replace("red car", "").replace(",", " ").split()]
    assert any(w in other for w in words) and any(w in FUNCTION_WORDS for w in words)
    assert all(w in other or w in FUNCTION_WORDS for w in words)
    for with_t, with_s in pairs:
        assert with_t.replace("red car", "").replace(",", "").split() == with_s.replace(",", "").split()
    assert context_prompts("red car", "", 12, seed=3, other=()) == context_prompts("red car", "", 12, seed=3)
    with pytest.raises(ValueError, match="context_words"):
        TrainConfig(targets=["x"], context_words="any").validate()


def test_a_resumed_run_keeps_the_context_words_it_started_with(backend, tmp_path, caplog, monkeypatch):
    """The context prompts (and their probes) of a resumed run are the saved run's: a state written before
    ``context_words`` existed resumes with function words, whatever the new request says."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from spm.train import synonyms as syn
    from spm.train.state import saved_settings

    monkeypatch.setattr(syn, "distances", _pairs_nearer("surrogate"))
    out = tmp_path / "w.safetensors"
    cfg = TrainConfig(targets=["circle"], iterations=2, la_mode="off", synonyms="off", signal_checks=2,
                      signal_trajectories=2, signal_levels=2, **{**FAST, "contexts": 2, "context_words": "function"})
    first = Trainer(backend, cfg, out, progress_bar=False, keep_state=True)
    first.train()
    path = state_path(out)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["spm_trainstate"])
    del meta["config"]["context_words"]  # as an older version left it
    save_file(tensors, str(path), {"spm_trainstate": json.dumps(meta)})
    assert saved_settings(path)["context_words"] == "function"
    tr = Trainer(backend, cfg.with_(iterations=3, context_words="mixed"), out, resume=True, progress_bar=False)
    assert tr.train().steps == 3 and "started with context_words=function" in caplog.text
    assert load_membrane(out).info.training["context_words"] == "function"
    assert tr.context_texts == first.context_texts  # the same prompts, so the same probes
    assert saved_settings(tmp_path / "missing.trainstate") is None


def test_mixed_context_words_fall_back_to_function_words_without_a_vocabulary(backend, monkeypatch, caplog):
    from spm import transport
    from spm.train import synonyms as syn
    from spm.train.contexts import FUNCTION_WORDS, vocabulary_words

    monkeypatch.setattr(transport, "_whole_words", lambda: ())
    monkeypatch.setattr(syn, "distances", _pairs_nearer("surrogate"))
    assert vocabulary_words(16, 0) == ()
    cfg = TrainConfig(targets=["circle"], iterations=2, la_mode="off", synonyms="off", signal_checks=2,
                      signal_trajectories=2, signal_levels=2, **{**FAST, "contexts": 2})
    assert cfg.context_words == "mixed"
    tr = Trainer(backend, cfg, progress_bar=False)
    tr.train()
    assert "no CLIP vocabulary for the context prompts' other words; function words only" in caplog.text
    words = [w for t in tr.context_texts["circle"] for w in t.replace("circle", "").replace(",", " ").split()]
    assert words and all(w in FUNCTION_WORDS for w in words)
