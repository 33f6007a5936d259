"""Conditions in the loop: the policy-gradient blend (loss.pg_weight) against grpo and against its
two terms; condition=peer trained end to end, resumed bit for bit, under one and two processes,
and on the chat stand-in."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_train_worker import fixed_rollouts
from runs import SMALL, config, read_jsonl, train_rows

from fastsd.config import load_config
from fastsd.feedback import feedback
from fastsd.feedback.critic import ArithCritic
from fastsd.model.dist import Dist
from fastsd.run.build import build_models, build_optim
from fastsd.run.checkpoint import latest_checkpoint
from fastsd.train import train
from fastsd.update import update

REPO = Path(__file__).resolve().parents[1]
BASE = ["optim.warmup_steps=0", "optim.micro_batch=3", "rollout.group_size=2"]


def _steps(cfg, n=2):
    """`n` update steps on the fixed rollouts from the shipped model: (stats, parameters after)."""
    policy, teacher, tok = build_models(cfg, Dist())
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok)
    feedback(cfg, tok, rolls, ArithCritic())
    stats = [update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, s) for s in range(n)]
    return stats, {k: v.detach().clone() for k, v in policy.state_dict().items()}, rolls


@pytest.mark.parametrize("condition", ["reference", "critique", "peer"])
def test_pg_weight_one_is_grpo_to_the_last_digit(condition):
    want, want_params, _ = _steps(load_config(overrides=[*BASE, "condition=grpo"]))
    got, got_params, rolls = _steps(load_config(overrides=[*BASE, f"condition={condition}", "loss.pg_weight=1"]))
    assert got == want and want[0]["loss_tokens"] > 0 and want[0]["divergence"] is None
    assert all(torch.equal(v, want_params[k]) for k, v in got_params.items())
    assert all(r.teacher_prompt is None for r in rolls)  # the teacher has no weight: it is not asked


def _grads(cfg, policy, teacher, tok, rolls):
    """The gradient one update would apply (the optimizer step replaced by a copy of the grads)."""
    opt, sched = build_optim(cfg, policy)
    seen = []
    opt.step = lambda: seen.append([p.grad.detach().clone() for p in policy.parameters()])
    rolls = copy.deepcopy(rolls)
    feedback(cfg, tok, rolls, ArithCritic())
    update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, 0)
    return torch.cat([g.flatten() for g in seen[0]])


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("kind", ["divergence", "sampled_token"])
def test_the_blend_is_the_weighted_sum_of_its_two_token_means(kind):
    """(1 - w) * distillation + w * policy gradient, each term a token mean of its own rollouts: the
    gradient is that mix of the two terms' gradients (at w = 0 and 1) on the same weights."""
    cfg = lambda w: load_config(overrides=[*BASE, "condition=critique", f"loss={kind}", "optim.grad_clip=0",  # noqa: E731
                                           f"loss.pg_weight={w}"])
    policy, teacher, tok = build_models(cfg(0), Dist())
    rolls = fixed_rollouts(cfg(0), tok)
    g0, g1, g = (_grads(cfg(w), policy, teacher, tok, rolls) for w in (0, 1, 0.3))
    assert g0.norm() > 0 and g1.norm() > 0 and (g0 - g1).norm() > 0.1 * g0.norm()
    mix = 0.7 * g0 + 0.3 * g1  # fp32: the two terms' gradients are summed in another order
    assert (g - mix).norm() < 1e-5 * mix.norm()


def test_pg_weight_zero_is_self_distillation_unchanged():
    a = _steps(load_config(overrides=[*BASE, "condition=critique"]))
    b = _steps(load_config(overrides=[*BASE, "condition=critique", "loss.pg_weight=0"]))
    assert a[0] == b[0] and all(torch.equal(v, b[1][k]) for k, v in a[1].items())
    assert not any(r.pg for r in b[2])


# ---------------------------------------------------------------- peer end to end

# Every rollout counts as a success (reward >= 0): each teacher reads its sibling, with 40-token responses.
PEER = ["condition=peer", "rollout.group_size=2", "peer.success=0", "peer.feedback=verdict", "eval=off"]


