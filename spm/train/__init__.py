"""SPM training: erase loss + Latent Anchoring on any :class:`spm.backend.Backend`."""

from .anchors import sample_anchors
from .config import PRESETS, TrainConfig, preset
from .loop import Progress, Trainer, TrainResult, train_membrane
from .objective import AnchorWeight, CostMeter, erase_target

__all__ = ["PRESETS", "AnchorWeight", "CostMeter", "Progress", "TrainConfig", "TrainResult", "Trainer", "erase_target",
           "preset", "sample_anchors", "train_membrane"]
