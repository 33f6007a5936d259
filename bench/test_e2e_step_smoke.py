"""bench/e2e_step.py on the CPU: the paths compute the same loss, and the script runs end to end
(one process, and FSDP2 under torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_step  # noqa: E402

from fastsd.model.policy import Policy  # noqa: E402

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e_step.py")


def test_fastsd_and_plain_paths_compute_the_same_loss():
    args = argparse.Namespace(cpu_smoke=True, student_prompt=8, teacher_prompt=12, response=16)
    lm = e2e_step.build(args)
    teacher = Policy(e2e_step.build(args).eval())
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = e2e_step.make_batch(lm, 3, args, torch.device("cpu"))
    losses = {path: e2e_step.loss_fn(path, Policy(lm), teacher, batch, args).item() for path in ("fastsd", "plain")}
    assert losses["fastsd"] > 1e-4
    assert abs(losses["fastsd"] - losses["plain"]) <= 1e-5 * losses["plain"], losses


def test_e2e_step_cpu_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, BENCH, "--cpu-smoke", "--ckpt", "both", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["path"], r["ckpt"], r["batch"]) for r in rows} == {
        (p, c, b) for p in ("fastsd", "plain") for c in (False, True) for b in (1, 2)}
    assert all(r["status"] == "ok" and r["resp_tok_per_s"] > 0 for r in rows)
    assert "Where an update goes (fastsd" in proc.stdout


def test_e2e_step_under_torchrun_fsdp(tmp_path):
    out = tmp_path / "e2e.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           BENCH, "--cpu-smoke", "--fsdp", "--paths", "fastsd", "--ckpt", "off", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "ok" and r["fsdp"] for r in rows)


def test_a_failing_case_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    real = e2e_step.loss_fn

    def loss_fn(path, *args):
        if path == "plain":
            raise RuntimeError("boom")
        return real(path, *args)

    monkeypatch.setattr(e2e_step, "loss_fn", loss_fn)
    out = tmp_path / "e2e.json"
    assert e2e_step.main(["--cpu-smoke", "--ckpt", "off", "--out", str(out)]) == 0
    rows = {(r["path"], r["batch"]): r["status"] for r in json.loads(out.read_text())["rows"]}
    assert rows == {("fastsd", 1): "ok", ("fastsd", 2): "ok",
                    ("plain", 1): "error: RuntimeError: boom", ("plain", 2): "error: RuntimeError: boom"}
    assert "| plain | off | 1 | error: RuntimeError: boom |" in capsys.readouterr().out
