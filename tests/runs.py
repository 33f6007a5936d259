"""Tiny training runs for the tests: a few steps of 2 questions with short responses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastsd.config import load_config

# 2 questions per step, short responses, 2 eval samples of 2 questions.
SMALL = ["steps=2", "questions_per_step=2", "eval.k=2", "data.eval_size=2", "data.train_size=16",
         "rollout.max_new_tokens=40", "optim.micro_batch=2"]


def config(run_dir, *overrides):
    return load_config(overrides=[*SMALL, f"run_dir={run_dir}", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_rows(run_dir) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "reward" in r]


def fsdp_worker(folder: Path, nproc: int, cases: dict[str, list[str]]) -> dict[str, dict]:
    """Run tests/fsdp_train_worker.py on every case in one start (one process, or `nproc` under
    torchrun, one thread each) and load what rank 0 saved, by case name."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests'}"}
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    args, outs = [], {name: folder / f"{name}-{nproc}.pt" for name in cases}
    for name, overrides in cases.items():
        args += ["--"] * bool(args) + [str(outs[name]), *overrides]
    proc = subprocess.run([*launch, str(repo / "tests" / "fsdp_train_worker.py"), *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300 * len(cases))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: torch.load(out, weights_only=False) for name, out in outs.items()}
