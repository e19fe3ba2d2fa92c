"""The membrane gate (``membrane``, and ``robust`` = its maximum with ``ngram_tokenuni``): it opens for rows that
drive the membrane without naming the concept, gives exactly 0 to rows at the level of random text (their UNet
outputs stay bit-identical), is stored in the membrane file and recomputed for another encoder or other weights."""

from __future__ import annotations

import pytest
import torch

from spm.attach import MembraneStack, Transport
from spm.checkpoint import load_membrane, read_file, save_membrane
from spm.gate import GATE_SUFFIXES, Gate, compute_gate, gate_modules, null_prompts, training_gate
from spm.membrane import Membrane, MembraneInfo
from spm.transport import BOS, DEFAULT_METRIC, EOS, METRICS, ROBUST_METRIC, concept_scores, uses_gate
from tests.archs import tiny_diffusers_unet
from tests.helpers import random_membrane

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 32


class Toy:
    """A 32-wide "encoder" with known geometry: each token id a seeded random vector (norm about 1), the state of a
    content token its vector plus a common offset, BOS and padding the offset alone.  "cat" (and the ids in
    ``alike``) has its own vector ``CONCEPT``, three times longer than the others."""

    CONCEPT = torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(99)), dim=0) * 3.0

    def __init__(self, tokenizer, seed: int = 0, alike: tuple[int, ...] = ()):
        self.tok, self.seed = tokenizer, seed
        self.offset = torch.randn(DIM, generator=torch.Generator().manual_seed(7 + seed)) * 0.5
        self.alike = {self.id("cat"), *alike}
        self._vecs: dict[int, torch.Tensor] = {}

    def id(self, word: str) -> int:
        ids = self.tok(word).input_ids
        assert len(ids) == 3, word
        return ids[1]

    def vec(self, i: int) -> torch.Tensor:
        if i in self.alike:
            return self.CONCEPT
        v = self._vecs.get(i)
        if v is None:
            g = torch.Generator().manual_seed(10_000 + int(i) + 100_000 * self.seed)
            v = self._vecs[i] = torch.randn(DIM, generator=g) / DIM ** 0.5
        return v

    def encode(self, texts):
        toks = [self.tok(t, truncation=True, max_length=77).input_ids for t in texts]
        out = self.offset.expand(len(texts), 77, DIM).clone()
        for r, ids in enumerate(toks):
            for j, i in enumerate(i for i in ids if i not in (BOS, EOS)):
                out[r, 1 + j] += self.vec(i)
        return out, toks

    def encode_ids(self, seqs):
        return [torch.stack([self.vec(i) for i in q]) + self.offset for q in seqs]

    def transport(self, metric: str = ROBUST_METRIC, **kw) -> Transport:
        return Transport(self.encode, encoder_key=id(self), metric=metric, encode_ids=self.encode_ids, **kw)

    def context(self, texts):
        return self.encode(texts)[0]


@pytest.fixture(scope="module")
def unet():
    return tiny_diffusers_unet(ctx=DIM)


def cat_membrane(unet, name: str = "cat") -> Membrane:
    """A membrane whose cross-attention key/value downs read the concept's direction (its other layers random)."""
    m = random_membrane(unet, name, concepts=("cat",), std=0.5)
    u = torch.nn.functional.normalize(Toy.CONCEPT, dim=0)
    with torch.no_grad():
        for stem, layer in m.layers.items():
            if stem.endswith(GATE_SUFFIXES):
                layer.lora_down.weight.copy_(u[None] + 0.05 * torch.randn(1, DIM))
    return m


def test_the_robust_metric_is_registered_with_plain_names():
    assert ROBUST_METRIC in METRICS and uses_gate(ROBUST_METRIC) and uses_gate("membrane")
    assert not uses_gate(DEFAULT_METRIC) and not uses_gate("clipcos_tokenuni")


def test_gate_reads_the_key_value_layers_only(unet):
    m = cat_membrane(unet)
    mods = gate_modules(m)
    assert mods and all(s.endswith(("attn2_to_k", "attn2_to_v")) for s, _ in mods)
    assert all(d.shape == (1, DIM) for _, d in mods)


def test_random_text_gets_exactly_zero_the_literal_concept_full_strength(tokenizer, unet):
    toy = Toy(tokenizer)
    gate = compute_gate(cat_membrane(unet), toy.context)
    assert gate.usable and gate.source == "computed"
    assert gate.quantiles["0.99"] <= gate.q < gate.lo < gate.hi < gate.top
    fresh = null_prompts(seed=77)  # out of sample: another seed than the calibration's null
    assert fresh != null_prompts() and len(fresh) > 300
    assert torch.equal(gate.score(toy.context(fresh)), torch.zeros(len(fresh)))
    lit = gate.score(toy.context(["cat", "a cat", "a photo of a cat on a red sofa", "sunset, mountains, a cat, 8k"]))
    assert torch.equal(lit, torch.ones(4))


