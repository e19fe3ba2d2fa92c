"""The toy world's asset check (``python -m bench.toyworld --json``) and its grid of base generations."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from spm.toy.harness import (
    DEFAULT_CFG,
    DEFAULT_STEPS,
    colour_rate,
    exact_accuracy,
    fidelity_suite,
    found_rate,
    generate,
    image_grid,
    labels_of,
    score_images,
)
from spm.toy.model import asset_dir, load_components, load_scheduler, load_toy_pipeline, make_pipeline
from spm.toy.scorer import load_scorer

from .scorer import evaluate_scorer


def make_grid(out: Path | None = None, which: str = "base", seed: int = 5, world: str = "shapes") -> Path:
    """Objects (rows) x colours (columns), backgrounds cycling; DDIM 25 steps, CFG 7.5 (world 1: 8 x 6)."""
    torch.set_num_threads(2)
    data = labels_of(world)
    out = Path(out) if out else asset_dir("base", world).parent / f"{which}_grid.png"
    pipe = load_toy_pipeline(which, world=world)
    prompts, seeds = [], []
    nb = len(data.BACKGROUNDS)
    for i, o in enumerate(data.OBJECTS):
        for j, c in enumerate(data.COLOURS):
            prompts.append(data.grid_prompt(o, c, data.BACKGROUNDS[j % nb]))
            seeds.append(seed * 1000 + i * 10 + j)
    imgs = generate(pipe, prompts, seeds)
    image_grid(imgs, len(data.COLOURS), scale=3).save(out)
    return out


def check_assets(n_per_object: int = 12, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
                 n_heldout: int = 1000, scorer_wait_s: float = 0.0, world: str = "shapes") -> dict:
    """Evaluate the shipped assets: scorer accuracy, base and fine-tune prompt fidelity. Returns a JSON-able dict.

    Generation runs first; ``scorer_wait_s`` > 0 lets the scorer file appear meanwhile (the wait is not counted
    in ``seconds`` and is reported as ``waited_for_scorer_seconds``).
    """
    torch.set_num_threads(2)
    t0 = time.time()
    data = labels_of(world)
    res: dict = {"world": world, "settings": {"sampler": "DDIM", "steps": steps, "cfg": cfg, "n_per_object": n_per_object,
                              "n_heldout_renders": n_heldout, "threshold": 0.5}}
    cases = fidelity_suite(n_per_object, world=world)
    prompts, seeds = [c.prompt for c in cases], [c.seed for c in cases]
    base = load_components("base", world=world)
    images = {}
    for which in ("base", "finetune"):
        comps = base if which == "base" else load_components("finetune", world=world)
        pipe = make_pipeline(comps["text_encoder"], comps["vae"], comps["unet"], load_scheduler(world))
        t1 = time.time()
        images[which] = generate(pipe, prompts, seeds, steps=steps, cfg=cfg)
        res[f"{which}_generation_seconds"] = time.time() - t1
    waited = 0.0
    path = asset_dir("scorer", world) / "scorer.safetensors"
    while not path.is_file() and waited < scorer_wait_s:
        time.sleep(5)
        waited += 5
    time.sleep(2 if waited else 0)
    waited += 2 if waited else 0
    scorer = load_scorer(world=world)
    acc = evaluate_scorer(scorer, base["vae"], seed=424242, n=n_heldout, world=world)
    res.update({
        "scorer_object_accuracy": acc["renders"]["objects"],
        "scorer_object_accuracy_vae": acc["renders_vae"]["objects"],
        "scorer_object_accuracy_shifted": acc["shifted_renders"]["objects"],
        "scorer_object_accuracy_shifted_vae": acc["shifted_renders_vae"]["objects"],
        "scorer_heldout": {k: v for k, v in acc.items() if k != "seconds"},
    })
    for which in ("base", "finetune"):
        sc = score_images(scorer, images[which])
        res[f"{which}_prompt_fidelity"] = found_rate(sc, cases, world=world)
        res[f"{which}_exact_object_accuracy"] = exact_accuracy(sc, cases, world=world)
        res[f"{which}_colour_fidelity"] = colour_rate(sc, cases, world=world)
        res[f"{which}_per_object_fidelity"] = {
            o: found_rate({k: v[[i for i, c in enumerate(cases) if c.objects == [o]]] for k, v in sc.items()},
                          [c for c in cases if c.objects == [o]], world=world) for o in data.OBJECTS}
    res["n_generations"] = 2 * len(cases)
    res["torch_threads"] = torch.get_num_threads()
    if waited:
        res["waited_for_scorer_seconds"] = waited
    res["seconds"] = time.time() - t0 - waited
    return res