def test_peer_trains_its_counters_add_up_and_its_teacher_reads_the_sampled_ids(tmp_path):
    train(config(tmp_path, *PEER), Dist())
    rows, rolls = train_rows(tmp_path), read_jsonl(tmp_path / "rollouts.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 and r["loss"] > 0 for r in rows)
    for r in rows:
        assert r["peer_demo"] + r["peer_fallback"] + r["peer_no_teacher"] == 1
        assert r["peer_demo"] == r["peer_feedback"] == r["peer_groups_solved"] == 1
    assert len(rolls) == 8
    for i, r in enumerate(rolls):
        sibling = rolls[i ^ 1]  # groups of 2: the other one
        assert r["notes"] == {"peer": "demonstration", "demo_index": 1 - i % 2, "feedback": True}
        assert r["context"] == sibling["response"] and r["trained"]
        answer = "no final answer" if r["answer"] is None else f"the answer {r['answer']} is right"
        assert r["teacher_prompt"] == f"Q:{r['question']}\nR:{sibling['response']}\nF:{answer}\n"
    # The fallback when no sibling is correct (none is, at 40 tokens): the reference solution.
    train(config(tmp_path / "fallback", *PEER[:2], "peer.fallback=reference", "eval=off", "steps=1"), Dist())
    (row,) = train_rows(tmp_path / "fallback")
    assert (row["peer_fallback"], row["peer_demo"], row["peer_groups_solved"]) == (1, 0, 0) and row["usable"] == 1


def test_peer_stopped_and_resumed_gives_the_same_numbers_bit_for_bit(tmp_path):
    train(config(tmp_path / "straight", *PEER, "steps=2"), Dist())
    train(config(tmp_path / "resumed", *PEER, "steps=1"), Dist())
    train(config(tmp_path / "resumed", *PEER, "steps=2"), Dist())
    keys = ("loss", "gap", "grad_norm", "reward", "usable", "peer_demo", "peer_feedback")
    a, b = ([[r[k] for k in keys] for r in train_rows(tmp_path / n)] for n in ("straight", "resumed"))
    assert len(a) == 2 and a == b
    ids = [[(r["response_ids"], r["teacher_prompt_ids"]) for r in read_jsonl(tmp_path / n / "rollouts.jsonl")]
           for n in ("straight", "resumed")]
    assert ids[0] == ids[1]


def test_peer_and_the_blend_under_two_processes_match_one(fsdp_parity):
    for overrides in ("peer", "blend"):  # the cases' overrides: tests/conftest.py
        one, two = fsdp_parity[overrides]
        assert two["world"] == 2
        for s1, s2 in zip(one["steps"], two["steps"], strict=True):
            assert s1["loss_tokens"] == s2["loss_tokens"] > 0
            for key in ("gap", "grad_norm", "divergence"):
                assert s2[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-7), (overrides, key)
        flat = lambda sd: torch.cat([v.double().flatten() for v in sd.values()])  # noqa: E731
        moved = (flat(one["params"]) - flat(one["params0"])).norm()
        assert moved > 0 and (flat(two["params"]) - flat(one["params"])).norm() < 1e-3 * moved


def test_peer_under_torchrun_resumes_bit_for_bit(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(name: str, *overrides: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "fastsd.cli", *SMALL, *PEER, f"run_dir={tmp_path / name}", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run("straight", "steps=2")
    run("resumed", "steps=2", "checkpoint.every=1")
    shutil.rmtree(latest_checkpoint(tmp_path / "resumed"))  # as if stopped before step 2's checkpoint
    run("resumed", "steps=2", "checkpoint.every=1")
    keys = ("loss", "gap", "grad_norm", "reward", "usable", "peer_demo", "peer_feedback", "peer_no_teacher")
    rows = {n: [[r[k] for k in keys] for r in train_rows(tmp_path / n)] for n in ("straight", "resumed")}
    assert len(rows["straight"]) == 2 and rows["resumed"] == rows["straight"]
    assert all(r[keys.index("peer_demo")] == 1 for r in rows["straight"])
    ids = {n: [(r["step"], r["response_ids"], r["teacher_prompt_ids"]) for r in read_jsonl(tmp_path / n / "rollouts.jsonl")]
           for n in rows}
    assert len(ids["straight"]) == 8 and ids["resumed"] == ids["straight"]


def test_peer_on_the_chat_stand_in(standin, math_data, tmp_path):
    train_file, test_file = math_data
    cfg = load_config(overrides=[*SMALL, *PEER, "steps=1", f"model={standin}", f"data={train_file}",
                                 f"data.eval_path={test_file}", "format=free", f"run_dir={tmp_path}",
                                 "templates.teacher_chat_kwargs={enable_thinking: false}"])
    train(cfg, Dist())
    (row,) = train_rows(tmp_path)
    assert row["peer_demo"] == 1 and row["grad_norm"] > 0
    for r in read_jsonl(tmp_path / "rollouts.jsonl"):
        assert r["teacher_prompt"].startswith("<|im_start|>user\n") and r["context"] in r["teacher_prompt"]
