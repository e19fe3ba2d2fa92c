"""The SPM Trainer UI: training jobs (:mod:`spm.ui.jobs`) and the Gradio tab (:mod:`spm.ui.trainer_tab`).

Host-agnostic: the WebUI registers the tab with its own backend provider (``scripts/spm_trainer.py``);
``python -m spm.ui`` serves it standalone on a diffusers pipeline (the toy model by default).
"""
