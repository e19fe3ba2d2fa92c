"""``python -m spm --help`` is fast: it imports no torch/diffusers/transformers, shows the real defaults and the toy models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "safetensors", "gradio")

_WRAPPER = """
import json, runpy, sys
sys.argv = ["spm"] + json.loads(sys.argv[1])
module = sys.argv.pop(1)
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)


def _help(*argv: str) -> tuple[str, dict]:
    r = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(list(argv))], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    return r.stdout, json.loads(r.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [("spm", "--help"), ("spm", "train", "--help"), ("spm", "generate", "--help"),
                                  ("spm", "bake", "--help"), ("spm", "eval", "--help"), ("spm.ui", "--help")])
def test_help_imports_nothing_heavy(argv):
    out, res = _help(*argv)
    assert res["code"] == 0 and res["heavy"] == [], res
    assert "usage:" in out and "(default: None)" not in out


def test_help_shows_the_real_defaults_and_the_toy_models():
    from spm import toy
    from spm.train.config import PRESETS, TrainConfig

    out, _ = _help("spm", "train", "--help")
    flat = " ".join(out.split())
    cfg = TrainConfig()
    assert f"training steps (default: {cfg.iterations}; preset style {PRESETS['style']['iterations']}" in flat
    assert f"learning rate (default: {cfg.lr:g})" in flat
    assert f"(default: {cfg.anchors}; preset style {PRESETS['style']['anchors']})" in flat
    for name, m in toy.MODELS.items():
        assert name in flat and m.summary in flat
        assert ", ".join(toy.concepts(m.world)) in flat
    top, _ = _help("spm", "--help")
    assert "toy-finetune" in top and "bake" in top


def test_help_metric_default_is_the_librarys():
    from spm import cli
    from spm.transport import DEFAULT_METRIC

    assert cli.DEFAULT_METRIC == DEFAULT_METRIC
    out, _ = _help("spm", "generate", "--help")
    assert f"(default: {DEFAULT_METRIC})" in " ".join(out.split())


def test_bake_help_says_it_loses_facilitated_transport():
    out, _ = _help("spm", "bake", "--help")
    assert "LOSES FACILITATED TRANSPORT" in " ".join(out.split())
