"""benchmarks/gpu_checks.py runs its checks on this CPU at small shapes (``--smoke``), so a
lent GPU's few minutes are not lost to a check that no longer runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.repo_scripts import load_script


@pytest.fixture(scope="module")
def checks():
    return load_script("benchmarks/gpu_checks.py")


def test_smoke_run_of_the_gpu_checks_on_a_cpu(checks, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="VAE decode in 128 px tiles"):
        rc = checks.run(tmp_path, ["training", "offload", "memory", "encoders"],
                        torch.device("cpu"), True)  # fmt: skip
    assert rc == 0
    r = json.loads((tmp_path / "gpu-checks.json").read_text())
    assert r["offload"]["model"]["max_uint8_diff_vs_none"] == 0  # offload moves weights only
    assert r["offload"]["block"]["max_uint8_diff_vs_none"] == 0
    first, last = r["training"]["losses_first_last"]
    assert last < first and r["training"]["grad_rel_diff"] < 1e-3
    memory = r["memory"]
    assert memory["untiled"]["tile"] is None  # this CPU's free memory holds the small decode
    assert memory["tiled"]["tile"] == 128  # the budget is below the pipeline's untiled estimate
    assert memory["tiled"]["budget"] < memory["untiled_estimate"]
    assert math.isfinite(memory["tiled_psnr_db"]) and memory["tiled_psnr_db"] > 20
    assert "### Automatic decode tiling (small-Wan VAE" in (tmp_path / "gpu-checks.md").read_text()
    assert r["encoders"]["tokens_equal_resident"] and r["encoders"]["weights_home"] == "cpu"


def test_smoke_run_of_the_builtin_check_on_a_cpu(checks, tmp_path: Path, monkeypatch) -> None:
    """record() then the built-in model's check, as the device run does (fp32 only here)."""
    monkeypatch.setattr(checks, "RECORD", tmp_path / "builtin.pt")
    checks.record()
    assert checks.run(tmp_path, ["builtin"], torch.device("cpu"), True) == 0
    (row,) = json.loads((tmp_path / "gpu-checks.json").read_text())["builtin"]["fp32"]
    assert row["psnr_vs_cpu_fp32_db"] > 60  # the same CPU and dtype: the recorded clip
    assert row["judge_gpu"] == row["judge_cpu"]
