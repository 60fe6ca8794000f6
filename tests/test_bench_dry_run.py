"""The GPU script's CPU dry run (bench/gpu_run.py --dry-run): every step runs here in seconds, so
that the script a lent GPU machine runs is known to work before one is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_runs_every_step(tmp_path):
    r = subprocess.run(
        [sys.executable, "bench/gpu_run.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu_figures.json").read_text())
    assert figures["dry_run"] is True
    steps = figures["steps"]
    assert set(steps) == {"setup", "gpu_tests", "pipeline", "clip"}
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["setup"]["missing"] == {}
    # the recording was decoded, posed and screened: a positive real-time factor
    assert steps["pipeline"]["real_time_factor"] > 0
    assert "real-time factor" in (tmp_path / "pipeline.log").read_text()
    assert "clips/s" in (tmp_path / "clip.log").read_text()
    # without CUDA, the GPU tests are skipped with their reason, not failed or absent
    log = (tmp_path / "gpu_tests.log").read_text()
    assert "skipped" in log and "failed" not in log
