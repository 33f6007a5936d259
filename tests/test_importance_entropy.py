"""The trainer's student entropy and loss.is_clip: the samplers' log-probs of the sampled tokens
(transformers `generate` and the fastsd engine), the importance weights min(exp(trainer -
sampler), is_clip), and what a run logs (metrics.jsonl's entropy and is_clipped)."""

from __future__ import annotations

import math

import pytest
import torch
from runs import config, train_rows

from fastsd.loss import fused_linear_logprob
from fastsd.model.dist import Dist
from fastsd.model.load import DEFAULT_MODEL_DIR, load_model_and_tokenizer
from fastsd.model.policy import Policy, importance_weights
from fastsd.rollout.sample import sample
from fastsd.train import train


@pytest.mark.parametrize("engine", ["generate", "fastsd"])
def test_samplers_return_the_sampled_tokens_log_probs(engine):
    lm, tok = load_model_and_tokenizer(DEFAULT_MODEL_DIR, dtype=torch.float32)
    policy = Policy(lm.eval())
    prompts = [tok("Compute 3 + 4.", add_special_tokens=False)["input_ids"],
               tok("Compute 12 - 5 * 2.", add_special_tokens=False)["input_ids"]]
    torch.manual_seed(1)
    rows, lps = sample(policy, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.3,
                       top_p=1.0, max_new_tokens=12, d=Dist(), engine=engine, logprobs=True)
    assert [len(x) for x in lps] == [len(r) for r in rows] and all(rows)
    for p, r, lp in zip(prompts, rows, lps):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1].double()
        want = torch.log_softmax(logits / 1.3, -1).gather(1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), want, atol=1e-4)
    torch.manual_seed(1)  # the same draws without log-probs: asking for them changes no sample
    assert sample(policy, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.3,
                  top_p=1.0, max_new_tokens=12, d=Dist(), engine=engine) == rows


def test_importance_weights_are_the_clipped_ratio():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 40, (9,), generator=g)
    trainer = fused_linear_logprob(h, w, targets, temperature=1.1)
    sampler = trainer + torch.linspace(-1.5, 1.5, 9)  # ratios exp(1.5) .. exp(-1.5)
    sampler[4] = float("nan")  # no record: weight 1
    got = importance_weights(h.requires_grad_(True), w, targets, sampler_logprob=sampler, clip=2.0, temperature=1.1)
    want = torch.exp(trainer - sampler).clamp(max=2.0)
    want[4] = 1.0
    assert not got.requires_grad
    assert torch.allclose(got, want, rtol=1e-5)
    assert (got == 2.0).sum() == 3  # exp(1.5), exp(1.125), exp(0.75) = 2.117 cut; exp(0.375) not
    assert got.min() < 0.3


def test_a_run_logs_entropy_and_the_clipped_share(tmp_path):
    """CPU fp32, one process: sampler and trainer agree to rounding, so every ratio is ~1. A clip
    of 2 cuts none of them, a clip of 0.5 every one (the weights are then all 0.5: a different
    step than without the correction, by the factor on the loss)."""
    common = ["eval=off", "condition=reference", "steps=1"]
    rows = {}
    for name, extra in (("off", []), ("two", ["loss.is_clip=2"]), ("half", ["loss.is_clip=0.5"])):
        train(config(tmp_path / name, *common, *extra), Dist())
        (rows[name],) = train_rows(tmp_path / name)
    for r in rows.values():
        assert math.isfinite(r["entropy"]) and r["entropy"] > 0
    assert "is_clipped" not in rows["off"]
    assert rows["two"]["is_clipped"] == 0.0 and rows["half"]["is_clipped"] == 1.0
    assert rows["two"]["loss"] == pytest.approx(rows["off"]["loss"], rel=1e-5)
    assert rows["two"]["entropy"] == rows["off"]["entropy"]
    assert rows["half"]["loss"] == pytest.approx(0.5 * rows["off"]["loss"], rel=1e-5)


def test_sampled_token_and_grpo_log_entropy(tmp_path):
    for name, extra in (("st", ["condition=reference", "loss=sampled_token", "loss.is_clip=2"]),
                        ("grpo", ["condition=grpo", "rollout.group_size=2"])):
        train(config(tmp_path / name, "eval=off", "steps=1", *extra), Dist())
        (row,) = train_rows(tmp_path / name)
        if row["usable"] > 0:
            assert math.isfinite(row["entropy"]) and row["entropy"] > 0
        else:  # grpo without a group of mixed rewards: no update, nothing measured
            assert name == "grpo" and row["entropy"] is None
        assert ("is_clipped" in row) == (name == "st")
