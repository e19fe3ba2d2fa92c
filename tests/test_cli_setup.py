"""``tools/setup.sh``: uses a venv, says how to get one where ``venv`` is missing, never imports torch to check it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "tools" / "setup.sh"


def test_missing_venv_module_is_one_clear_message_and_changes_nothing(tmp_path):
    venv = tmp_path / "venv"
    env = dict(os.environ, SPM_VENV=str(venv), SPM_BASE_PYTHON="false")
    env.pop("PYTHON", None)
    r = subprocess.run(["bash", str(SETUP)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "apt-get install python3-venv" in r.stderr and "PYTHON=" in r.stderr
    assert not venv.exists()


def test_setup_reads_versions_without_importing_torch_and_installs_numpy_with_torch():
    text = SETUP.read_text()
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not any(re.search(r"\bimport torch\b", ln) for ln in code)  # "Failed to initialize NumPy" came from this
    torch_install = next(ln for ln in code if "pipi" in ln and "SPM_TORCH_SPEC" in ln)
    assert "numpy" in torch_install


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash tools/setup.sh --dev && .venv/bin/python -m pytest -q" in readme
    assert "bash tools/setup.sh && .venv/bin/python -m spm demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tools/setup.sh --dev" in ci and 'PY=${PYTHON:-.venv/bin/python}' in ci and '"$PY" -m pytest -q' in ci
