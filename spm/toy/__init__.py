"""The shipped toy models: tiny Stable-Diffusion-1.x-shaped text-to-image models, the product's embedded default.

``python -m spm demo``, ``python -m spm.ui`` and ``spm eval`` load them; the benchmarks in ``bench/`` import them
(never the other way round). Building the toy worlds from scratch, rendering their data and training their scorers
stays in ``bench/toyworld``.

* :mod:`spm.toy.worlds`    the toy worlds (``shapes``, world 1; ``icons``, world 2) and their model configs
* :mod:`spm.toy.model`     builders and the pipeline loader (diffusers folders under ``assets/<world>/``)
* :mod:`spm.toy.captions`  world 1's label space and captions (world 2's: :mod:`spm.toy.captions_icons`)
* :mod:`spm.toy.scorer`    the classifier that reads generated toy images
* :mod:`spm.toy.harness`   generation, prompt suites, scoring helpers; :mod:`spm.toy.evaluate`: ``spm eval``
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODELS", "ToyModel", "concepts", "load", "missing_model", "toy_model", "worlds"]


@dataclass(frozen=True)
class ToyModel:
    """A shipped toy model that the command line and the standalone tab accept by name (``--model toy``)."""

    name: str      # the name users type
    world: str     # the toy world it belongs to: a folder under spm/toy/assets/
    which: str     # "base" or "finetune" inside that world
    summary: str   # one line for --help


MODELS: dict[str, ToyModel] = {
    "toy": ToyModel("toy", "shapes", "base", "the shapes world's base model (32x32 pictograms, CLIP-L-style text encoder 64x2)"),
    "toy-finetune": ToyModel("toy-finetune", "shapes", "finetune",
                             "the shapes world's community fine-tune (UNet fine-tuned on another palette and textures)"),
    "toy2": ToyModel("toy2", "icons", "base", "the icons world's base model (32x32 pictograms, CLIP text encoder 48x3, "
                     "linear projections, v-prediction)"),
    "toy2-finetune": ToyModel("toy2-finetune", "icons", "finetune",
                              "the icons world's community fine-tune (UNet fine-tuned on another palette and outlines)"),
}


def toy_model(spec: str | None) -> ToyModel | None:
    """The shipped toy model called ``spec``, or None when ``spec`` is not one of their names (e.g. a path)."""
    return MODELS.get(spec) if spec else None


def missing_model(spec: str, single_file: str = ".safetensors checkpoint") -> str:
    """The message for a ``--model`` that is neither an existing path nor a shipped toy model's name."""
    return (f"--model {spec}: no such file or folder, and not a shipped toy model ({', '.join(MODELS)}); give a "
            f"diffusers folder or a {single_file}")


def concepts(world: str) -> tuple[str, ...]:
    """The object concepts a toy world's models know (what its membranes can erase), without importing torch."""
    from .worlds import WORLDS

    w = WORLDS.get(world)
    if w is None:
        raise ValueError(f"unknown toy world {world!r}; the shipped ones: {sorted({m.world for m in MODELS.values()})}")
    return tuple(w.captions_module().OBJECTS)


def load(spec: str, dtype=None):
    """A diffusers pipeline for the shipped toy model called ``spec`` (see :data:`MODELS`)."""
    m = toy_model(spec)
    if m is None:
        raise ValueError(f"{spec!r} is not a shipped toy model; choose one of {', '.join(MODELS)}")
    from .model import load_toy_pipeline

    if m.world == "shapes":
        return load_toy_pipeline(m.which) if dtype is None else load_toy_pipeline(m.which, dtype)
    return load_toy_pipeline(m.which, world=m.world) if dtype is None else load_toy_pipeline(m.which, dtype, world=m.world)
