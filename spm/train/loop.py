"""The training loop: a fresh membrane on the frozen UNet, trained with erase loss + Latent Anchoring.

Usage::

    from spm.train import Trainer, TrainConfig
    result = Trainer(backend, TrainConfig(targets=["circle"]), output="models/spm/circle.safetensors").train()

* The UNet is frozen (``requires_grad`` False, restored afterwards) and never modified: the membrane is
  attached with :class:`~spm.attach.MembraneStack` (``trainable=True``) and detached at the end.
* ``callback(Progress)`` is called every step (the WebUI tab draws from it); ``should_stop()`` is polled
  every step and before each UNet call of the latent-pool warm-up; Ctrl-C (``KeyboardInterrupt``) stops too.
  Either way the membrane trained so far is saved atomically, with its resumable state beside it.
* ``on_phase(Phase)`` reports the phases around the steps: filling the latent pool (k/N denoising steps), the
  start of the steps ("training", when their clock starts), drawing the erasure signal's held-out probes once
  ("probes", k/N denoising steps, before the synonym scan or the steps), the erasure check after
  the last step ("signal") and saving.
* ``save_every`` writes checkpoints (membrane + ``.trainstate``); ``resume=True`` continues from them.  The
  ``.trainstate`` is deleted when a run finishes all its iterations, unless ``keep_state=True`` (to extend
  the run later); an interrupted run keeps it, so it can be resumed.
* The latent pool holds at most as many trajectories as the run has iterations left: a trajectory is only
  worth its fill cost if an iteration draws it.
* ``sample_every`` writes preview grids (target and control prompts; membrane OFF | ON) as PNG.
* Every ``ceil(iterations / signal_checks)`` steps the erasure signal of :mod:`spm.train.signal` is measured on
  held-out probes; with ``stop_when_erased`` training stops once ``signal_patience`` consecutive checks say erased.
  The result at the end is :attr:`TrainResult.erasure` (``erased``, ``signal``, ``threshold``, ``message``), also
  saved as ``spm_training.erasure`` and the ``spm_erasure`` metadata key; the checks are resumable state.
* ``robust="embedding"`` (:mod:`spm.train.robust`): adversarial text embeddings are searched against the
  membrane as it trains and erased too (a bank of them, resumable state; ``spm_training.robust_stats``).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..attach import MembraneStack
from ..backend import Backend, Conditioning, check_backend
from ..checkpoint import MembraneFileError, load_membrane, save_membrane
from ..gate import training_gate
from ..membrane import Membrane, MembraneInfo
from ..naming import context_dim, find_targets
from ..progress import tally
from ..response import ROBUST_RAMP, training_response
from ..transport import VOCABULARY_PROGRESS, training_calibration, training_candidates, training_neighbours
from .anchors import sample_anchors
from .config import CONTEXT_WORDS, LR_LAYER_MODES, TrainConfig
from .contexts import context_prompts, vocabulary_words
from .lr import gains_summary, layer_gains, param_groups
from .objective import AnchorWeight, CostMeter, extra_erase_loss, objective_step
from .robust import make_robust
from .sampling import LatentPool, ReferenceSchedule, image_grid, sample_images
from .signal import ErasureProbe, StopRule, check_interval, min_steps, pause_parts, probe_levels, summary
from .state import load_state, save_state, saved_settings, state_path

log = logging.getLogger("spm")

AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Stopped(BaseException):
    """``should_stop`` answered yes inside a phase without an iteration to finish (drawing the probes); a
    BaseException, like Ctrl-C, so that no ``except Exception`` on the way swallows it."""


NEIGHBOUR_RNG = "neighbours.rng"  # the .trainstate tensor of the neighbour picks' generator
CONTEXT_RNG = "contexts.rng"  # the .trainstate tensor of the context prompt picks' generator
VOCABULARY_WORDS = 256  # context_words="mixed": the vocabulary words one target's context prompts draw from


@dataclass
class Progress:
    """One step's report for progress bars and UIs."""

    step: int
    total: int
    loss: float
    erase: float
    anchor: float
    la_weight: float
    lr: float
    it_per_s: float
    eta_s: float
    preview: Any = None  # a PIL image when a grid was just made
    preview_path: Path | None = None


def _pick_generator(seed: int, resumed: dict, key: str) -> torch.Generator:
    """A per-step pick generator seeded ``seed``, or where a resumed run's ``.trainstate`` saved it (``key``)."""
    g = torch.Generator().manual_seed(seed)
    saved = resumed.get("tensors", {}).get(key)
    if saved is not None:
        g.set_state(saved)
    return g


@dataclass
class Phase:
    """A report from outside the training steps: ``name`` ("pool": filling the latent pool, counted in
    trajectory denoising steps; "training": the steps begin; "saving"), ``done`` of ``total`` units, and what
    they are."""

    name: str
    done: int
    total: int
    unit: str = ""


