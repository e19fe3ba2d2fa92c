"""Model synonyms (spm/train/synonyms.py): found by the model, stored in the file, opened by the transport."""

from __future__ import annotations

import pytest
import torch

from spm.backend import Conditioning
from spm.checkpoint import load_membrane
from spm.hosts.diffusers import DiffusersBackend, PipelineMembranes
from spm.membrane import Membrane, MembraneInfo
from spm.train import TrainConfig, Trainer
from spm.train import synonyms as syn
from spm.train.config import SYNONYM_MODES
from tests.test_train import FAST
from tests.test_train_models import tiny_sd_pipe

pytestmark = pytest.mark.usefixtures("one_thread")

NULL = ["zebra", "violin", "harbour", "pencil", "tiger", "saxophone", "mountain", "lemon"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipe()


@pytest.fixture(autouse=True)
def full_scan(monkeypatch):
    """These tests train a few iterations, which pay for no scan (:data:`spm.train.synonyms.BUDGET_SHARE`): lift the
    bound, except where a test puts it back."""
    monkeypatch.setattr(syn, "BUDGET_SHARE", 1e9)


class AliasBackend(DiffusersBackend):
    """The tiny model, with "disc" encoded exactly as "circle" (a word the model draws as the target, whatever
    the text encoder makes of it) and a fixed list of candidate and null words."""

    def __init__(self, pipe, candidates=("disc", "spoon", "garden")):
        super().__init__(pipe)
        self.asked: list = []
        self.candidates = list(candidates)

    def encode(self, texts):
        return super().encode(["circle" if t == "disc" else t for t in texts])

    def transport_candidates(self, concepts, k, null, seed):
        self.asked.append((list(concepts), k, null, seed))
        return {"candidates": {c: list(self.candidates) for c in concepts}, "null": list(NULL)}


def test_threshold_is_the_midpoint_above_the_nulls_second_largest():
    thr, q = syn.threshold(torch.tensor([0.1, 0.5, 0.3, -0.2]))
    assert q == pytest.approx(0.3) and thr == pytest.approx(0.65)
    thr, q = syn.threshold(torch.tensor([0.4]))  # fewer than NULL_RANK: the largest
    assert q == pytest.approx(0.4) and thr == pytest.approx(0.7)
    assert syn.threshold(torch.zeros(0)) == (1.0, 1.0)  # no null: nothing can pass


def test_the_trainer_finds_a_word_the_model_draws_as_the_target_and_the_file_keeps_it(pipe, tmp_path):
    be = AliasBackend(pipe)
    out = tmp_path / "circle.safetensors"
    Trainer(be, TrainConfig(targets=["circle"], iterations=2, la_mode="off", **FAST), out, progress_bar=False).train()
    assert be.asked == [(["circle"], syn.CANDIDATES, syn.NULL_WORDS, syn.SEED)]
    m = load_membrane(out)
    scan = m.info.transport["synonym_scan"]["circle"]
    assert m.synonyms["circle"][0] == "disc" and scan["closure"][0] == pytest.approx(1.0, abs=1e-4)
    assert scan["candidates"] == 3 and scan["null"] == len(NULL) and scan["probe_rows"] > 0
    assert scan["threshold"] == pytest.approx(scan["null_q"] + (1 - scan["null_q"]) / 2, abs=1e-4)
    assert all(c >= scan["threshold"] for c in scan["closure"])
    assert m.gate_concepts[:2] == ["circle", "disc"] and m.synonym_of("disc") == "circle"
    assert m.synonym_of("circle") is None and m.synonym_of("zebra") is None
    assert m.info.training["synonym_words"]["circle"][0] == "disc"


def test_off_asks_for_nothing_and_a_failing_scan_never_fails_training(pipe, caplog):
    be = AliasBackend(pipe)
    res = Trainer(be, TrainConfig(targets=["circle"], iterations=1, la_mode="off", **{**FAST, "synonyms": "off"}),
                  progress_bar=False).train()
    assert be.asked == [] and "synonyms" not in res.membrane.info.transport

    def broken(concepts, k, null, seed):
        raise RuntimeError("no vocabulary here")

    be.transport_candidates = broken
    res = Trainer(be, TrainConfig(targets=["circle"], iterations=1, la_mode="off", **FAST), progress_bar=False).train()
    assert res.steps == 1 and res.membrane.synonyms == {}
    assert "training without it" in caplog.text


def test_the_scan_is_sized_to_the_training_budget():
    assert syn.planned_ufe(1200, 4, True) == 1200 * 18  # the pool schedule's 18 UFE per iteration without contexts
    assert syn.planned_ufe(1200, 4, True, True) == 1200 * 22  # and 22 with them (the defaults)
    rows = syn.PROBES_PER_LEVEL * 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(syn, "BUDGET_SHARE", 0.5)
        assert syn.words_per_side(syn.planned_ufe(1200, 4, True), rows, 1) == syn.CANDIDATES  # the defaults: all
        assert syn.words_per_side(syn.planned_ufe(1200, 4, True), rows, 4) == 84  # four targets share the budget
        assert syn.words_per_side(syn.planned_ufe(300, 4, True), rows, 1) == 84
        assert syn.words_per_side(syn.planned_ufe(4, 4, True), rows, 1) == 0  # a smoke test: no scan


def test_a_job_too_short_for_the_scan_skips_it_says_so_and_asks_for_nothing(pipe, monkeypatch, caplog):
    monkeypatch.setattr(syn, "BUDGET_SHARE", 0.5)
    be = AliasBackend(pipe)
    with caplog.at_level("INFO", logger="spm"):
        res = Trainer(be, TrainConfig(targets=["circle"], iterations=4, la_mode="off", **FAST), progress_bar=False).train()
    assert be.asked == [] and res.membrane.synonyms == {} and "synonyms" not in res.membrane.info.transport
    assert "too few words" in res.membrane.info.training["synonym_skipped"] and "too few words" in caplog.text


def test_the_scan_reports_its_progress_in_words(pipe):
    be = AliasBackend(pipe)
    phases = []
    Trainer(be, TrainConfig(targets=["circle"], iterations=1, la_mode="off", **FAST), progress_bar=False,
            on_phase=phases.append).train()
    seen = [(p.done, p.total) for p in phases if p.name == "synonyms"]
    total = len(NULL) + 3
    assert seen[0] == (0, total) and seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # only forward, from 0 (the phase's clock starts)


def test_erase_mode_also_trains_on_the_synonyms(pipe):
    be = AliasBackend(pipe, candidates=("disc",))
    cfg = TrainConfig(targets=["circle"], iterations=6, la_mode="off", **FAST)
    gate = Trainer(be, cfg.with_(synonyms="gate"), progress_bar=False).train()
    erase = Trainer(be, cfg.with_(synonyms="erase"), progress_bar=False).train()
    assert gate.membrane.synonyms == erase.membrane.synonyms == {"circle": ["disc"]}
    # one more no-grad and one more grad row per step, as for the transport's neighbours
    assert erase.cost["ufe_per_iteration_steady"] - gate.cost["ufe_per_iteration_steady"] == pytest.approx(3.0, abs=0.5)
    with pytest.raises(ValueError, match="synonyms"):
        TrainConfig(targets=["circle"], synonyms="maybe").validate()


def _membrane_with(pipe, synonyms) -> Membrane:
    from spm.naming import find_targets

    info = MembraneInfo(concepts=["circle"], transport={"synonyms": synonyms})
    return Membrane.for_targets(find_targets(pipe.unet), info=info, name="m")


def test_the_transport_opens_for_a_synonym_and_leaves_other_prompts_shut(pipe):
    plain = _membrane_with(pipe, {})
    with_syn = _membrane_with(pipe, {"circle": ["spoon"], "square": ["ignored: not a concept of this membrane"]})
    assert with_syn.gate_concepts == ["circle", "spoon"] and plain.gate_concepts == ["circle"]
    prompts = ["a spoon on a table", "a red circle", "a violin in a field"]
    with PipelineMembranes(pipe, [(plain, 1.0)]) as pm:
        ctx, toks = pm.transport.encode(prompts)
        before = pm.transport.scores(ctx, [plain], toks)[:, 0]
    with PipelineMembranes(pipe, [(with_syn, 1.0)]) as pm:
        ctx, toks = pm.transport.encode(prompts)
        after = pm.transport.scores(ctx, [with_syn], toks)[:, 0]
    assert after[0] == 1.0 and after[1] == 1.0 and after[0] > before[0]
    assert after[2] == before[2]  # a prompt that names neither is scored as before


def test_malformed_synonym_metadata_is_ignored():
    m = Membrane({}, MembraneInfo(concepts=["circle"], transport={"synonyms": ["not", "a", "dict"]}))
    assert m.synonyms == {} and m.gate_concepts == ["circle"]
    m = Membrane({}, MembraneInfo(concepts=["circle"], transport={"synonyms": {"circle": "disc"}}))
    assert m.synonyms == {} and m.gate_concepts == ["circle"]


def test_the_cli_the_request_and_the_tab_offer_the_same_modes():
    from spm.cli import build_parser
    from spm.train.jobs import RequestError, parse_request

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "train" in a.choices)
    act = next(a for a in sub.choices["train"]._actions if "--synonyms" in a.option_strings)
    assert tuple(act.choices) == SYNONYM_MODES
    assert parse_request({"name": "x", "target": "circle", "synonyms": "erase"}).config().synonyms == "erase"
    with pytest.raises(RequestError, match="synonyms"):
        parse_request({"name": "x", "target": "circle", "synonyms": "sometimes"})


