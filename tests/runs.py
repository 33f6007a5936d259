"""Tiny training runs for the tests: a few steps of 2 questions with short responses."""

from __future__ import annotations

import json
from pathlib import Path

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