@dataclass
class TrainResult:
    membrane: Membrane
    path: Path | None
    steps: int
    interrupted: bool
    seconds: float
    history: list[dict] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    # the erasure signal at the end (spm/train/signal.py): erased (bool), signal, threshold, message (+ details)
    erasure: dict = field(default_factory=dict)
    # the end-of-run work an Interrupt skipped after the last step (e.g. "the membrane gate's calibration")
    skipped: list[str] = field(default_factory=list)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of ``lr`` at ``step`` (0-based).  Warm-up is capped at a sixth of the run."""
    total = cfg.iterations
    warm = min(cfg.lr_warmup_steps, total // 6)
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if cfg.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if cfg.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((cfg.lr_cycles * progress) % 1.0)))


def make_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (8-bit where ``cfg.optimizer`` asks or allows) over ``params``: tensors, or groups of
    :func:`spm.train.lr.param_groups` (each with its ``lr_gain``)."""
    want8 = cfg.optimizer == "adamw8bit" or (cfg.optimizer == "auto" and torch.device(device).type == "cuda")
    if want8:
        try:
            import bitsandbytes as bnb  # type: ignore

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            if cfg.optimizer == "adamw8bit":
                raise ValueError("optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes)") from None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _StopRequested(Exception):
    """``should_stop()`` turned true inside the pool warm-up (raised from a UNet pre-hook, caught by the loop)."""


