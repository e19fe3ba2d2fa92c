"""SPM for the Stable Diffusion WebUI: registration glue only (the work is in ``spm/webui/``).

Importing our package: the extension root holds the package ``spm``.  If ``import spm`` already gives a
*different* package (another extension or a pip package of that name), ours is loaded under the unique
name ``sd_webui_spm_ext`` instead; every module of the package imports its siblings relatively, so it
works under either name.  Otherwise the extension root is put first on ``sys.path`` (A1111 keeps it there
only while loading scripts; the package stays in ``sys.modules``).
"""

import importlib
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = os.path.join(_ROOT, "spm")
_ALIAS = "sd_webui_spm_ext"


def _core_name() -> str:
    loaded = sys.modules.get("spm")
    if loaded is None:
        spec = importlib.util.find_spec("spm") if _ROOT in sys.path else None
        if spec is None or not spec.origin or os.path.dirname(os.path.abspath(spec.origin)) == _OURS:
            if _ROOT not in sys.path:
                sys.path.insert(0, _ROOT)
            importlib.import_module("spm")
            if os.path.dirname(os.path.abspath(sys.modules["spm"].__file__)) == _OURS:
                return "spm"
    elif os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or "")) == _OURS:
        return "spm"
    if _ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(_ALIAS, os.path.join(_OURS, "__init__.py"),
                                                      submodule_search_locations=[_OURS])
        module = importlib.util.module_from_spec(spec)
        sys.modules[_ALIAS] = module
        spec.loader.exec_module(module)
    return _ALIAS


_CORE = _core_name()
SpmScript = importlib.import_module(_CORE + ".webui.script").SpmScript
importlib.import_module(_CORE + ".webui.integration").register()
