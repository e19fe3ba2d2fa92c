"""The standalone SPM Trainer UI: the Gradio tab (:mod:`spm.ui.trainer_tab`) and ``python -m spm.ui``.

The training job service the tab drives (requests, the queue, progress, the before/after check) is
:mod:`spm.train.jobs`, shared with the WebUI.  Host-agnostic: the WebUI registers the tab with its own
backend provider (``scripts/spm_trainer.py``); ``python -m spm.ui`` serves it standalone on a diffusers
pipeline (the toy model by default).
"""