def test_closures_batch_rows_without_changing_the_result(pipe):
    """:func:`spm.train.synonyms.closures` splits the words over UNet calls; the split does not change them."""
    from spm.attach import MembraneStack
    from spm.naming import find_targets
    from spm.train.signal import ErasureProbe

    be = DiffusersBackend(pipe)
    stack = MembraneStack(pipe.unet)
    stack.add(Membrane.for_targets(find_targets(pipe.unet)))
    try:
        cond = be.encode(["circle", ""])
        probe = ErasureProbe(be, stack, cond.rows([0]), cond.rows([1]), cond.rows([1]), steps=4, guidance=3.0,
                             resolution=be.latent.resolution, trajectories=2, levels=2, surrogate_is_uncond=True)
        rows = syn.probe_rows(probe, 0)
        words = Conditioning.cat([be.encode(["circle"]), be.encode(NULL[:3])])
        a = syn.closures(be, stack, probe, rows, words, None, batch_rows=len(rows))
        b = syn.closures(be, stack, probe, rows, words, None, batch_rows=1000)
        to_o, to_s = syn.distances(be, stack, probe, rows, words, None, batch_rows=len(rows))
    finally:
        stack.detach()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert float(a[0]) == pytest.approx(1.0, abs=1e-5)  # the target itself closes the whole gap
    # the distances behind them: the target's own word predicts nearer the target than the surrogate
    assert float(to_o[0]) < float(to_s[0]) and float(to_o[0]) == pytest.approx(0.0, abs=1e-6)


