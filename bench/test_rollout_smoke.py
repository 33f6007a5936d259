"""Runs bench/rollout.py --cpu-smoke (tiny model, CPU) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastsd.rollout.vllm_engine import unusable

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rollout.py")


@pytest.mark.vllm  # its vllm rows run where vLLM is installed, and say why not elsewhere
def test_rollout_bench_cpu_smoke(tmp_path):
    out = tmp_path / "rollout.json"
    paths = ("generate", "fastsd", "fastsd-forward", "vllm")  # the compiled step: tests/rollout/test_engine.py
    proc = subprocess.run([sys.executable, BENCH, "--cpu-smoke", "--paths", *paths, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu"
    rows = result["rows"]
    assert {(r["path"], r["batch"]) for r in rows} == {(p, b) for p in paths for b in (2, 4)}
    usable = unusable() is None  # without vLLM its rows say why, and the others still run
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows if usable or r["path"] != "vllm")
    assert usable or all(unusable() in r["status"] for r in rows if r["path"] == "vllm")
    assert "| batch | generate tok/s | fastsd tok/s | fastsd-forward tok/s | vllm tok/s | vs generate |" in proc.stdout
    compiled = {r["path"]: r["compiled"] for r in rows if r["path"].startswith("fastsd")}
    assert compiled == {"fastsd": False, "fastsd-forward": False}  # eager on CPUs as the trainer runs it
    written = {r["path"]: r["written_step"] for r in rows if r["path"].startswith("fastsd")}
    assert written == {"fastsd": True, "fastsd-forward": False}  # a Llama-layout model: the written step