def test_robust_opens_for_a_row_without_the_words(tokenizer, unet):
    """An embedding-attack row: conditioning no tokenizer produced (the registry has no token ids for it) that
    still feeds the membrane.  The words metric gives it 0, the gate full strength."""
    toy = Toy(tokenizer)
    m = cat_membrane(unet)
    ctx = toy.context(["a photo of a cat"]) + 1e-2 * torch.randn(1, 77, DIM, generator=torch.Generator().manual_seed(0))
    assert toy.transport(DEFAULT_METRIC).scores(ctx, [m]).tolist() == [[0.0]]
    assert toy.transport(ROBUST_METRIC).scores(ctx, [m]).tolist() == [[1.0]]
    assert toy.transport("membrane").scores(ctx, [m]).tolist() == [[1.0]]


def test_a_synonym_token_opens_the_gate_and_not_tokenuni(tokenizer, unet):
    toy = Toy(tokenizer)
    toy.alike.add(toy.id("kitten"))  # another id, the same meaning to the model
    m = cat_membrane(unet)
    tr = toy.transport("membrane")
    ctx, toks = toy.encode(["a kitten on a sofa", "a dog on a sofa"])
    tr.registry.record(ctx, toks)
    assert tr.scores(ctx, [m])[:, 0].tolist() == [1.0, 0.0]
    assert concept_scores(ctx, toks, tr.concepts.get(["cat"], tr.encode, tr.encoder_key), "tokenuni").tolist() == [0.0, 0.0]


def test_unrelated_rows_stay_bit_identical_in_the_unet(tokenizer, unet):
    toy = Toy(tokenizer)
    m = cat_membrane(unet)
    prompts = ["", "a red car on a road", "sunset over the sea, 8k, masterpiece", "a cat"]
    ctx, toks = toy.encode(prompts)
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500] * len(prompts))
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx).sample
        tr = toy.transport(ROBUST_METRIC)
        tr.registry.record(ctx, toks)
        with MembraneStack(unet) as stack:
            stack.set_membranes([(m, 1.0)])
            stack.set_transport(tr)
            out = unet(x, t, encoder_hidden_states=ctx).sample
            s = stack.current_strengths[:, 0].tolist()
    assert s == [0.0, 0.0, 0.0, 1.0]
    assert torch.equal(out[:3], base[:3]) and not torch.equal(out[3], base[3])


def test_the_gate_is_stored_in_the_file_and_reused_on_the_same_encoder(tokenizer, unet, tmp_path):
    toy = Toy(tokenizer)
    m = cat_membrane(unet)
    gate = compute_gate(m, toy.context)
    m.info.transport = {"gate": gate.to_dict()}
    save_membrane(m, tmp_path / "cat.safetensors")
    _, meta = read_file(tmp_path / "cat.safetensors")
    assert "gate" in meta["spm_transport"]
    loaded = load_membrane(tmp_path / "cat.safetensors")
    tr = toy.transport()
    tr.prepare_calibrations([loaded])
    got = tr.gates.peek(loaded)
    assert got is not None and got.source == "file" and got.lo == pytest.approx(gate.lo)
    assert tr.scores(toy.context(["a cat", "a red car"]), [loaded])[:, 0].tolist() == [1.0, 0.0]


def test_another_encoder_or_other_weights_recompute_the_gate(tokenizer, unet):
    m = cat_membrane(unet)
    m.info.transport = {"gate": compute_gate(m, Toy(tokenizer).context).to_dict()}
    other = Toy(tokenizer, seed=1)  # another offset and other token vectors: another fingerprint
    tr = other.transport()
    gate = tr.prepare_gates([m])[0]
    assert gate.source == "computed" and "differs" in gate.reason
    changed = cat_membrane(unet, "changed")
    with torch.no_grad():
        for stem, layer in changed.layers.items():
            if stem.endswith("attn2_to_v"):
                layer.lora_down.weight.mul_(2.0)
    changed.info.transport = m.info.transport
    gate = Toy(tokenizer).transport().prepare_gates([changed])[0]
    assert gate.source == "computed" and "other weights" in gate.reason


def test_files_without_gate_data_keep_todays_metrics(tokenizer, unet):
    toy = Toy(tokenizer)
    m = cat_membrane(unet)
    assert m.info.transport == {}
    ctx, toks = toy.encode(["a cat", "a red car"])
    tr = toy.transport(DEFAULT_METRIC)
    tr.registry.record(ctx, toks)
    assert tr.scores(ctx, [m])[:, 0].tolist() == [1.0, 0.0]
    assert len(tr.gates) == 0  # the default metric never calibrates a gate
    rob = toy.transport(ROBUST_METRIC)
    rob.registry.record(ctx, toks)
    assert rob.scores(ctx, [m])[:, 0].tolist() == [1.0, 0.0]
    gate = rob.gates.peek(m)
    assert gate.source == "computed" and "no gate calibration" in gate.reason


