"""bench/gpu.py, which runs only where a GPU is lent (device time is minutes): its dry run on CPU
goes through the same code at toy sizes, so a broken script is found here, not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_through_on_cpu_in_its_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["d"], r["f"]) for r in result["rows"]] == [(64, 512), (32, 1024)]
    assert all(r["step_ms"] > 0 and r["gemm_ms"] > 0 for r in result["rows"])
    assert result["largest_f"] == 4096 and result["device"] == "cpu (dry run)"
    assert "largest F that trains" in done.stdout