def test_many_concepts_score_exactly_as_one_at_a_time(pipe):
    """A membrane with its model synonyms is scored in one pass (:func:`spm.transport.ngram_tokenuni_many`): the
    same float32 values as the per-concept metric, for known, partly known and unknown rows."""
    from spm.transport import METRICS, concept_scores

    words = ["spoon", "disc", "violin", "garden", "round", "zebra", "ring", "tiger"]
    m = _membrane_with(pipe, {"circle": words})
    prompts = ["a spoon on a table", "a red circle", "a violin in a field", "a round disc, blue, on white",
               "two zebras and a ring", "", "a garden of tigers near a circle of spoons"]
    with PipelineMembranes(pipe, [(m, 1.0)]) as pm:
        tr = pm.transport
        ctx, toks = tr.encode(prompts)
        toks = list(toks) + [None]
        ctx = torch.cat([ctx, ctx[:1]])
        tr.scores(ctx, [m], toks)  # calibrates the concepts and prepares the rows' windows
        ces = tr.concepts.get(m.gate_concepts, tr.encode, tr.encoder_key)
        for metric in ("ngram_tokenuni", "robust"):
            tr.phrases.best.clear()  # the one-pass path finds the best windows itself (and caches them)
            many = concept_scores(ctx, toks, ces, metric, phrases=tr.phrases)
            one = torch.stack([METRICS[metric](ctx, toks, c, phrases=tr.phrases) for c in ces]).amax(0).clamp(0, 1)
            assert torch.equal(one, many), (metric, one, many)
        assert float(many.max()) == 1.0 and float(many[-1]) == 0.0  # some rows open it; the unknown row does not


def test_the_scan_plans_as_many_probe_rows_as_it_takes(pipe):
    """The trainer sizes the scan (:func:`spm.train.synonyms.words_per_side`) from
    :func:`~spm.train.synonyms.probe_row_count` before any probe is drawn; :func:`~spm.train.synonyms.probe_rows`
    then takes exactly that many rows of the drawn probe, for every target of a multi-target job."""
    from spm.attach import MembraneStack
    from spm.naming import find_targets
    from spm.train.signal import ErasureProbe

    be = DiffusersBackend(pipe)
    stack = MembraneStack(pipe.unet)
    stack.add(Membrane.for_targets(find_targets(pipe.unet)))
    try:
        cond = be.encode(["circle", "square", "star", ""])
        for targets, trajectories in ((3, 8), (1, 2), (2, 7)):
            probe = ErasureProbe(be, stack, cond.rows(list(range(targets))), cond.rows([3]), cond.rows([3]), steps=4,
                                 guidance=3.0, resolution=be.latent.resolution, trajectories=trajectories, levels=2,
                                 surrogate_is_uncond=True)
            for ti in range(targets):
                for per_level in (1, 2, syn.PROBES_PER_LEVEL):
                    got = len(syn.probe_rows(probe, ti, per_level))
                    assert got == syn.probe_row_count(trajectories, 2, targets, ti, per_level) > 0, \
                        (targets, trajectories, ti, per_level)
    finally:
        stack.detach()


