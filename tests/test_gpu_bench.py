"""``bench.gpu`` at tiny sizes on the CPU (``--device cpu --smoke``): every code path of the GPU run, the
JSON schema, plausible numbers, and the ``--max-seconds`` budget."""

from __future__ import annotations

import json
import math

import pytest

from bench import gpu

pytestmark = pytest.mark.usefixtures("one_thread")


def finite_pos(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_smoke_run_writes_the_schema(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    # no time budget: on a busy machine the default one (450 s) would skip parts, and this test checks the schema
    assert gpu.main(["--device", "cpu", "--smoke", "--json", "--max-seconds", "1e9", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == r  # --json prints the same object
    assert r["device"].startswith("CPU") and r["smoke"] and r["skipped"] == []
    for arch in ("sd15", "sdxl"):
        s = r[arch]
        for k in (1, 5, 10):
            assert finite_pos(s[f"ratio_{k}"]) and s[f"ratio_{k}"] < 100
        assert s["batch_2+2"]["latent"][0] == 4 and s["batch_8+8"]["latent"][0] == 16
        assert s["batch_2+2"]["min_strength"] > 0  # transport on, every row acting
        assert finite_pos(s["ratio_lowrank_5"]) and s["batch_2+2_lowrank"]["row_scaling"] == "lowrank"
        assert s["batch_2+2"]["row_scaling"] == "cached"  # the CPU default
        mem = s["memory"]
        assert 0 < s["membrane_share_of_unet"] < 1 and mem["unet_weights_bytes"] > mem["stack_bytes_cached"] > 0
        assert s["memory_8+8"]["stack_bytes_cached"] > mem["stack_bytes_cached"]  # per-row ups grow with the batch
        rows = {(t["precision"], t["schedule"]): t for t in s["train"]}
        assert set(rows) == {(p, sc) for p in ("fp16", "bf16") for sc in ("pool", "reference")}
        for t in rows.values():
            assert finite_pos(t["iterations_per_s"]) and t["loss_finite"] and t["iterations"] == 2
        assert rows[("fp16", "reference")]["ufe_per_iteration_steady"] > rows[("fp16", "pool")]["ufe_per_iteration_steady"]
    assert "sdxl" in r["sdxl"]["model"] and r["sdxl"]["targets"] > 0


def test_max_seconds_skips_and_says_so(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--smoke", "--max-seconds", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "sd15: build" in r["skipped"] and "sdxl: build" in r["skipped"] and "sd15" not in r
