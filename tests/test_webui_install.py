"""install.py installs only what is missing; preload.py adds --spm-dir and creates the folder."""

import argparse
import runpy
import sys
import types
from pathlib import Path

import pytest

from tests import webui_stub as stub

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def launch(monkeypatch):
    mod = types.ModuleType("launch")
    mod.calls = []
    mod.missing = set()
    mod.is_installed = lambda name: name not in mod.missing
    mod.run_pip = lambda command, desc=None: mod.calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", mod)
    return mod


def test_install_installs_nothing_when_present(launch):
    runpy.run_path(str(ROOT / "install.py"))
    assert launch.calls == []


def test_install_installs_only_the_missing(launch):
    launch.missing = {"safetensors"}
    runpy.run_path(str(ROOT / "install.py"))
    assert launch.calls == ["install safetensors>=0.4"]
    text = (ROOT / "install.py").read_text()
    for pinned in ("diffusers", "transformers", "gradio", "torch", "open_clip"):
        assert f'"{pinned}' not in text  # never (re)installs a package the WebUI pins


def test_preload_adds_spm_dir_and_creates_it(tmp_path):
    stub.install(tmp_path)
    try:
        ns = runpy.run_path(str(ROOT / "preload.py"))
        parser = argparse.ArgumentParser()
        ns["preload"](parser)
        args = parser.parse_args([])
        assert args.spm_dir == str(tmp_path / "models" / "spm")
        assert (tmp_path / "models" / "spm").is_dir()
        assert parser.parse_args(["--spm-dir", "/x"]).spm_dir == "/x"
    finally:
        stub.uninstall()
