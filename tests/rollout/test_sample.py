"""fastsd.rollout.sample's choice of batch for `batch_size=0` (evaluations, `eval.batch_size=0`):
256 on CUDA, and on a CPU as many samples as keep their KV cache within 1 GiB, at most 1024."""

from __future__ import annotations

import types

import torch
from transformers import Qwen3Config

from fastsd.model.dist import Dist
from fastsd.model.load import load_model_and_tokenizer
from fastsd.model.policy import Policy
from fastsd.rollout.sample import fitting_batch, sample


def stand_in(config, dtype):
    """The two things fitting_batch reads of a model: its config and its parameters' dtype."""
    return types.SimpleNamespace(config=config, parameters=lambda: iter([torch.empty(0, dtype=dtype)]))


def test_a_small_model_gets_1024_on_a_cpu_and_256_on_cuda():
    lm, _ = load_model_and_tokenizer()  # 4 layers, 2 kv heads of 32: 2 KiB a token in fp32
    assert fitting_batch(lm, 454, torch.device("cpu")) == 1024  # 1 GiB / 908 KiB = 1154 rows, capped
    assert fitting_batch(lm, 1200, torch.device("cpu")) == (1 << 30) // (2048 * 1200) == 436
    assert fitting_batch(lm, 454, torch.device("cuda")) == 256


def test_a_real_model_on_a_cpu_gets_the_rows_whose_cache_fits():
    # Qwen3-1.7B's shape: 28 layers, 8 kv heads of 128: 224 KiB a token in fp32, 112 KiB in bf16
    config = Qwen3Config(num_hidden_layers=28, num_key_value_heads=8, head_dim=128, hidden_size=2048,
                         num_attention_heads=16)
    assert fitting_batch(stand_in(config, torch.float32), 2300, torch.device("cpu")) == 2
    assert fitting_batch(stand_in(config, torch.bfloat16), 2300, torch.device("cpu")) == 4
    assert fitting_batch(stand_in(config, torch.float32), 10_000, torch.device("cpu")) == 1  # never 0


def test_batch_size_zero_samples_300_prompts_in_one_call_on_the_shipped_model():
    lm, tok = load_model_and_tokenizer()
    calls = []
    rows = sample(Policy(lm), [[5, 6, 7]] * 300, eos_id=-1, pad_id=tok.pad_token_id, temperature=1.0, top_p=1.0,
                  max_new_tokens=2, d=Dist(), batch_size=0, engine="fastsd",
                  progress=lambda done, total: calls.append(total))
    assert len(rows) == 300 and all(len(r) == 2 for r in rows)
    assert set(calls) == {1}  # 256 would have made two
