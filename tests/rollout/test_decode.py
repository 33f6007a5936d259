"""fastsd.rollout.decode's written decode step against transformers' forward: logits in float64 on
llama, qwen2 (biases) and qwen3 (q/k norms) models built here, greedy tokens on the shipped model
with rows finishing (and dropped) at different steps, LoRA layers, autocast, and the models it
leaves to transformers."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_engine import prompts_for
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from fastsd.model.batch import pad
from fastsd.model.load import DEFAULT_MODEL_DIR, load_model_and_tokenizer
from fastsd.rollout.decode import StepDecoder
from fastsd.rollout.engine import RolloutEngine

SIZES = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1)


def built(config_class, **extra):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config_class(**SIZES, **extra)).to(torch.float64).eval()
    for p in lm.parameters():  # random, not the init's zero biases and unit norms: every term counts
        p.data.normal_(0, 0.3)
    return lm


MODELS = {"llama": lambda: built(LlamaConfig), "qwen2": lambda: built(Qwen2Config),
          "qwen3": lambda: built(Qwen3Config),
          "llama, untied, rope scaling": lambda: built(LlamaConfig, tie_word_embeddings=False, rope_parameters={
              "rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
          # biases on o_proj and down_proj too (their sums are not one addmm); dynamic RoPE (computed
          # at each step, not from a table; its scaling starts past max_position_embeddings)
          "llama, all biases, dynamic rope": lambda: built(LlamaConfig, attention_bias=True, mlp_bias=True,
                                                           rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                            "rope_theta": 10000.0})}


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    return [torch.randint(2, 61, (length,), generator=g).tolist() for length in lengths]


def prompt_forward(lm, ids, attn, pos):
    """The prompt's forward into a fresh DynamicCache (transformers renamed past_key_values to cache in 5.2x)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    cache = DynamicCache()
    lm(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{name: cache})
    return cache


def written_and_forward_logits(lm, prompt_rows, new_tokens):
    """Logits of each new token from the written step, and from transformers' forward over the
    whole sequence (prompt + the tokens fed so far), for left-padded prompts of different lengths."""
    ids, attn = pad(prompt_rows, 0, left=True)
    B, P = ids.shape
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = prompt_forward(lm, ids, attn, pos)
        decoder = StepDecoder(lm, cache, attn, P + new_tokens.shape[1])
        got, want = [], []
        for t in range(new_tokens.shape[1]):
            step_pos = pos[:, -1] + 1 + t
            got.append(decoder.step(new_tokens[:, t], step_pos, P + t))
            full_ids = torch.cat([ids, new_tokens[:, :t + 1]], 1)
            full_attn = torch.cat([attn, torch.ones(B, t + 1, dtype=attn.dtype)], 1)
            full_pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(t + 1)], 1)
            want.append(lm(input_ids=full_ids, attention_mask=full_attn, position_ids=full_pos).logits[:, -1])
    return torch.stack(got, 1), torch.stack(want, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_written_step_logits_equal_transformers_forward_in_float64(name):
    lm = MODELS[name]()
    assert StepDecoder.fits(lm)
    rows = prompts(5)
    assert len({len(r) for r in rows}) > 2
    new = torch.randint(2, 61, (5, 6), generator=torch.Generator().manual_seed(1))
    got, want = written_and_forward_logits(lm, rows, new)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_written_step_in_float32_is_as_close_to_float64_as_transformers(name):
    """In fp32 the norms are one fused `rms_norm` (float64 keeps the modules): against the float64
    forward, measured 0.9e-6 to 3.4e-6 at most on these models (transformers' fp32 forward: 1.3e-6
    to 1.7e-6, on logits of about 1)."""
    lm = MODELS[name]()
    new = torch.randint(2, 61, (5, 6), generator=torch.Generator().manual_seed(1))
    exact, _ = written_and_forward_logits(lm, prompts(5), new)
    got, want = written_and_forward_logits(lm.float(), prompts(5), new)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-5)
    torch.testing.assert_close(want.double(), exact, rtol=0, atol=2e-5)


def test_rope_comes_from_one_table_unless_its_frequencies_follow_the_longest_position():
    """cos and sin of every position from one call of the rotary embedding, equal to a step's own
    call; none for dynamic NTK, whose frequencies change past max_position_embeddings (the tests
    above stay below it, so they cannot tell the table from per-step calls there)."""
    from fastsd.rollout.decode import _rope_table

    model = MODELS["llama, untied, rope scaling"]().model
    cos, sin = _rope_table(model, 20)
    pos = torch.tensor([3, 17, 0])
    want_cos, want_sin = model.rotary_emb(model.embed_tokens.weight, pos[:, None])
    assert torch.equal(cos[pos], want_cos) and torch.equal(sin[pos], want_sin)
    assert _rope_table(MODELS["llama, all biases, dynamic rope"]().model, 20) is None


def test_dropping_rows_leaves_the_others_unchanged():
    """After `keep`, the remaining rows' logits are those of the full batch, up to float64 rounding
    (a product's blocking depends on its batch: 7e-16 measured)."""
    lm = MODELS["qwen2"]()
    rows = prompts(4, seed=2)
    ids, attn = pad(rows, 0, left=True)
    P = ids.shape[1]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, -1]
    decoders = []
    with torch.no_grad():
        for _ in range(2):
            cache = prompt_forward(lm, ids, attn, (attn.cumsum(-1) - 1).clamp(min=0))
            decoders.append(StepDecoder(lm, cache, attn, P + 3))
        tok = torch.tensor([5, 6, 7, 8])
        for d in decoders:
            d.step(tok, pos + 1, P)
        keep = torch.tensor([1, 3])
        decoders[1].keep(keep)
        full = decoders[0].step(tok, pos + 2, P + 1)
        kept = decoders[1].step(tok[keep], pos[keep] + 2, P + 1)
    torch.testing.assert_close(kept, full[keep], rtol=0, atol=1e-13)


