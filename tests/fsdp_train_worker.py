"""One or two processes run the same fixed update steps; rank 0 writes what the test compares.

    python tests/fsdp_train_worker.py OUT.pt [rollouts=N] [key=value ...]       # one process
    torchrun --nproc_per_node 2 tests/fsdp_train_worker.py OUT.pt [...]         # FSDP2, gloo
    python tests/fsdp_train_worker.py OUT0.pt [...] -- OUT1.pt [...] -- ...     # several cases, one start

The rollouts are fixed (canonical solutions, every other one with a wrong first result, two per
grpo group), so both runs see the same tokens: rank r trains on rollouts r, r + world, ...
OUT.pt holds each step's update statistics and the full parameters before and after.
"""

import sys

import torch

from fastsd.config import load_config
from fastsd.feedback import feedback
from fastsd.feedback.critic import ArithCritic
from fastsd.feedback.prompts import encode, student_prompt
from fastsd.model import dist
from fastsd.rollout import Rollout
from fastsd.run.build import build_models, build_optim
from fastsd.tasks import arith
from fastsd.tasks.data import builtin_split
from fastsd.tasks.format import parse_response, reward
from fastsd.update import update


def fixed_rollouts(cfg, tok, n=8):
    """n rollouts of (n + 1) // 2 questions: per question a correct one, then (for as many as n
    allows) one with a wrong first result and final answer; one grpo group per question."""
    out, questions = [], builtin_split("train", (n + 1) // 2, 0)
    for i in range(n):
        g = i % len(questions)
        ex = questions[g]
        solution = arith.canonical_solution(ex.question)
        wrong = solution.replace("=", "=1", 1).replace(f"<answer>{ex.answer}<", f"<answer>{ex.answer}1<")
        text = solution if i < len(questions) else wrong
        parsed = parse_response(text)
        prompt = encode(tok, student_prompt(ex.question, cfg.templates.student))
        out.append(Rollout(ex, prompt, encode(tok, text) + [tok.eos_token_id], parsed, reward(parsed, ex.answer), g))
    return out


def run_case(d, out_path, overrides) -> None:
    n = 8
    if overrides and overrides[0].startswith("rollouts="):
        n, overrides = int(overrides[0].split("=")[1]), overrides[1:]
    cfg = load_config(overrides=["steps=2", "optim.micro_batch=3", "optim.warmup_steps=0", *overrides])
    torch.manual_seed(0)
    policy, teacher, tok = build_models(cfg, d)
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok, n)
    feedback(cfg, tok, rolls, ArithCritic())  # grpo groups need every member: advantages first
    mine = rolls[d.rank::d.world]
    full = lambda: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()  # noqa: E731
                    for k, v in policy.state_dict().items()}
    params0 = full()
    steps = [update(cfg, d, policy, teacher, opt, sched, tok, mine, step) for step in range(cfg.steps)]
    params = full()
    if d.main:
        torch.save({"steps": steps, "params0": params0, "params": params, "world": d.world}, out_path)


def main():
    cases, case = [], []  # OUT.pt [overrides] -- OUT.pt [overrides] ...: the process starts once
    for arg in [*sys.argv[1:], "--"]:
        if arg == "--":
            cases.append(case)
            case = []
        else:
            case.append(arg)
    d = dist.setup()
    for out_path, *overrides in cases:
        run_case(d, out_path, overrides)
    dist.teardown(d)
    dist.exit_rank(0)


if __name__ == "__main__":
    main()