class Trainer:
    """Trains one membrane on ``backend`` (see the module docstring)."""

    def __init__(self, backend: Backend, config: TrainConfig, output: str | Path | None = None, *,
                 callback: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 progress_bar: bool = True, resume: bool = False, name: str | None = None,
                 on_phase: Callable[[Phase], None] | None = None, keep_state: bool = False):
        check_backend(backend)
        config.validate()
        self.backend, self.cfg = backend, config
        self.output = Path(output) if output is not None else None
        if self.output is not None and self.output.suffix.lower() != ".safetensors":
            raise ValueError(f"{self.output.name}: membranes are saved as .safetensors")
        self.callback, self.should_stop = callback, should_stop
        self.progress_bar, self.resume = progress_bar, resume
        self.name = name or (self.output.stem if self.output else "membrane")
        self.on_phase, self.keep_state = on_phase, keep_state
        self.meter = CostMeter()
        # the erasure signal: its probes are built before the steps, its UNet rows counted apart from training's
        self.signal_meter = CostMeter()
        self.probe: ErasureProbe | None = None
        self.context_probe: ErasureProbe | None = None
        self.context_rows: dict = {}
        self.context_texts: dict[str, list[str]] = {}
        self.context_dropped: dict[str, list[str]] = {}
        self.neighbour_rng: torch.Generator | None = None  # picks the erased neighbour of each step (resumable)
        self.context_rng: torch.Generator | None = None  # picks the context prompt of each step (resumable)
        interval = check_interval(config.iterations, config.signal_checks)
        self.rule = StopRule(interval, min_steps(config.iterations, config.lr_warmup_steps, interval,
                                                 config.signal_patience), config.signal_patience,
                             config.stop_when_erased and config.iterations >= config.signal_checks)

    # --- pieces -------------------------------------------------------------------------------------
    def _new_membrane(self) -> Membrane:
        unet = self.backend.unet
        ctx = context_dim(unet)
        from ..naming import describe_architecture

        info = MembraneInfo(concepts=list(self.cfg.targets), surrogate=self.cfg.surrogate,
                            architecture=describe_architecture(ctx), context_dim=ctx, training=self.cfg.to_dict())
        if getattr(self.backend, "transport_calibration", None) is not None and info.concepts:
            self._phase("calibration", 0, 1)  # minutes on a CPU WebUI (padded windows); seconds on a GPU
        info.transport = training_calibration(self.backend, info.concepts)  # spm_transport, if the backend can
        torch.manual_seed(self.cfg.seed)
        return Membrane.for_targets(find_targets(unet), self.cfg.rank, self.cfg.alpha, info, self.name)

    def _save(self, membrane: Membrane, optimizer, g, step: int, aw: AnchorWeight, extra: dict,
              state: bool = True) -> None:
        if self.output is None:
            return
        robust = getattr(self, "robust", None)
        if robust is not None and "robust_stats" not in extra:
            extra = {**extra, "robust_stats": robust.summary()}
        membrane.info.training = {**self.cfg.to_dict(), "steps_done": step, "anchor_weight": aw.value,
                                  "architecture_label": getattr(self.backend, "architecture", ""), **extra}
        save_membrane(membrane, self.output)
        if not state:  # a finished run: no state to resume from (an older checkpoint's goes too)
            state_path(self.output).unlink(missing_ok=True)
            return
        rmeta, rtensors = robust.state_dict() if robust is not None else (None, None)
        tensors = dict(rtensors or {})
        if self.neighbour_rng is not None:  # the neighbour picks go on where they stopped
            tensors[NEIGHBOUR_RNG] = self.neighbour_rng.get_state()
        if self.context_rng is not None:
            tensors[CONTEXT_RNG] = self.context_rng.get_state()
        save_state(state_path(self.output), optimizer, g, {"step": step, "anchor_weight": aw.state_dict(),
                                                            "config": self.cfg.to_dict(), "signal": self.rule.state_dict(),
                                                            **({"robust": rmeta} if rmeta is not None else {})}, tensors)

    def _preview(self, stack, membrane: Membrane, cond: dict[str, Conditioning], step: int, ac) -> tuple[Any, Path | None]:
        cfg = self.cfg
        prompts = list(cfg.targets) + list(cfg.control_prompts)
        enc = self.backend.encode(prompts)
        seeds = list(range(cfg.preview_seeds))
        rows = enc.rows([i for i in range(len(prompts)) for _ in range(2 * len(seeds))])
        strengths = [s for _ in prompts for s in [0.0] * len(seeds) + [1.0] * len(seeds)]
        seed_list = [s for _ in prompts for _ in range(2) for s in seeds]
        was = membrane.training
        imgs = sample_images(self.backend, stack, rows, cond["uncond"], strengths, seed_list, cfg.preview_steps,
                             autocast=ac)
        membrane.train(was)
        grid = image_grid(imgs, len(prompts))
        path = None
        if self.output is not None:
            folder = self.output.with_name(self.output.stem + ".samples")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"step_{step:06d}.png"
            grid.save(path)
        return grid, path

    def _neighbours(self) -> dict[str, list[str]]:
        """The words to erase beside each target (``TrainConfig.neighbours``; see :func:`spm.explain.neighbour_words`),
        from the backend's transport on this encoder; remembered for the file's metadata and logged."""
        shown = getattr(self.backend, "transport_neighbours", None) is not None
        if shown:
            self._phase("neighbours", 0, 1)  # encodes every whole vocabulary word once (for all targets)
        # the vocabulary pass (minutes on a CPU WebUI) counts its words and polls Interrupt, as the synonym scan's does;
        # a concept whose similarities the phrase cache already holds reads nothing, and the phase stays 0/1 … 1/1
        with self._reading_vocabulary("neighbours"):
            found = training_neighbours(self.backend, self.cfg.targets)
        self.neighbour_words = {t: found.get(t, []) for t in self.cfg.targets}
        for t, ws in self.neighbour_words.items():
            if ws:
                log.info("SPM: %s: also erasing the %d word%s its transport opens for: %s", t, len(ws),
                         "" if len(ws) == 1 else "s", ", ".join(ws[:12]) + (" …" if len(ws) > 12 else ""))
        if shown:
            self._phase("neighbours", 1, 1)
        return {t: ws for t, ws in self.neighbour_words.items() if ws}

    def _store_synonyms(self, membrane: Membrane) -> None:
        """Put the model synonyms, their scan and their transport calibrations into ``membrane.info.transport``."""
        if not self.synonym_scan:
            return
        tr = dict(membrane.info.transport or {})
        tr["synonyms"] = {t: list(ws) for t, ws in self.synonym_words.items()}
        tr["synonym_scan"] = self.synonym_scan
        words = [w for ws in self.synonym_words.values() for w in ws if w not in (tr.get("concepts") or {})]
        if words:
            cal = training_calibration(self.backend, list(dict.fromkeys(words)))
            if cal.get("concepts") and cal.get("fingerprint") == tr.get("fingerprint", cal.get("fingerprint")):
                tr.setdefault("params", cal.get("params"))
                tr.setdefault("fingerprint", cal.get("fingerprint"))
                tr["concepts"] = {**(tr.get("concepts") or {}), **cal["concepts"]}
        membrane.info.transport = tr

    def _phase(self, name: str, done: int, total: int, unit: str = "") -> None:
        if self.on_phase is not None:
            self.on_phase(Phase(name, done, total, unit))

    def _fill(self, source: LatentPool, cond: dict[str, Conditioning]) -> bool:
        """Fill the latent pool (``max_denoising_steps − 1`` batched CFG steps before the first iteration),
        polling ``should_stop`` before each of its UNet calls.  False, with the pool left empty, if stopped."""
        self._phase("pool", 0, source.fill_work(), "denoising steps")

        def progress(done: int, total: int) -> None:
            self._phase("pool", done, total, "denoising steps")

        if self.should_stop is None:
            source.fill(cond["targets"], cond["uncond"], progress)
            return True

        def poll(module, args):
            if self.should_stop():
                raise _StopRequested

        handle = self.backend.unet.register_forward_pre_hook(poll)
        try:
            source.fill(cond["targets"], cond["uncond"], progress)
            return True
        except _StopRequested:
            source.x, source.k, source.ti = [], [], []
            return False
        finally:
            handle.remove()

    def _planned_ufe(self) -> int:
        """The training's planned UNet work (:func:`spm.train.synonyms.planned_ufe`): what the model-synonym scan and
        the response gate's calibration are bounded by."""
        from .synonyms import planned_ufe

        cfg = self.cfg
        return planned_ufe(cfg.iterations, cfg.anchors, cfg.anchor_empty, cfg.context_count > 0)

    def _synonyms(self, stack, cond: dict[str, Conditioning], ac) -> dict[str, list[str]]:
        """The model synonyms of each target (``TrainConfig.synonyms``; :mod:`spm.train.synonyms`), stored in the
        membrane's ``spm_transport`` (with their calibrations) by the caller; logged.  Builds the held-out probes."""
        from . import synonyms as syn

        cfg = self.cfg
        if getattr(self.backend, "transport_candidates", None) is None:
            return {}
        planned = self._planned_ufe()
        rows = syn.probe_row_count(cfg.signal_trajectories, len(probe_levels(cfg.max_denoising_steps, cfg.signal_levels)),
                                   len(cfg.targets))
        n = syn.words_per_side(planned, rows, len(cfg.targets))
        if n == 0:
            self.synonym_skipped = (f"skipped: {cfg.iterations} iterations pay for too few words "
                                    f"(fewer than {syn.MIN_WORDS} candidates and {syn.MIN_WORDS} null words within "
                                    f"{syn.BUDGET_SHARE:.0%} of the training's UNet work)")
            log.warning("SPM: model synonyms %s", self.synonym_skipped)  # the WebUI's console shows warnings only
            return {}
        # first the vocabulary, in the host's text encoder (minutes on a CPU WebUI): counted in vocabulary words
        with self._reading_vocabulary("vocabulary"):
            words = training_candidates(self.backend, cfg.targets, n, n, syn.SEED)
        if not words:
            return {}
        probe = self._probe(stack, cond, ac)
        meter = CostMeter()
        try:
            found = syn.scan(self.backend, stack, probe, list(cfg.targets), words, meter, ac,
                             progress=self._counted("synonyms", "words"))
        except Exception as e:  # never fail a training run for it
            log.warning("SPM: the model-synonym scan failed (%s); training without it", e)
            return {}
        self.synonym_scan = syn.metadata(found)["synonym_scan"]
        self.synonym_ufe = meter.ufe
        return {t: s.words for t, s in found.items() if s.words}

    def _new_probe(self, stack, targets: Conditioning, surrogate: Conditioning, uncond: Conditioning, seed: int, ac,
                   progress, surrogate_is_uncond: bool = False, surrogate_per_row: bool = False) -> ErasureProbe:
        """Held-out probes of ``targets`` at the config's levels and seeds."""
        cfg = self.cfg
        return ErasureProbe(self.backend, stack, targets, surrogate, uncond, steps=cfg.max_denoising_steps,
                            guidance=cfg.xt_guidance, resolution=cfg.resolution or self.backend.latent.resolution,
                            trajectories=cfg.signal_trajectories, levels=cfg.signal_levels, seed=seed,
                            meter=self.signal_meter, autocast=ac, surrogate_is_uncond=surrogate_is_uncond,
                            surrogate_per_row=surrogate_per_row, progress=progress)

    def _probe(self, stack, cond: dict[str, Conditioning], ac) -> ErasureProbe:
        """The erasure signal's held-out probes, built on the first call: the target's and, with context prompts
        (``TrainConfig.contexts``), the context prompts' (:attr:`context_probe`), counted as one "probes" phase."""
        if self.probe is None:
            cfg = self.cfg
            alone_uncond = cfg.surrogate == ""
            calls = [ErasureProbe.calls(cfg.max_denoising_steps, cfg.signal_levels, alone_uncond)]
            if self.context_rows:  # the context pairs' check (a UNet call each), then their own probes
                calls += [sum(len(r[1]) for r in self.context_rows.values()),
                          ErasureProbe.calls(cfg.max_denoising_steps, cfg.signal_levels, False)]
            count, total = self._counted("probes", "denoising steps"), sum(calls)

            def part(offset: int):
                def progress(done: int, _total: int) -> None:
                    if done or not offset:  # a later part's start is the earlier part's end, already reported
                        count(offset + done, total)
                return progress

            probe = self._new_probe(stack, cond["targets"], cond["neutral"], cond["uncond"], cfg.seed, ac, part(0),
                                    surrogate_is_uncond=alone_uncond)
            if self.context_rows:
                self._drop_target_like_contexts(stack, probe, ac, part(calls[0]))
            if self.context_rows:
                with_t = Conditioning.cat([r[0] for r in self.context_rows.values()])
                with_s = Conditioning.cat([r[1] for r in self.context_rows.values()])
                self.context_probe = self._new_probe(stack, with_t, with_s, cond["uncond"], cfg.seed + 1, ac,
                                                     part(calls[0] + calls[1]), surrogate_per_row=True)
            elif len(calls) > 1:  # every pair dropped: the count ends here
                count(total, total)
            self.probe = probe  # set once both are drawn (Interrupt in between leaves neither)
        return self.probe

    def _drop_target_like_contexts(self, stack, probe: ErasureProbe, ac, progress) -> None:
        """Keep only the context pairs whose words around the surrogate predict, on the target's own held-out probes
        (membrane off), nearer the surrogate's prediction than the target's: the bisector, a property of the
        geometry, not a number fitted on a model.  Where the words alone already draw the target (toy world 2's base
        model draws a cloud for function words), the pair's erase goal is itself the target and its term would undo
        the erasure.  ``progress(done, total)``: counted in pairs (:func:`spm.train.synonyms.distances` batches them)."""
        from . import synonyms as syn

        done = 0

        def step(k: int) -> None:
            nonlocal done
            done += k
            progress(done, 0)

        for ti, (with_t, with_s) in sorted(self.context_rows.items()):
            target = self.cfg.targets[ti]
            to_o, to_s = syn.distances(self.backend, stack, probe, syn.probe_rows(probe, ti), with_s, self.signal_meter,
                                       ac, progress=step)
            near_target = (to_o < to_s).tolist()
            dropped = [j for j, d in enumerate(near_target) if d]
            keep = [j for j, d in enumerate(near_target) if not d]
            texts = self.context_texts.get(target, [])
            if dropped:
                self.context_dropped[target] = [texts[j] for j in dropped]
                log.info("SPM: %d of %d context prompts of %r left out: the words around the surrogate already predict "
                         "nearer the target than the surrogate (e.g. %r)", len(dropped), len(with_s), target,
                         self.context_dropped[target][0])
            if keep:
                self.context_rows[ti] = (with_t.rows(keep), with_s.rows(keep))
                self.context_texts[target] = [texts[j] for j in keep]
            else:
                del self.context_rows[ti]
                self.context_texts.pop(target, None)

    @contextmanager
    def _reading_vocabulary(self, phase: str):
        """While a backend call inside it reads the host's vocabulary (:data:`spm.transport.VOCABULARY_PROGRESS`), count
        the words read in ``phase`` and poll Interrupt after each batch."""
        token = VOCABULARY_PROGRESS.set(self._counted(phase, "words"))
        try:
            yield
        finally:
            VOCABULARY_PROGRESS.reset(token)

    def _counted(self, phase: str, unit: str):
        """A ``progress(done, total)`` for a counted phase outside the steps (the vocabulary, the probes, the word
        scan; after them the synonym report and the gate): reports the count, and polls ``should_stop`` after each
        piece of work, as the pool's warm-up does; Interrupt there raises :class:`_Stopped` instead of waiting for
        the phase to end (before the steps it stops the run; after them it skips what is left of the phase)."""

        def progress(done: int, total: int) -> None:
            self._phase(phase, done, total, unit)
            if done < total and self.should_stop is not None and self.should_stop():
                raise _Stopped

        return progress

    def _stored_part(self, membrane: Membrane, key: str, what: str, skipped: list[str],
                     compute: Callable[[Callable[[int, int], None]], dict]) -> None:
        """After the steps: ``compute(progress)`` one part of ``spm_transport`` (``key``) in a phase of its own,
        counted in prompts; Interrupt there (or in an earlier part, which leaves ``skipped`` non-empty: this one is
        then not started) saves the membrane without it, and the host computes it on first use."""
        value: dict = {}
        try:
            if skipped:
                raise _Stopped
            value = compute(self._counted(key, "prompts"))
        except _Stopped:
            skipped.append(what)
            log.warning("SPM: interrupted before %s was done; saving without it (it is computed on first use)", what)
        if value:
            membrane.info.transport = {**membrane.info.transport, key: value}

    def _check(self, stack, cond: dict[str, Conditioning], step: int, ac):
        """Measure the erasure signal now (building the held-out probes on the first call); with context probes,
        the less erased of the two."""
        probe = self._probe(stack, cond, ac)
        check = probe.measure(step)
        cp = self.context_probe
        if cp is not None:
            other = cp.measure(step)
            parts = {"alone": check.signal, "in_context": other.signal}
            weakest = self._weakest_context(cp)
            log.info("SPM: step %d: erasure signal %.3f alone, %.3f inside other words", step, check.signal, other.signal)
            check = other if other.signal < check.signal else check
            check.parts = parts
            check.weakest_context = weakest
        adversaries = self.robust.closure(probe) if self.robust is not None else None
        if adversaries is not None:
            # robust training: erased means its adversaries so far are erased too (each measured as a synonym is)
            log.info("SPM: step %d: the adversaries found so far close %.3f", step, adversaries)
            check.parts = {**(check.parts or {"alone": check.signal}), "adversaries": adversaries}
            check.signal = min(check.signal, adversaries)
        return check

    def _weakest_context(self, cp: ErasureProbe) -> tuple[str, float] | None:
        """The context prompt whose held-out trajectory the last check left least erased, and its ratio: trajectory
        ``j`` is of row ``j % rows`` of the context probes' targets, the targets' kept context prompts in order."""
        texts = [t for rows_of in self.context_texts.values() for t in rows_of]
        per = cp.last_per_trajectory  # of the check just measured
        if not texts or not per:
            return None
        j = min(range(len(per)), key=per.__getitem__)
        return texts[j % len(texts)], per[j]

    def _synonym_closures(self, stack, cond: dict[str, Conditioning], ac) -> dict[str, float]:
        """The model synonyms that the transport opens the membrane for, measured with the membrane ON on the scan's
        probe rows of their target (:meth:`ErasureProbe.measure_words`): word → share of the target's gap closed.
        Reported at the end of a run whose target passed; training does not wait for them (see the README)."""
        from . import synonyms as syn

        probe = self._probe(stack, cond, ac)
        # counted in words, in the erasure check's phase; Interrupt skips it
        progress = tally(self._counted("signal", "words"),
                         sum(len(self.synonym_words.get(t) or []) for t in self.cfg.targets))
        found: dict[str, float] = {}
        for ti, target in enumerate(self.cfg.targets):
            words = self.synonym_words.get(target) or []
            if words:
                closed = probe.measure_words(syn.probe_rows(probe, ti), self.backend.encode(words), progress=progress)
                for w, c in zip(words, closed):
                    found[w] = min(c, found.get(w, c))
        return found

    # --- the loop -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        if self.resume and self.output is not None:
            # the optimiser's groups (lr_layers) and the context prompts and their probes (context_words) must be the
            # saved run's: continue with the settings it started with
            saved = saved_settings(state_path(self.output)) or {}
            for name, known in (("lr_layers", LR_LAYER_MODES), ("context_words", CONTEXT_WORDS)):
                value = saved.get(name)
                if value in known and value != getattr(self.cfg, name):
                    log.warning("SPM: %s was started with %s=%s; continuing with it (not %s)", self.output.name, name,
                                value, getattr(self.cfg, name))
                    self.cfg = self.cfg.with_(**{name: value})
        cfg, be = self.cfg, self.backend
        unet = be.unet
        grad_state = {n: p.requires_grad for n, p in unet.named_parameters()}
        unet.requires_grad_(False)
        g = torch.Generator().manual_seed(cfg.seed)
        membrane = self._new_membrane().to(be.device)
        start = 0
        resumed: dict = {}
        self.robust = None
        self.neighbour_words: dict[str, list[str]] = {}
        self.synonym_words: dict[str, list[str]] = {}
        self.synonym_scan: dict = {}
        self.synonym_ufe = 0
        self.synonym_skipped = ""
        aw = AnchorWeight.from_config(cfg)
        self.lr_gains = None
        if cfg.lr_layers == "gain":
            where = {t.file_key: t.name for t in find_targets(unet)}
            self.lr_gains = layer_gains(unet, {k: where.get(k) for k in membrane.layers})
        optimizer = make_optimizer(cfg, param_groups(dict(membrane.layers), self.lr_gains), be.device)
        if self.resume:
            if self.output is None or not self.output.exists():
                raise MembraneFileError(f"cannot resume: {self.output} does not exist")
            saved = load_membrane(self.output)
            missing = set(membrane.layers) ^ set(saved.layers)
            if missing:
                raise MembraneFileError(f"cannot resume: {self.output.name} has other modules than this model's membrane")
            with torch.no_grad():
                for k, layer in membrane.layers.items():
                    layer.lora_down.weight.copy_(saved.layers[k].lora_down.weight)
                    layer.lora_up.weight.copy_(saved.layers[k].lora_up.weight)
            meta = load_state(state_path(self.output), optimizer, g)
            resumed = meta
            start = int(meta.get("step", 0))
            done = (saved.info.training or {}).get("steps_done")
            if isinstance(done, int) and done != start:
                # the membrane is saved before its state: an interrupt in between leaves a newer membrane
                log.warning("SPM: %s has %d steps but its %s has %d (a save was interrupted); continuing from the "
                            "membrane's %d steps", self.output.name, done, state_path(self.output).name, start, done)
                start = done
            aw.load_state_dict(meta.get("anchor_weight", {}))
            self.rule.load_state_dict(meta.get("signal", {}))
            if start >= cfg.iterations:
                log.info("SPM: %s already has %d of %d steps", self.output.name, start, cfg.iterations)
        ac = AUTOCAST[cfg.precision]
        stack = MembraneStack(unet, trainable=True)
        history: list[dict] = []
        interrupted = False
        last_check, erased_stop = None, False
        step = start
        fill_ufe, t_aside, t_loop = 0, 0.0, time.perf_counter()
        t_start = time.perf_counter()
        bar = None
        try:
            stack.add(membrane, 1.0)
            texts = {"targets": list(cfg.targets), "positives": cfg.positives, "neutral": [cfg.surrogate], "uncond": [""]}
            cond = {k: be.encode(v) for k, v in texts.items()}
            self.context_rows = {}  # target index -> (context prompts with the target, the same with the surrogate)
            self.context_texts = {}
            self.context_dropped = {}  # target -> context prompts left out (their words alone draw the target)
            for ti, t in enumerate(cfg.targets if cfg.context_count > 0 else []):
                other = vocabulary_words(VOCABULARY_WORDS, cfg.seed + ti) if cfg.context_words == "mixed" else ()
                if cfg.context_words == "mixed" and not other and ti == 0:
                    log.warning("SPM: no CLIP vocabulary for the context prompts' other words; function words only")
                pairs = context_prompts(t, cfg.surrogate, cfg.context_count, cfg.seed + ti, other=other)
                if pairs:
                    self.context_texts[t] = [p[0] for p in pairs]
                    enc, n = be.encode([p[0] for p in pairs] + [p[1] for p in pairs]), len(pairs)
                    self.context_rows[ti] = (enc.rows(list(range(n))), enc.rows(list(range(n, 2 * n))))
            neigh = self._neighbours() if cfg.neighbours else {}
            if cfg.synonyms != "off":
                self.synonym_words = self._synonyms(stack, cond, ac)
                self._store_synonyms(membrane)
                if cfg.synonyms == "erase":
                    for t, ws in self.synonym_words.items():
                        neigh[t] = list(dict.fromkeys(neigh.get(t, []) + ws))
            # the erasure signal's held-out probes, drawn now (a counted phase of their own, which polls should_stop
            # first; the scan above draws them when it runs) rather than inside the steps, whose clock they would skew
            self._probe(stack, cond, ac)
            neigh_rows = {}  # target index -> its neighbours' conditioning rows
            if neigh:
                words = [w for t in cfg.targets for w in neigh.get(t, [])]
                enc, k = be.encode(words), 0
                for ti, t in enumerate(cfg.targets):
                    n = len(neigh.get(t, []))
                    if n:
                        neigh_rows[ti] = enc.rows(list(range(k, k + n)))
                    k += n
            ctx_rows = self.context_rows
            # each extra term picks its row per step from a generator of its own (apart from g), resumed from the state
            gc = _pick_generator(cfg.seed + 104729, resumed, CONTEXT_RNG)
            self.context_rng = gc if ctx_rows else None
            gn = _pick_generator(cfg.seed + 7919, resumed, NEIGHBOUR_RNG)
            self.neighbour_rng = gn if neigh_rows else None
            self.robust = robust = make_robust(cfg, cond, ac, self.meter)  # spm/train/robust.py (None: off)
            if robust is not None and resumed.get("robust") is not None:
                robust.load_state_dict(resumed["robust"], resumed.get("tensors", {}))
            res = cfg.resolution or be.latent.resolution
            if cfg.schedule == "reference":
                source: Any = ReferenceSchedule(be, stack, cfg.max_denoising_steps, cfg.xt_guidance, res,
                                                cfg.dynamic_resolution, g, self.meter, ac)
            else:
                source = LatentPool(be, stack, cfg.max_denoising_steps, cfg.xt_guidance, res, cfg.dynamic_resolution,
                                    g, self.meter, min(cfg.pool_size, max(1, cfg.iterations - start)), ac)
            n_anchor = cfg.anchors if aw.mode != "off" else 0
            need_uncond = cfg.schedule == "reference" or cfg.surrogate != ""
            if self.progress_bar:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.iterations, initial=start, desc=f"SPM {', '.join(cfg.targets)}", unit="it",
                           dynamic_ncols=True)
            membrane.train()
            if not isinstance(source, LatentPool):
                self._phase("training", step, cfg.iterations, "steps")
            fill_ufe = 0
            # a part of the check that passes pauses its erase term until a check says otherwise (signal.pause_parts)
            weights = pause_parts(self.rule.checks[-1].get("parts") if self.rule.checks else None)
            t_aside = 0.0  # previews and checkpoints, excluded from the per-iteration time
            t_loop = time.perf_counter()
            while step < cfg.iterations:
                if self.should_stop is not None and self.should_stop():
                    interrupted = True
                    break
                if isinstance(source, LatentPool) and not source.x:
                    if not self._fill(source, cond):
                        interrupted = True
                        break
                    fill_ufe = self.meter.ufe
                    t_loop = time.perf_counter()
                    self._phase("training", step, cfg.iterations, "steps")  # the steps' clock starts now
                rate = cfg.lr * lr_factor(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = rate * group.get("lr_gain", 1.0)  # lr_layers="gain": per-layer (spm/train/lr.py)
                xs = source.draw(cond["targets"], cond["uncond"])
                ti = xs.target_index
                target = cond["targets"].rows([ti])
                anchors = sample_anchors(target, n_anchor, g) if n_anchor else target.rows([])
                if n_anchor and cfg.anchor_empty:
                    anchors = Conditioning.cat([anchors, cond["uncond"]])
                out = objective_step(be, stack, xs.x_t, xs.t, target, cond["positives"].rows([ti]), cond["neutral"],
                                     anchors, aw.value if n_anchor else 0.0, cfg.guidance_scale, self.meter,
                                     uncond=cond["uncond"] if need_uncond else None,
                                     reference_calls=cfg.schedule == "reference", autocast=ac,
                                     last_anchor_is_neutral=bool(n_anchor and cfg.anchor_empty and cfg.surrogate == ""),
                                     erase_weight=weights.get("alone", 1.0))
                loss = out.loss
                rows = neigh_rows.get(ti)
                if rows is not None:  # one of the words the membrane's transport opens for, on the target's x_t
                    j = int(torch.randint(len(rows), (1,), generator=gn))
                    loss = loss + extra_erase_loss(be, stack, xs.x_t, xs.t, rows.rows([j]), out.eps_neutral_off,
                                                   cfg.guidance_scale, self.meter, ac)
                pair = ctx_rows.get(ti) if weights.get("in_context", 1.0) > 0 else None
                if pair is not None:  # the target inside other words, on the target's x_t
                    j = int(torch.randint(len(pair[0]), (1,), generator=gc))
                    loss = loss + extra_erase_loss(be, stack, xs.x_t, xs.t, pair[0].rows([j]), pair[1].rows([j]),
                                                   cfg.guidance_scale, self.meter, ac)
                if robust is not None:  # adversarial text embeddings of this target: extra positives
                    adv = robust.loss(be, stack, step, xs.x_t, xs.t, ti, cond["positives"].rows([ti]), out.eps_neutral_off,
                                      erase=weights.get("adversaries", 1.0) > 0)
                    if adv is not None:
                        loss = loss + adv
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if isinstance(source, LatentPool):
                    unc = out.eps_uncond_off if out.eps_uncond_off is not None else out.eps_neutral_off
                    source.advance(xs, out.eps_target_on, unc, cond["targets"], cond["uncond"])
                la_used = aw.value if n_anchor else 0.0
                if n_anchor:
                    aw.update(out.anchor, out.signal)
                step += 1
                rec = {"step": step, "loss": float(loss.detach()), "erase": out.erase, "anchor": out.anchor,
                       "signal": out.signal, "la_weight": la_used, "k": xs.k}
                history.append(rec)
                if self.rule.due(step, cfg.iterations) and step < cfg.iterations:  # the last step's: after the loop
                    tp = time.perf_counter()
                    last_check = self._check(stack, cond, step, ac)
                    erased_stop = self.rule.record(last_check)
                    weights = pause_parts(last_check.parts)
                    rec["erasure_signal"] = last_check.signal
                    t_aside += time.perf_counter() - tp
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", erase=f"{out.erase:.3g}", anchor=f"{out.anchor:.2g}",
                                    la=f"{la_used:.3g}", refresh=False,
                                    **({"erased": f"{last_check.signal:.0%}"} if last_check is not None else {}))
                preview = preview_path = None
                if cfg.sample_every and step % cfg.sample_every == 0:
                    tp = time.perf_counter()
                    preview, preview_path = self._preview(stack, membrane, cond, step, ac)
                    t_aside += time.perf_counter() - tp
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.iterations:
                    tp = time.perf_counter()
                    self._save(membrane, optimizer, g, step, aw, {})
                    t_aside += time.perf_counter() - tp
                if self.callback is not None:
                    el = time.perf_counter() - t_loop - t_aside
                    done = step - start
                    ips = done / el if el > 0 else 0.0
                    self.callback(Progress(step, cfg.iterations, rec["loss"], out.erase, out.anchor, la_used,
                                           rate, ips,
                                           (cfg.iterations - step) / ips if ips > 0 else float("nan"),
                                           preview, preview_path))
                if erased_stop:
                    break
            if not interrupted and (last_check is None or last_check.step != step):
                # the end of the run (or a resumed, finished one): a phase of its own, since no step follows
                self._phase("signal", 0, 1)
                last_check = self._check(stack, cond, step, ac)
                if history and history[-1]["step"] == step:
                    self.rule.record(last_check)
                    history[-1]["erasure_signal"] = last_check.signal
                self._phase("signal", 1, 1)
            if not interrupted and last_check is not None and last_check.passed and self.synonym_words:
                try:  # the words that open the membrane: is it erased for them too? (reported, never waited for)
                    last_check.synonyms = self._synonym_closures(stack, cond, ac)
                except _Stopped:  # Interrupt after the last step: the trained membrane stands, unreported words
                    log.warning("SPM: interrupted while measuring the model synonyms; saving without them")
                except Exception as e:  # never fail a training run for it
                    log.warning("SPM: measuring the model synonyms failed (%s)", e)
        except (KeyboardInterrupt, _Stopped):
            interrupted = True
            log.warning("SPM: training interrupted at step %d; saving the membrane trained so far", step)
        finally:
            if bar is not None:
                bar.close()
            stack.detach()
            for n, p in unet.named_parameters():
                want = grad_state.get(n, p.requires_grad)
                if p.requires_grad != want:  # touching inference tensors (Forge) would raise and hide the real error
                    p.requires_grad_(want)
        seconds = time.perf_counter() - t_start
        done = max(1, step - start)
        loop_s = time.perf_counter() - t_loop - t_aside if step > start else 0.0
        cost = {**self.meter.snapshot(), "iterations": step - start, "schedule": cfg.schedule,
                "ufe_per_iteration": self.meter.ufe / done, "setup_ufe": fill_ufe,
                "ufe_per_iteration_steady": (self.meter.ufe - fill_ufe) / done,
                "seconds_per_iteration": loop_s / done}
        if self.robust is not None:
            cost.update({"robust_ufe": self.robust.meter.ufe, "robust_seconds": round(self.robust.seconds, 3)})
        if self.synonym_scan:
            cost["synonym_ufe"] = self.synonym_ufe
        cost.update({"signal_ufe": self.signal_meter.ufe, "signal_checks": len(self.rule.checks),
                     "signal_overhead": self.signal_meter.ufe / max(1, self.meter.ufe)})
        erasure = summary(last_check, cfg, step, erased_stop and step < cfg.iterations, interrupted, self.probe, self.rule)
        if not interrupted:
            (log.info if erasure["erased"] else log.warning)("SPM: %s", erasure["message"])
        extra = {"interrupted": interrupted, "cost": cost, "erasure": erasure, "signal_history": self.rule.checks,
                 "neighbour_words": self.neighbour_words, "synonym_words": self.synonym_words,
                 "context_prompts": self.context_texts, "context_dropped": self.context_dropped,
                 # per target: drawn (at most one per iteration, TrainConfig.context_count), before the pair check
                 "contexts_drawn": cfg.context_count if self.context_texts or self.context_dropped else 0}
        if self.lr_gains is not None:  # lr_layers="gain": the range of the per-layer factors on lora_up
            extra["lr_gains"] = gains_summary(self.lr_gains)
        if self.synonym_skipped:
            extra["synonym_skipped"] = self.synonym_skipped
        if self.robust is not None:
            extra["robust_stats"] = self.robust.summary()
        membrane.eval()
        skipped: list[str] = []
        if not interrupted:  # an interrupted run is saved at once; its gates are calibrated on first use, if ever
            # spm_transport["gate"], the membrane gate's calibration: minutes on a CPU WebUI, so a phase of its own,
            # counted in prompts encoded
            self._stored_part(membrane, "gate", "the membrane gate's calibration", skipped,
                              lambda progress: training_gate(self.backend, membrane, progress=progress))
            # spm_transport["response"], the response gate's calibration on the original model (the stack is detached
            # by now; spm.response): a host on the same UNet then only draws the probes
            self._stored_part(membrane, "response", "the response gate's calibration", skipped,
                              lambda progress: training_response(
                                  self.backend, None, list(cfg.targets), steps=cfg.max_denoising_steps,
                                  guidance=cfg.xt_guidance, levels=cfg.signal_levels, progress=progress,
                                  planned=self._planned_ufe(),
                                  train_resolution=cfg.resolution))
        if cfg.robust != "off":  # the response gate's ramp a robust membrane is made for (spm.response.ROBUST_RAMP)
            resp = membrane.info.transport.get("response")
            membrane.info.transport = {**membrane.info.transport,
                                       "response": {**(resp if isinstance(resp, dict) else {}), "ramp": ROBUST_RAMP}}
        self._phase("saving", 0, 1)
        self._save(membrane, optimizer, g, step, aw, extra,
                   state=interrupted or step < cfg.iterations or self.keep_state)
        self._phase("saving", 1, 1)
        membrane.info.training = {**self.cfg.to_dict(), "steps_done": step, "anchor_weight": aw.value, **extra}
        return TrainResult(membrane, self.output, step, interrupted, seconds, history, cost, erasure, skipped)


def train_membrane(backend: Backend, config: TrainConfig, output: str | Path | None = None, **kw) -> TrainResult:
    """Shortcut for ``Trainer(backend, config, output, **kw).train()``."""
    return Trainer(backend, config, output, **kw).train()


__all__ = ["AUTOCAST", "Phase", "Progress", "TrainResult", "Trainer", "lr_factor", "make_optimizer", "train_membrane"]
