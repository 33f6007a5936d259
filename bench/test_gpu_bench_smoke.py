"""Runs bench/gpu_bench.py --cpu-smoke (tiny float32 shapes, torch backend, CPU timers) end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_bench.py")
FASTSD_CASES = ["fastsd_fkl", "fastsd_rkl", "fastsd_jsd", "fastsd_logprob"]


def test_gpu_bench_cpu_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, BENCH, "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"date", "gpu", "torch", "triton", "liger_kernel"} <= set(result["meta"])
    rows = result["rows"]
    for masked in (0.0, 0.25):
        group = {r["case"]: r for r in rows if r["masked"] == masked}
        for case in FASTSD_CASES + ["floor", "eager_fkl"]:
            r = group[case]
            assert r["status"] == "ok", r
            assert math.isfinite(r["ms"]) and r["ms"] > 0, r
            assert r["extra_gib"] == "n/a"
        for case in FASTSD_CASES:
            r = group[case]
            assert r["dx_err"] < 1e-4 and r["dw_err"] < 1e-4, r
            assert math.isfinite(r["loss"]) and r["loss"] > 0, r
        assert group["floor"]["x_floor"] == 1.0
        # Every divergence gives the same loss through fastsd and the eager baseline.
        assert math.isclose(group["fastsd_fkl"]["loss"], group["eager_fkl"]["loss"], rel_tol=1e-4)
        # liger rows exist: measured, or recorded as skipped/missing, never silently dropped.
        for case in ("liger_fused_fkl", "liger_chunked_fkl"):
            assert group[case]["status"] == "ok" or group[case]["status"].split(":")[0] in ("skipped", "missing")
    assert "floor" in proc.stdout and "fastsd_fkl" in proc.stdout  # the tables were printed