@pytest.fixture(scope="module")
def shipped():
    lm, tok = load_model_and_tokenizer(DEFAULT_MODEL_DIR, dtype=torch.float32)
    return lm.eval(), tok


def test_greedy_on_the_shipped_model_equals_transformers_forward_with_rows_dropped(shipped, monkeypatch):
    """The engine's default step on a CPU is the written one; rows that finish early are dropped
    from the batch (checked by spying on `keep`) and every row's tokens stay those of transformers'
    forward on a static cache, token for token."""
    lm, tok = shipped
    rows = prompts_for(tok, 16)
    kept = []
    real_keep = StepDecoder.keep
    monkeypatch.setattr(StepDecoder, "keep", lambda self, r: (kept.append(len(r)), real_keep(self, r))[1])
    kw = dict(max_new_tokens=320, temperature=0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    engine = RolloutEngine(lm)
    assert engine.written_step and not engine.compile
    got, lps = engine.generate(rows, **kw)
    assert len(kept) >= 2 and kept == sorted(kept, reverse=True) and len(set(kept)) == len(kept)  # dropped twice+
    want, _ = RolloutEngine(lm, written_step=False).generate(rows, **kw)
    assert got == want
    assert len({len(r) for r in got}) > 3 and [len(x) for x in lps] == [len(r) for r in got]


def test_a_rank_whose_rows_are_all_done_keeps_stepping_with_them(shipped):
    """Under torchrun `all_done` can say "not yet" (another rank still runs) when every local row
    is done: the written step then keeps its finished rows (padding), drops none to an empty
    batch, and returns what it returns alone."""
    lm, tok = shipped
    rows = prompts_for(tok, 3)
    kw = dict(max_new_tokens=40, temperature=0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
              stop=tok("<step_1>", add_special_tokens=False)["input_ids"])  # how every response starts
    alone, _ = RolloutEngine(lm).generate(rows, **kw)
    assert max(map(len, alone)) < 16  # every row done at the first check
    calls = []
    beside, _ = RolloutEngine(lm).generate(rows, **kw, all_done=lambda finished: calls.append(finished) and False)
    assert beside == alone and calls == [True, True]


def test_hooks_and_adapters_the_step_cannot_honour():
    """A forward hook on a projection is run (the layer is called, not joined); a peft adapter
    other than LoRA (prefix tuning adds positions to the cache) keeps transformers' forward, and
    asking for the written step there is an error."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    lm = MODELS["llama"]()
    lm.model.layers[1].mlp.up_proj.register_forward_hook(lambda module, args, out: out * 0.5)
    new = torch.randint(2, 61, (3, 4), generator=torch.Generator().manual_seed(6))
    got, want = written_and_forward_logits(lm, prompts(3), new)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    prefix = get_peft_model(MODELS["llama"](), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    lora = get_peft_model(MODELS["llama"](), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not StepDecoder.fits(prefix) and StepDecoder.fits(lora)
    assert not RolloutEngine(prefix).written_step
    with pytest.raises(ValueError, match="written_step"):
        RolloutEngine(prefix, written_step=True)


def test_lora_layers_are_called_as_themselves():
    """A LoRA adapter on q/v and the MLP's up projection: the written step uses the adapted layers,
    so it equals transformers' forward with the adapter, and differs from the one without."""
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(MODELS["llama"](), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                      init_lora_weights=False))
    assert StepDecoder.fits(lm)
    new = torch.randint(2, 61, (3, 4), generator=torch.Generator().manual_seed(3))
    got, want = written_and_forward_logits(lm, prompts(3), new)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with lm.disable_adapter():
        without, _ = written_and_forward_logits(lm, prompts(3), new)
    assert (without - got).abs().max() > 1e-3


def test_under_autocast_the_step_decodes_in_the_low_precision():
    """bf16 autocast with fp32 weights: the step runs in bf16 and is as far from float64 as
    transformers' forward under the same autocast (measured: 0.028 and 0.025 at most, on logits
    of at most 2.4; bf16 keeps 8 significant bits)."""
    lm = MODELS["llama"]().float()
    new = torch.randint(2, 61, (3, 4), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = written_and_forward_logits(lm, prompts(3), new)
    exact, _ = written_and_forward_logits(lm.double(), prompts(3), new)
    assert got.dtype == want.dtype
    err_written, err_forward = (got.double() - exact).abs().max(), (want.double() - exact).abs().max()
    assert err_written < 4 * err_forward + 1e-2, (err_written, err_forward)


def test_the_written_step_is_the_default_on_cpus_only():
    """On another device (here the meta device, a stand-in for CUDA) the engine keeps
    transformers' forward unless asked; on a CPU the same model takes the written step."""
    lm = MODELS["llama"]()
    assert RolloutEngine(lm).written_step
    on_meta = lm.to("meta")
    assert StepDecoder.fits(on_meta) and not RolloutEngine(on_meta, compile=False).written_step
    assert RolloutEngine(on_meta, compile=False, written_step=True).written_step


def test_models_without_the_layout_keep_transformers_forward():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=2)).eval()
    windowed = built(Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not StepDecoder.fits(gpt2) and not StepDecoder.fits(windowed)
    assert not RolloutEngine(gpt2).written_step
    rows, _ = RolloutEngine(gpt2).generate(prompts(2), max_new_tokens=3, temperature=0, eos_id=1, pad_id=0)
    assert [len(r) for r in rows] == [3, 3]
