"""SPM Trainer for the Stable Diffusion WebUI: registration only (the work is in ``spm/train/jobs.py``, ``spm/ui/`` and ``spm/webui/``).

Adds the "SPM Trainer" tab (``on_ui_tabs``) and the ``/spm/v1/train`` and ``/spm/v1/membranes`` routes
(``on_app_started``).  The package is imported the same way ``scripts/spm_membranes.py`` does it: as ``spm``
when that name is ours, else under the unique name ``sd_webui_spm_ext``.
"""

import importlib
import importlib.util
import os
import sys

from modules import script_callbacks

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = os.path.join(_ROOT, "spm")
_ALIAS = "sd_webui_spm_ext"


def _ours(module) -> bool:
    return os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or "")) == _OURS


def _core_name() -> str:
    for name in (_ALIAS, "spm"):
        if name in sys.modules and _ours(sys.modules[name]):
            return name
    if "spm" not in sys.modules:
        if _ROOT not in sys.path:
            sys.path.insert(0, _ROOT)
        spec = importlib.util.find_spec("spm")
        if spec is not None and spec.origin and os.path.dirname(os.path.abspath(spec.origin)) == _OURS:
            importlib.import_module("spm")
            return "spm"
    spec = importlib.util.spec_from_file_location(_ALIAS, os.path.join(_OURS, "__init__.py"),
                                                  submodule_search_locations=[_OURS])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_ALIAS] = module
    spec.loader.exec_module(module)
    return _ALIAS


_train_api = importlib.import_module(_core_name() + ".webui.train_api")
script_callbacks.on_ui_tabs(_train_api.on_ui_tabs)
script_callbacks.on_app_started(_train_api.on_app_started)
script_callbacks.on_script_unloaded(_train_api.reset_service)
