r"""The real path end to end on the stand-in (tests/standin.py): a tiny random Qwen3 chat model with a
BPE tokenizer, LaTeX-answer data under OpenMathReasoning's column names, prompts through the chat
template (thinking off for the student, on for the teacher), format=free, grader=math, and the
critic over HTTP (tools/critic_server.py --mode math). All three conditions, one and two
processes, resume. Nothing is downloaded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastsd.config import load_config
from fastsd.model.dist import Dist
from fastsd.run.checkpoint import latest_checkpoint
from fastsd.train import train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from critic_server import CriticServer  # noqa: E402

OMR = {"question": "problem", "answer": "expected_answer", "reference_solution": "generated_solution"}


@pytest.fixture(scope="module")
def omr_data(tmp_path_factory):
    from standin import write_math_data

    return write_math_data(tmp_path_factory.mktemp("omr"), OMR)


@pytest.fixture(scope="module")
def critic_url():
    srv = CriticServer(mode="math").start()
    yield srv.url
    srv.close()


def overrides(standin, data, run_dir, url, *extra) -> list[str]:
    train_file, test_file = data
    return [f"model={standin}", f"data={train_file}", f"data.eval_path={test_file}", f"run_dir={run_dir}",
            *(f"data.fields.{k}={v}" for k, v in OMR.items()), "format=free", "grader=math",
            "templates.student_chat_kwargs={enable_thinking: false}",
            "templates.teacher_chat_kwargs={enable_thinking: true}",
            r"templates.student={question} Put the final answer in \boxed{}.",
            "critic=http", f"critic.base_url={url}", "critic.retries=0",
            "steps=2", "questions_per_step=2", "eval.k=2", "rollout.max_new_tokens=12", "optim.micro_batch=2",
            "optim.lr=1e-3", "optim.warmup_steps=0", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_rows(run_dir) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "reward" in r]


def check_prompts(rolls: list[dict], condition: str) -> None:
    """rollouts.jsonl says what each side read: the chat template with each side's kwargs."""
    for r in rolls:
        assert r["prompt"].startswith("<|im_start|>user\n" + r["question"] + r" Put the final answer in \boxed{}.")
        assert r["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
        if condition == "grpo" or r["teacher_prompt"] is None:
            assert condition != "reference"
            continue
        assert r["teacher_prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")  # thinking on: no empty block
        assert r["context"] in r["teacher_prompt"]


@pytest.mark.parametrize("condition", ["critique", "reference", "grpo"])
def test_each_condition_on_the_standin(standin, omr_data, critic_url, tmp_path, condition):
    extra = ["rollout.group_size=2"] if condition == "grpo" else []
    cfg = load_config(overrides=overrides(standin, omr_data, tmp_path, critic_url, f"condition={condition}", *extra))
    result = train(cfg, Dist())
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert result["final"]["k"] == 2 and result["final"]["questions"] == 12
    rolls = read_jsonl(tmp_path / "rollouts.jsonl")
    assert len(rolls) == 2 * 2 * cfg.group_size
    check_prompts(rolls, condition)
    if condition == "critique":
        assert all(r["critique_failed"] == 0 for r in rows), rows  # the math scribe's critiques validate
        assert all(r["context"] and "\\boxed{" in r["context"] for r in rolls)
    if condition == "reference":
        refs = {json.loads(line)["generated_solution"] for line in omr_data[0].read_text().splitlines()}
        assert all(r["context"] in refs for r in rolls)
    if condition != "grpo":
        assert all(r["usable"] > 0 and math.isfinite(r["loss"]) for r in rows)
        trained = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path) / "hf", local_files_only=True)
        initial = AutoModelForCausalLM.from_pretrained(standin, local_files_only=True)
        assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), initial.state_dict().values()))


def test_resume_on_the_standin(standin, omr_data, critic_url, tmp_path):
    """Two steps, then a third resumed from the checkpoint: the same third step as a straight run."""
    run = lambda d, n: train(load_config(overrides=overrides(standin, omr_data, d, critic_url, f"steps={n}")), Dist())  # noqa: E731
    run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    run(tmp_path / "b", 3)
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "gap", "grad_norm", "reward"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
    third = lambda d: [(r["prompt"], r["response"], r["teacher_prompt"])  # noqa: E731
                       for r in read_jsonl(d / "rollouts.jsonl") if r["step"] == 3]
    assert third(tmp_path / "b") == third(tmp_path / "a")


def test_lora_on_the_standin(standin, omr_data, critic_url, tmp_path):
    """The paper's setting: LoRA on the chat stand-in, the adapter-disabled base as the teacher."""
    cfg = load_config(overrides=overrides(standin, omr_data, tmp_path, critic_url, "model.lora.r=8",
                                          "model.lora.alpha=16"))
    train(cfg, Dist())
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(r["critique_failed"] == 0 and r["usable"] > 0 for r in rows)
    check_prompts(read_jsonl(tmp_path / "rollouts.jsonl"), "critique")
    ckpt = latest_checkpoint(tmp_path)
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["r"] == 8
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "hf", local_files_only=True).state_dict()
    base = AutoModelForCausalLM.from_pretrained(standin, local_files_only=True).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.rsplit(".", 2)[-2].endswith("_proj") for k in changed), sorted(changed)[:5]


@pytest.mark.slow
def test_torchrun_two_processes_on_the_standin(standin, omr_data, critic_url, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastsd.cli", *overrides(standin, omr_data, tmp_path, critic_url)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(r["critique_failed"] == 0 and r["usable"] > 0 for r in rows)
    rolls = read_jsonl(tmp_path / "rollouts.jsonl")
    assert [r["step"] for r in rolls] == [1, 1, 2, 2]  # both ranks' rollouts
    check_prompts(rolls, "critique")
    assert {"rng_rank0.pt", "rng_rank1.pt", "COMPLETE"} <= {p.name for p in latest_checkpoint(tmp_path).iterdir()}
