"""Runs bench/rollout.py --cpu-smoke (tiny model, CPU) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rollout.py")


def test_rollout_bench_cpu_smoke(tmp_path):
    out = tmp_path / "rollout.json"
    proc = subprocess.run([sys.executable, BENCH, "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu"
    rows = result["rows"]
    assert {(r["path"], r["batch"]) for r in rows} == {(p, b) for p in ("generate", "fastsd") for b in (2, 4)}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows)
    assert "| batch | generate tok/s | fastsd tok/s | speed-up |" in proc.stdout