@pytest.mark.parametrize("phase", ["vocabulary", "synonyms"])
def test_interrupt_stops_the_vocabulary_and_the_word_scan(pipe, monkeypatch, phase):
    """Interrupt is polled after each piece of the synonym scan's counted phases (the vocabulary, in words read, and
    the word scan, per UNet call), as in the probes and the pool: the run ends there, interrupted, with nothing
    trained, instead of reading or scoring the rest first."""
    from spm.transport import VOCABULARY_PROGRESS

    be = AliasBackend(pipe)
    real = be.transport_candidates

    def candidates(concepts, k, null, seed):  # a host that reads its vocabulary reports it as it goes
        report = VOCABULARY_PROGRESS.get()
        for done in range(0, 101, 10):
            report(done, 100)
        return real(concepts, k, null, seed)

    monkeypatch.setattr(be, "transport_candidates", candidates)
    phases = []
    stop = lambda: any(p.name == phase and p.done > 0 for p in phases)  # noqa: E731
    res = Trainer(be, TrainConfig(targets=["circle"], iterations=4, la_mode="off", **FAST), progress_bar=False,
                  on_phase=phases.append, should_stop=stop).train()
    assert res.interrupted and res.steps == 0
    seen = [(p.done, p.total) for p in phases if p.name == phase]
    assert 0 < seen[-1][0] < seen[-1][1]  # stopped part-way through the phase
    after = [p.name for p in phases][[p.name for p in phases].index(phase):]
    assert not {"pool", "training", "gate"} & set(after)


def test_the_neighbour_scans_vocabulary_pass_is_counted_and_interruptible(pipe, monkeypatch):
    """``neighbours``: the vocabulary pass behind "finding the words the transport opens for" (about 100 s in a CPU
    Forge, where the phase sat at 0/1 with no count) reports the words read and polls Interrupt after each batch."""
    from spm.transport import VOCABULARY_PROGRESS

    be = AliasBackend(pipe)

    def neighbours(concepts):  # a host that reads its vocabulary reports it as it goes
        report = VOCABULARY_PROGRESS.get()
        for done in range(0, 101, 10):
            report(done, 100)
        return {c: [] for c in concepts}

    monkeypatch.setattr(be, "transport_neighbours", neighbours)
    cfg = TrainConfig(targets=["circle"], iterations=2, la_mode="off", neighbours=True, synonyms="off", **FAST)
    phases = []
    res = Trainer(be, cfg, progress_bar=False, on_phase=phases.append).train()
    seen = [(p.done, p.total, p.unit) for p in phases if p.name == "neighbours"]
    assert (50, 100, "words") in seen and seen[-1][:2] == (1, 1) and res.steps == 2 and not res.interrupted
    phases.clear()
    stop = lambda: any(p.name == "neighbours" and p.done > 0 for p in phases)  # noqa: E731
    res = Trainer(be, cfg, progress_bar=False, on_phase=phases.append, should_stop=stop).train()
    assert res.interrupted and res.steps == 0
    seen = [(p.done, p.total) for p in phases if p.name == "neighbours"]
    assert 0 < seen[-1][0] < seen[-1][1] == 100  # stopped part-way through the vocabulary


def test_a_call_that_runs_out_of_memory_is_retried_with_fewer_rows(pipe):
    """A GPU smaller than the scan's batch (or a large probe size): the rows are scored in smaller calls, with the
    same result; any other error is raised."""
    from spm.attach import MembraneStack
    from spm.naming import find_targets
    from spm.train.signal import ErasureProbe

    be = DiffusersBackend(pipe)
    stack = MembraneStack(pipe.unet)
    stack.add(Membrane.for_targets(find_targets(pipe.unet)))
    cond = be.encode(["circle", ""])
    probe = ErasureProbe(be, stack, cond.rows([0]), cond.rows([1]), cond.rows([1]), steps=4, guidance=3.0,
                         resolution=be.latent.resolution, trajectories=2, levels=2, surrogate_is_uncond=True)
    rows = list(range(probe.x_t.shape[0]))
    words = be.encode(NULL[:5])
    want = syn.closures(be, stack, probe, rows, words, None, batch_rows=len(rows))
    predict, sizes = be.predict, []

    def small_gpu(x, t, c):
        sizes.append(x.shape[0])
        if x.shape[0] > 2 * len(rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(x, t, c)

    be.predict = small_gpu
    try:
        got = syn.closures(be, stack, probe, rows, words, None, batch_rows=64)
        assert torch.allclose(got, want, atol=1e-5)
        assert max(sizes) > 2 * len(rows) and sizes[-1] <= 2 * len(rows)  # tried big once, then smaller
        be.predict = lambda x, t, c: (_ for _ in ()).throw(RuntimeError("shapes do not match"))
        with pytest.raises(RuntimeError, match="shapes"):
            syn.closures(be, stack, probe, rows, words, None)
    finally:
        del be.predict
        stack.detach()
