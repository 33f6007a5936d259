"""The trainer end to end on the CPU: conditions, teacher freezing, FSDP2 parity, NaN stop,
malformed output (resume and the run directory: test_resume.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_train_worker import fixed_rollouts
from runs import SMALL, config, read_jsonl, train_rows
from transformers import AutoModelForCausalLM

from fastsd import cli
from fastsd.config import load_config
from fastsd.feedback import feedback
from fastsd.feedback.critic import ArithCritic
from fastsd.feedback.prompts import encode, student_prompt
from fastsd.model.dist import Dist
from fastsd.model.load import DEFAULT_MODEL_DIR, build_tokenizer, tiny_config
from fastsd.model.policy import Policy
from fastsd.rollout import Rollout
from fastsd.run import run_dir as run_dir_mod
from fastsd.run.build import build_models, build_optim
from fastsd.run.checkpoint import latest_checkpoint
from fastsd.tasks import data as data_mod
from fastsd.tasks.data import builtin_split
from fastsd.tasks.format import parse_response, reward
from fastsd.train import train
from fastsd.update import NonFiniteLossError, update
from fastsd.update import step as step_mod

REPO = Path(__file__).resolve().parents[1]


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """An untrained tiny model: its samples are (almost surely) malformed."""
    path = tmp_path_factory.mktemp("random-tiny")
    tok = build_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------- each condition, end to end

@pytest.mark.parametrize("overrides", [
    ["condition=critique"],
    ["condition=reference"],
    ["condition=grpo", "rollout.group_size=2"],
    ["condition=critique", "loss=sampled_token"],
    ["condition=reference", "teacher=ema", "loss.divergence=jsd"],
    ["condition=critique", "teacher=current", "loss.divergence=reverse_kl"],
    ["condition=reference", "loss.topk=8", "loss.divergence=jsd", "loss.clip=0.05"],
], ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_condition_runs_end_to_end(tmp_path, overrides):
    cfg = config(tmp_path, *overrides)
    result = train(cfg, Dist())
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["reward"] <= 1 and 0 <= r["usable"] <= 1 and 0 <= r["no_answer"] <= 1
        assert math.isfinite(r["grad_norm"]) and math.isfinite(r["gap"]) and r["tok_s"] > 0
        assert min(r["time_rollout"], r["time_feedback"], r["time_update"]) >= 0
        if cfg.condition != "grpo" and cfg.loss.kind == "divergence":
            assert math.isfinite(r["loss"]) and r["loss"] >= 0
        if cfg.condition == "grpo":
            assert 0 <= r["zero_variance_rollouts"] <= 4
    for key in ("first", "final"):
        assert result[key]["k"] == 2 and result[key]["questions"] == 2
        assert all(0 <= result[key][m] <= 1 for m in ("avg@k", "pass@k", "maj@k"))

    rolls = read_jsonl(tmp_path / "rollouts.jsonl")
    assert len(rolls) == 2 * 2 * cfg.group_size
    if cfg.condition == "reference":
        refs = {ex.question: ex.reference_solution for ex in builtin_split("train", 16, 0)}
        assert all(r["context"] == refs[r["question"]] for r in rolls)
    elif cfg.condition == "critique":
        assert all(r["context"] is None or r["context"].startswith("<step_1>") or "<answer>" in r["context"]
                   for r in rolls)
        assert any(r["context"] for r in rolls)
    else:
        assert all(r["context"] is None for r in rolls)

    assert load_config(str(tmp_path / "config.yaml")) == cfg  # the resolved config is saved
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_00000002"
    trained = AutoModelForCausalLM.from_pretrained(ckpt / "hf", local_files_only=True)
    initial = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    if cfg.condition != "grpo" or any(r["usable"] > 0 for r in rows):
        assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                          initial.state_dict().values()))


# ---------------------------------------------------------------- teacher, metrics

def test_initial_teacher_stays_frozen_while_the_student_changes():
    cfg = load_config(overrides=["optim.warmup_steps=0", "optim.lr=1e-3"])
    policy, teacher, tok = build_models(cfg, Dist())
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok)
    feedback(cfg, tok, rolls, ArithCritic())
    initial = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True).state_dict()
    before = params(policy.lm)
    stats = [update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, step) for step in range(2)]
    assert all(s["divergence"] > 0 for s in stats)
    assert stats[1]["divergence"] < stats[0]["divergence"]  # the student moves toward the teacher
    assert all(torch.equal(v, initial[k]) for k, v in teacher.lm.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert sum(not torch.equal(v, before[k]) for k, v in policy.lm.state_dict().items()) > 10


def test_update_passes_the_topk_keys_to_the_loss():
    """loss.topk reaches the fused loss: the vocabulary with the (empty) tail is the full divergence,
    a few tokens renormalised another, and the step trains."""
    def first_step(*overrides):
        cfg = load_config(overrides=["optim.micro_batch=4", *overrides])
        policy, teacher, tok = build_models(cfg, Dist())
        opt, sched = build_optim(cfg, policy)
        rolls = fixed_rollouts(cfg, tok)
        feedback(cfg, tok, rolls, ArithCritic())
        before = params(policy.lm)
        stats = update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, 0)
        assert sum(not torch.equal(v, before[k]) for k, v in policy.lm.state_dict().items()) > 10
        return stats["divergence"], len(tok)

    full, vocab = first_step()
    assert math.isclose(first_step(f"loss.topk={vocab}")[0], full, rel_tol=1e-5)
    few = first_step("loss.topk=4", "loss.tail=false", "loss.topk_from=student")[0]
    assert few > 0 and not math.isclose(few, full, rel_tol=1e-2)


@pytest.mark.parametrize("condition", ["critique", "grpo"])
def test_counters_are_ints_whatever_the_process_count(condition):
    """Sums over ranks come back as floats (a float64 all-reduce): critique_failed was 0 with one
    process and 0.0 under torchrun."""
    from types import SimpleNamespace

    class TwoRanks(Dist):  # the all-reduce's return type, without the processes
        def all_sum(self, *values):
            return [float(v) for v in values]

    cfg = load_config(overrides=[f"condition={condition}"])
    roll = SimpleNamespace(critique_error="unparsable" if condition == "critique" else None, reward=0.0,
                           trained=False, parsed=SimpleNamespace(answer=None), response=[1, 2])
    upd = {"divergence": None, "gap": 0.0, "grad_norm": 0.0}
    for d in (Dist(), TwoRanks()):
        row, _ = run_dir_mod.step_row(cfg, d, 1, [roll, roll], upd, 1e-4, [0.0, 1.0, 2.0, 3.0])
        key = "critique_failed" if condition == "critique" else "zero_variance_rollouts"
        assert row[key] == 2 and type(row[key]) is int, (type(d).__name__, row[key])


def test_missing_model_and_empty_held_out_file_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=f"^model.path: {tmp_path}/nope does not exist"):
        build_models(config(tmp_path, f"model={tmp_path}/nope"), Dist())
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="^data.eval_path: no held-out questions"):
        data_mod.load_data(config(tmp_path, f"data.eval_path={tmp_path}/empty.jsonl"))
    with pytest.raises(ValueError, match=f"^data.path: {tmp_path}/nope.jsonl does not exist"):
        data_mod.load_data(config(tmp_path, f"data={tmp_path}/nope.jsonl"))


def test_a_step_with_nothing_to_learn_leaves_the_weights_alone():
    """grpo with one reward in every group: no loss tokens, so no AdamW step (which would still
    move the weights by momentum and weight decay)."""
    cfg = load_config(overrides=["condition=grpo", "optim.weight_decay=0.1"])
    policy, teacher, tok = build_models(cfg, Dist())
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok)[:4]  # the correct ones only: every group has reward 1
    feedback(cfg, tok, rolls, None)
    assert not any(r.trained for r in rolls)
    before = params(policy)
    stats = update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, 0)
    assert stats["loss_tokens"] == 0 and stats["divergence"] is None
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items()) and not opt.state
    assert sched.last_epoch == 1


# ---------------------------------------------------------------- FSDP2 parity

@pytest.mark.parametrize("case", ["critique", "grpo", "uneven-critique"])
def test_two_process_fsdp_matches_one_process(fsdp_parity, case):
    """Same rollouts, 2 steps: losses within 1e-5 relative (uneven: rank 1 has 3 rollouts to
    rank 0's 4, so it runs a zero-weight filler micro-batch to stay in lock-step). The parameters differ from one
    process's by under 1e-3 of the update's size: gloo sums gradients in another order, and AdamW's
    g / sqrt(v) amplifies that on near-zero gradients, so an element-wise bound would be flaky."""
    one_and_two_processes_match(*fsdp_parity[case])  # the cases' overrides: tests/conftest.py


def one_and_two_processes_match(one: dict, two: dict) -> None:
    assert two["world"] == 2
    for s1, s2 in zip(one["steps"], two["steps"], strict=True):
        assert s1["loss_tokens"] == s2["loss_tokens"] > 0
        for key in ("gap", "grad_norm", "divergence"):
            if s1[key] is not None:
                assert s2[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-7), key
    assert one["params"].keys() == two["params"].keys()
    assert all(torch.equal(v, two["params0"][k]) for k, v in one["params0"].items())
    flat = lambda sd: torch.cat([v.double().flatten() for v in sd.values()])  # noqa: E731
    moved = (flat(one["params"]) - flat(one["params0"])).norm()
    assert moved > 0
    assert (flat(two["params"]) - flat(one["params"])).norm() < 1e-3 * moved
    assert one["steps"][0]["grad_norm"] > 0


def test_torchrun_two_processes_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastsd.cli", *SMALL, f"run_dir={tmp_path}", "checkpoint.every=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[fastsd] after:" in proc.stdout
    # the engine, the CPU's default sampler; FSDP2's hooks need the model's own forward
    assert "rollouts: fastsd, eager, transformers' forward" in proc.stdout + proc.stderr
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_jsonl(tmp_path / "rollouts.jsonl")] == [1, 1, 2, 2]  # both ranks' rollouts
    assert f"logs, config and checkpoints: {tmp_path}" in proc.stdout
    files = sorted(p.name for p in latest_checkpoint(tmp_path).iterdir())
    assert {"rng_rank0.pt", "rng_rank1.pt", "COMPLETE"} <= set(files)


# ---------------------------------------------------------------- failures

def test_nan_loss_stops_the_step_with_parameters_unchanged(monkeypatch):
    cfg = load_config(overrides=["optim.micro_batch=3"])
    policy, teacher, tok = build_models(cfg, Dist())
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok)
    feedback(cfg, tok, rolls, ArithCritic())
    real, calls = step_mod._micro_loss, []

    def poisoned(*args, **kwargs):  # the second micro-batch's loss is NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(step_mod, "_micro_loss", poisoned)
    before = params(policy)
    with pytest.raises(NonFiniteLossError, match="step 1: non-finite loss in micro-batch 2.*parameters unchanged"):
        update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, 0)
    assert len(calls) == 2
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert all(p.grad is None for p in policy.parameters()) and not opt.state


def test_nan_loss_in_a_run_exits_with_an_error_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    train(config(tmp_path, "steps=1"), Dist())
    monkeypatch.setattr(step_mod, "_micro_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as exc:
        cli.main([*SMALL, f"run_dir={tmp_path}"])
    assert exc.value.code == 1
    assert "fastsd-train: error: step 2: non-finite loss" in capsys.readouterr().err  # the second step, as logged
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_malformed_output_gets_reward_zero_and_is_counted(tmp_path, random_model):
    train(config(tmp_path, f"model={random_model}", "steps=1"), Dist())
    (row,) = train_rows(tmp_path)
    assert row["reward"] == 0 and row["no_answer"] == 1.0
    assert all(r["reward"] == 0 for r in read_jsonl(tmp_path / "rollouts.jsonl"))


@pytest.mark.parametrize("condition", ["critique", "grpo"])
def test_feedback_on_malformed_responses(condition):
    cfg = load_config(overrides=[f"condition={condition}"])
    tok = build_tokenizer()
    ex = builtin_split("train", 1, 0)[0]
    prompt = encode(tok, student_prompt(ex.question, cfg.templates.student))
    texts = ["", "<step_1>12+", "garbage >< no tags", "<answer></answer>", arith_solution(ex)]
    rolls = [Rollout(ex, prompt, encode(tok, t), parse_response(t), reward(parse_response(t), ex.answer), 0)
             for t in texts]
    assert [r.reward for r in rolls] == [0, 0, 0, 0, 1]
    feedback(cfg, tok, rolls, ArithCritic())
    assert not rolls[0].trained  # nothing to train on an empty response
    if condition == "critique":
        assert all(r.context and r.teacher_prompt for r in rolls[1:])
    else:
        assert [r.advantage > 0 for r in rolls] == [False] * 4 + [True] and all(r.trained for r in rolls[1:])


def arith_solution(ex) -> str:
    from fastsd.tasks import arith

    return arith.canonical_solution(ex.question)


# ---------------------------------------------------------------- mixed precision

def test_autocast_policy_computes_in_bf16_with_fp32_gradients(random_model):
    lm = AutoModelForCausalLM.from_pretrained(random_model, local_files_only=True)
    policy = Policy(lm, autocast=torch.bfloat16)
    ids = torch.randint(3, 50, (2, 9))
    index = torch.arange(4, 8)
    h = policy(ids, torch.ones_like(ids), index, mode="hidden")
    assert h.dtype == torch.bfloat16 and h.shape == (4, lm.config.hidden_size)
    out = policy(ids, torch.ones_like(ids), index, mode="divergence", targets=ids.flatten()[index + 1],
                 teacher_hidden=torch.randn_like(h), loss_kw={})
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert lm.get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["divergence", "sampled_token"])
def test_update_under_autocast(kind):
    """The single-process CUDA path (bf16 autocast over fp32 weights), run on the CPU: student and
    teacher heads, hidden states and the loss meet in bf16; the fp32 weights take the step."""
    cfg = load_config(overrides=[f"loss={kind}", "optim.micro_batch=4"])
    policy, teacher, tok = build_models(cfg, Dist())
    policy.autocast = teacher.autocast = torch.bfloat16
    assert policy.head_weight.dtype == torch.bfloat16 and policy.lm.dtype == torch.float32
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok)
    feedback(cfg, tok, rolls, ArithCritic())
    before, frozen = params(policy), params(teacher)
    stats = update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, 0)
    assert math.isfinite(stats["gap"]) and stats["grad_norm"] > 0
    if kind == "divergence":
        assert stats["divergence"] > 0
    assert all(v.dtype == torch.float32 for v in policy.state_dict().values())
    assert sum(not torch.equal(v, before[k]) for k, v in policy.state_dict().items()) > 10
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
