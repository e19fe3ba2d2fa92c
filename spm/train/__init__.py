"""SPM training: erase loss + Latent Anchoring on any :class:`spm.backend.Backend`.

The names load lazily (PEP 562), so ``spm.train.config`` (settings, presets) imports without torch: the
command line's ``--help`` reads the real defaults from it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "sample_anchors": "anchors",
    "PRESETS": "config", "TrainConfig": "config", "preset": "config",
    "Progress": "loop", "Trainer": "loop", "TrainResult": "loop", "train_membrane": "loop",
    "AnchorWeight": "objective", "CostMeter": "objective", "erase_target": "objective",
}

__all__ = ["PRESETS", "AnchorWeight", "CostMeter", "Progress", "TrainConfig", "TrainResult", "Trainer", "erase_target",
           "preset", "sample_anchors", "train_membrane"]


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