def test_a_host_that_prepares_before_sampling_scores_the_gate_only_once_prepared(tokenizer, unet):
    toy = Toy(tokenizer)
    m = cat_membrane(unet)
    tr = toy.transport(ROBUST_METRIC, lazy_phrases=False)  # the WebUI: no encoding inside the UNet hook
    ctx = toy.context(["a photo of a cat"]) + 1e-2  # no token ids known for this row
    assert tr.scores(ctx, [m]).tolist() == [[0.0]] and len(tr.gates) == 0
    tr.prepare_calibrations([m])  # what the WebUI runtime calls before sampling
    assert tr.scores(ctx, [m]).tolist() == [[1.0]]


def test_a_membrane_without_key_value_layers_has_an_unusable_gate(tokenizer):
    toy = Toy(tokenizer)
    m = Membrane({}, MembraneInfo(concepts=["cat"]), name="empty")
    gate = compute_gate(m, toy.context)
    assert not gate.usable and "key/value" in gate.reason
    assert torch.equal(gate.score(toy.context(["a cat"])), torch.zeros(1))


def test_gate_round_trips_through_its_dict(tokenizer, unet):
    m = cat_membrane(unet)
    gate = compute_gate(m, Toy(tokenizer).context)
    back = Gate.from_dict(gate.to_dict()).bind(gate_modules(m))
    ctx = Toy(tokenizer).context(["a cat", "a dog", "cat cat cat"])
    assert torch.equal(back.score(ctx), gate.score(ctx)) and back.source == "file"


def test_training_stores_the_gate(tmp_path):
    from spm.hosts.diffusers import DiffusersBackend
    from spm.train import TrainConfig, Trainer
    from tests.test_train_models import tiny_sd_pipe

    backend = DiffusersBackend(tiny_sd_pipe())
    cfg = TrainConfig(targets=["circle"], iterations=2, anchors=1, pool_size=2, max_denoising_steps=4, lr_scheduler="constant",
                      lr_warmup_steps=0)
    res = Trainer(backend, cfg, tmp_path / "c.safetensors", progress_bar=False).train()
    m = load_membrane(tmp_path / "c.safetensors")
    stored = m.info.transport["gate"]
    assert stored["stems"] and len(stored["sigma"]) == len(stored["stems"])
    assert "concepts" in m.info.transport  # the ngram calibration is kept next to it
    fresh = training_gate(backend, res.membrane)
    assert fresh["lo"] == pytest.approx(stored["lo"]) and fresh["checksum"] == pytest.approx(stored["checksum"])


def test_training_gate_is_best_effort():
    class Broken:
        def encode(self, texts):
            raise RuntimeError("text encoder offloaded")

    m = Membrane({}, MembraneInfo(concepts=["cat"]))
    assert training_gate(Broken(), m) == {}


def test_explain_shows_the_gate_and_its_calibration(tokenizer, unet):
    from spm.explain import explain, format_explanation

    toy = Toy(tokenizer)
    toy.alike.add(toy.id("kitten"))
    m = cat_membrane(unet)
    ex = explain(toy.transport(ROBUST_METRIC), [m], "a kitten on a sofa")
    g = ex["membranes"][0]["gate"]
    assert g["score"] == 1.0 and g["token"] == "kitten" and ex["membranes"][0]["strength"] == 1.0
    assert g["calibration"]["usable"] and g["calibration"]["modules"] == len(gate_modules(m))
    text = format_explanation(ex)
    assert "gate: score 1.000" in text and "gate calibration (computed" in text
    plain = explain(toy.transport(DEFAULT_METRIC), [m], "a kitten on a sofa")
    assert "gate" not in plain["membranes"][0]


def test_the_webui_offers_the_robust_metric_by_name():
    from spm.webui.panel import METRIC_CHOICES, parse_transport_infotext

    assert ROBUST_METRIC in METRIC_CHOICES and "membrane" in METRIC_CHOICES
    assert all(c in METRICS for c in METRIC_CHOICES)
    assert parse_transport_infotext(f"{ROBUST_METRIC} x1.2") == (ROBUST_METRIC, 1.2)


def test_bench_gate_refuses_a_bad_budget_and_times_an_sd1_sized_gate():
    from bench import gate as bench_gate

    assert bench_gate.main(["--world", "toy", "--budget", "nope=1"]) == 2
    assert bench_gate.main(["--world", "toy", "--budget", "steps=many"]) == 2
    c = bench_gate.cost_sd1(reps=2)
    assert c["modules"] == 32 and c["sd1_gate_ms"] > 0 and c["sd1_gate_ms_231_tokens"] > 0
