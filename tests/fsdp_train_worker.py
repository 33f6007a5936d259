"""One or two processes run the same fixed update steps; rank 0 writes what the test compares.

    python tests/fsdp_train_worker.py OUT.json [key=value ...]                   # one process
    torchrun --nproc_per_node 2 tests/fsdp_train_worker.py OUT.json [...]        # FSDP2, gloo

The rollouts are fixed (canonical solutions, every other one with a wrong step), so both runs see
the same tokens: rank r trains on rollouts r, r + world, ...
"""

import json
import sys

import torch

from fastsd import dist
from fastsd.config import load_config
from fastsd.critic import ArithCritic
from fastsd.data import builtin_split
from fastsd.format import parse_response, reward
from fastsd.tasks import arith
from fastsd.train import Rollout, build_models, build_optim, encode, feedback, update


def fixed_rollouts(cfg, tok, n=8):
    out = []
    for g, ex in enumerate(builtin_split("train", n, 0)):
        solution = arith.canonical_solution(ex.question)
        text = solution if g % 2 == 0 else solution.replace("=", "=1", 1)  # wrong first result
        parsed = parse_response(text)
        prompt = encode(tok, cfg.templates.student.format(question=ex.question))
        out.append(Rollout(ex, prompt, encode(tok, text) + [tok.eos_token_id], parsed, reward(parsed, ex.answer), g))
    return out


def main():
    out_path, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(overrides=["steps=2", "optim.micro_batch=3", "optim.warmup_steps=0", *overrides])
    d = dist.setup()
    torch.manual_seed(0)
    policy, teacher, tok = build_models(cfg, d)
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok)[d.rank::d.world]
    feedback(cfg, tok, rolls, ArithCritic())
    result = {"steps": []}
    for step in range(cfg.steps):
        stats = update(cfg, d, policy, teacher, opt, sched, tok, rolls, step)
        sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in policy.state_dict().items()}
        result["steps"].append({**stats, "param_sum": float(sum(v.double().abs().sum() for v in sd.values()))})
    if d.main:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.teardown(d)


if __name__ == "__main__":
    main()
