"""``python -m spm demo`` end to end on the shipped toy model, with a tiny iteration count and one seed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from spm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TILE = 32 * 3  # a 32 px toy image, drawn 3x in the grid


def test_demo_trains_writes_grid_and_reports(tmp_path, capsys):
    from PIL import Image

    from spm.checkpoint import load_membrane

    out = tmp_path / "demo"
    rc = main(["demo", "--iterations", "3", "--seeds", "1", "--out", str(out), "--threads", "1"])
    assert rc == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    # every phase says what it does, then how long it took: loading, training, before k/N, after k/N, grid, scoring
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("[demo]")]
    starts = [k for k, ln in enumerate(lines) if ln.endswith("…")]
    for phase in ("loading the toy model", "training a membrane that erases 'circle'", "generating before",
                  "generating after", "writing the before/after grid", "scoring"):
        i = next(k for k in starts if phase in lines[k])
        end = next((k for k in starts if k > i), len(lines) - 1)  # the last line is the total
        assert re.search(r"\(\d+\.\d s\)$", lines[end - 1]), (phase, lines[i:end])  # the phase's time
    from spm.toy.harness import DEFAULT_STEPS

    for label in ("before", "after"):  # the sampling steps of each phase, k/N with the bar's ETA
        assert re.search(rf"\[demo\] {label}: 100%.*\| {DEFAULT_STEPS}/{DEFAULT_STEPS} \[", cap.err), cap.err[-2000:]
    assert "loading the toy model" in lines[0]  # said before anything slow
    assert "finished in" in lines[-1]

    assert Path(r["membrane"]) == out / "circle.safetensors"
    m = load_membrane(r["membrane"])
    assert m.concepts == ["circle"] and m.info.training["iterations"] == 3
    assert any(float(layer.lora_up.weight.detach().abs().max()) > 0 for layer in m.layers.values())  # trained, not the identity

    # layout: rows are the 8 prompts (4 with the target, 4 controls); columns: seeds without | with the membrane
    assert Path(r["grid"]) == out / "circle_before_after.png" and "4 with the target" in r["grid_layout"]
    grid = np.asarray(Image.open(r["grid"]).convert("RGB"), np.float32)
    assert grid.shape == (8 * TILE, 2 * 1 * TILE, 3)
    rows = grid.reshape(8, TILE, 2 * TILE, 3)
    assert all(row.std() > 1.0 for row in rows)  # every cell row holds a picture, not a blank tile

    for key in ("target_found_before", "target_found_after", "control_found_before", "control_found_after"):
        assert 0.0 <= r[key] <= 1.0, key
    if r["target_found_before"] > 0:
        assert r["erasure"] == pytest.approx(1 - r["target_found_after"] / r["target_found_before"]) and r["erasure"] <= 1
    else:
        assert math.isnan(r["erasure"])
    assert 0.0 < r["control_psnr_db_median"] <= 100.0
    assert r["seconds"] > 0
