"""WebUI hosts (AUTOMATIC1111 1.10, Forge): the only code besides ``scripts/`` that imports the WebUI's ``modules``.

* :mod:`spm.webui.runtime` — attaching to the loaded model: which UNet, recording conditioning rows, per-row
  weights from each prompt's own tags, detaching.  Imports ``modules`` only inside functions.
* :mod:`spm.webui.plan` — per-generation planning from the panel and the prompts' tags (no WebUI imports).
* :mod:`spm.webui.panel` — the panel's values (weights field, transport choices, X/Y/Z attributes), shared by
  the script and the Gradio panel :mod:`spm.webui.ui` (no WebUI or Gradio imports).
* :mod:`spm.webui.script` — the AlwaysOn script; :mod:`spm.webui.networks` — the ``spm`` extra network and
  its cards page; :mod:`spm.webui.integration` — X/Y/Z axes, settings, callbacks.  These subclass WebUI
  classes, so they import ``modules`` at import time and are imported only by the extension's ``scripts/``.
* :mod:`spm.webui.state` — the process-wide library, planner and runtime.
* ``train_*`` — the in-WebUI trainer (its own hosts and API), documented there.
"""
