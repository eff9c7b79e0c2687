"""The GPU acceptance run (make gpu-check) on a machine without a GPU: the parts that can run on
the CPU do, at small sizes, and the GPU-only ones say they were skipped, so the script cannot rot."""

import json

import pytest
import torch

from conftest import run_module


@pytest.mark.slow  # seven training runs in their own processes: about a minute
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run make gpu-check itself")
def test_gpu_check_runs_its_cpu_parts_and_marks_the_gpu_parts_skipped(tmp_path):
    p = run_module("scaling.gpu_check", "--out", tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    ran = {c["check"].split(" (")[0]: c for c in checks if c["pass"] is not None}
    assert any(k.startswith("resume continues exactly") for k in ran)
    assert any(k.startswith("checkpoint save blocking time") for k in ran)
    assert all(c["pass"] for c in ran.values()), ran
    skipped = [c["check"] for c in checks if c["pass"] is None]
    assert len(skipped) == 5 and all(c["note"].startswith("skipped:") for c in checks if c["pass"] is None)
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(checks) + 1 and "cpu (GPU parts skipped)" in table
