"""LoRA (peft): config keys, teachers without a second model, adapter-only training, checkpoints
in PEFT format with a merged export, bitwise resume, FSDP2, bad input."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fsdp_train_worker import fixed_rollouts
from peft import LoraConfig, PeftModel, get_peft_model
from runs import config, read_jsonl, train_rows
from safetensors.torch import load_file
from test_train import REPO, one_and_two_processes_match
from transformers import AutoModelForCausalLM, Qwen3Config

from fastsd.config import load_config
from fastsd.config.tree import LORA_TARGETS
from fastsd.feedback import feedback
from fastsd.feedback.critic import ArithCritic
from fastsd.model.dist import Dist
from fastsd.model.load import DEFAULT_MODEL_DIR, build_tokenizer
from fastsd.model.lora import adapter_params, paired_adapters
from fastsd.model.policy import AdapterTeacher, Policy
from fastsd.rollout.sample import sample
from fastsd.run.build import build_models, build_optim
from fastsd.run.checkpoint import latest_checkpoint
from fastsd.train import train
from fastsd.update import update

LORA = ["model.lora.r=8"]
FAST = ["optim.warmup_steps=0", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    """A random tiny Qwen3 (tied embeddings) with the built-in character tokenizer."""
    path = tmp_path_factory.mktemp("qwen3")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def model_path(which, qwen3) -> Path:
    return DEFAULT_MODEL_DIR if which == "builtin" else qwen3


def built(*overrides):
    cfg = load_config(overrides=[*FAST, *overrides])
    policy, teacher, tok = build_models(cfg, Dist())
    return cfg, policy, teacher, tok, *build_optim(cfg, policy)


def train_steps(cfg, policy, teacher, tok, opt, sched, n=2):
    rolls = fixed_rollouts(cfg, tok)
    feedback(cfg, tok, rolls, ArithCritic())
    return [update(cfg, Dist(), policy, teacher, opt, sched, tok, rolls, step) for step in range(n)]


def some_ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (2, 13), generator=g)
    return ids, torch.ones_like(ids), torch.arange(ids.numel())


@torch.no_grad()
def hidden(module, seed=0):
    return module(*some_ids(seed), mode="hidden")


def adapters(policy) -> dict[str, dict[str, torch.Tensor]]:
    return {a: {n: p.detach().clone() for n, p in ps.items()} for a, ps in adapter_params(policy.lm).items()}


# ---------------------------------------------------------------- teachers, training

@pytest.mark.parametrize("which", ["builtin", "qwen3"])
def test_initial_teacher_is_the_base_model_bit_for_bit(which, qwen3, caplog):
    path = model_path(which, qwen3)
    with caplog.at_level(logging.INFO, logger="fastsd"):
        cfg, policy, teacher, tok, opt, sched = built(*LORA, f"model={path}", "teacher=initial")
    base = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    n_base = sum(p.numel() for p in base.parameters())
    n_adapter = sum(p.numel() for p in adapter_params(policy.lm)["default"].values())
    assert f"{n_adapter:,} of {n_base + n_adapter:,} parameters train" in caplog.text
    # no second model: the teacher is the student's module, which holds the base and one adapter
    assert isinstance(teacher, AdapterTeacher) and teacher.lm is policy.lm
    assert sum(p.numel() for p in policy.parameters()) == n_base + n_adapter
    train_steps(cfg, policy, teacher, tok, opt, sched)
    ref = Policy(base)
    assert torch.equal(hidden(teacher), hidden(ref)) and torch.equal(hidden(teacher, 1), hidden(ref, 1))
    assert not torch.allclose(hidden(policy), hidden(ref), atol=1e-4)  # the adapter has moved
    # only the adapter trained: base weights as loaded, gradients and optimizer state on the adapter only
    trained = set(adapter_params(policy.lm)["default"].values())
    assert {p for g in opt.param_groups for p in g["params"]} == trained == set(opt.state)
    base_sd = base.state_dict()
    for name, p in policy.lm.get_base_model().named_parameters():
        if p not in trained:
            assert not p.requires_grad and p.grad is None
            assert torch.equal(p, base_sd[name.replace(".base_layer", "")]), name


def test_the_trainable_count_leaves_the_teacher_adapter_out(caplog):
    """teacher=ema holds a frozen copy of the adapter: it counted in the total (22.13% where peft
    says 28.42% for the same adapter)."""
    with caplog.at_level(logging.INFO, logger="fastsd"):
        cfg, policy, teacher, tok, opt, sched = built(*LORA, "teacher=ema")
    n_adapter = sum(p.numel() for p in adapter_params(policy.lm)["default"].values())
    n_base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).parameters())
    assert "ema" in adapter_params(policy.lm)
    assert f"{n_adapter:,} of {n_base + n_adapter:,} parameters train" in caplog.text


def test_current_and_ema_teachers_are_adapters():
    cfg, policy, teacher, tok, opt, sched = built(*LORA, "model.lora.dropout=0.5", "teacher=current")
    assert teacher.adapter == "default" and set(adapters(policy)) == {"default"}
    train_steps(cfg, policy, teacher, tok, opt, sched, n=1)
    policy.lm.eval()  # the teacher runs without adapter dropout
    assert torch.equal(hidden(teacher), hidden(policy))

    cfg, policy, teacher, tok, opt, sched = built(*LORA, "teacher=ema", "teacher.ema_rate=0.5")
    a0 = adapters(policy)
    assert all(torch.equal(v, a0["default"][k.replace(".ema", ".default")]) for k, v in a0["ema"].items())
    train_steps(cfg, policy, teacher, tok, opt, sched, n=1)
    a1 = adapters(policy)
    for k, v in a1["ema"].items():  # ema <- 0.5 * ema + 0.5 * student, on the adapter only
        s = k.replace(".ema", ".default")
        assert torch.equal(v, a0["ema"][k].lerp(a1["default"][s], 0.5)), k
    assert any(not torch.equal(v, a1["default"][k.replace(".ema", ".default")]) for k, v in a1["ema"].items())
    h_t = hidden(teacher)
    assert not torch.allclose(h_t, hidden(policy), atol=1e-5)
    with torch.no_grad():  # the teacher is the ema adapter: swap it in by hand and compare
        for p, e in paired_adapters(policy.lm, "default", "ema"):
            p.copy_(e)
    assert torch.equal(h_t, hidden(policy))
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == \
        {"lm." + n for n in adapter_params(policy.lm)["default"]}  # flags as before the teacher ran


# ---------------------------------------------------------------- checkpoints, resume, export

def test_lora_run_resumes_bitwise_and_exports_peft_and_merged(tmp_path):
    common = [*LORA, "teacher=ema", "loss.divergence=jsd", "condition=reference", "rollout.max_new_tokens=16"]
    train(config(tmp_path / "a", *common, "steps=2"), Dist())
    train(config(tmp_path / "b", *common, "steps=1"), Dist())
    train(config(tmp_path / "b", *common, "steps=2"), Dist())  # resume=auto from step 1
    train(config(tmp_path / "c", *common, "steps=2", "checkpoint.every=1"), Dist())  # saved at step 1, no stop
    a, b, c = train_rows(tmp_path / "a"), train_rows(tmp_path / "b"), train_rows(tmp_path / "c")
    assert [r["step"] for r in b] == [1, 2]
    for key in ("loss", "gap", "grad_norm", "reward"):
        assert b[1][key] == a[1][key] == c[1][key], key
    responses = lambda d: [r["response"] for r in read_jsonl(d / "rollouts.jsonl") if r["step"] == 2]  # noqa: E731
    assert responses(tmp_path / "b") == responses(tmp_path / "a") == responses(tmp_path / "c")
    ca, cb = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    for sub in ("adapter", "adapter/ema"):
        wa, wb = load_file(ca / sub / "adapter_model.safetensors"), load_file(cb / sub / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items()), sub
    state = torch.load(ca / "trainer_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(wa)  # AdamW state for the adapter only
    assert not (ca / "teacher.safetensors").exists()

    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    ids = torch.randint(3, 99, (2, 11))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, ca / "adapter")
        peft_logits = peft_model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(ca / "hf", local_files_only=True)
        merged_logits = merged(input_ids=ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)
    # The merged model computes x (W + s B A), peft x W + s (x A) B: equal up to fp32 rounding, which
    # scales with the logits (measured 2026-12-01 over 200 random inputs and random adapters on this
    # model: worst 3.2e-6 of max|logits|; 1.2e-5 absolute once in CI at atol 1e-5, logits ~3.5). A merge
    # that left an adapter out is off by the adapter's effect (> 1e-4, asserted above).
    err = (merged_logits - peft_logits).abs().max()
    assert err <= 2e-5 * peft_logits.abs().max(), err
    assert "lora" not in " ".join(merged.state_dict())

    # Resumed without LoRA: refused before the model loads, from the run's config.yaml ...
    with pytest.raises(ValueError, match=r"^model.lora.r: 8 in the run that saved .* 0 now: a resumed run cannot"):
        train(config(tmp_path / "a", "teacher=ema", "steps=3"), Dist())
    # ... and by the checkpoint itself where no config.yaml says how it was made
    import shutil

    alone = shutil.copytree(ca, tmp_path / "elsewhere" / "checkpoints" / ca.name)
    with pytest.raises(ValueError, match="saved with LoRA .* set model.lora"):
        train(config(tmp_path / "c2", "teacher=ema", "steps=3", f"resume={alone}"), Dist())


def test_qwen3_stand_in_trains_with_lora_end_to_end(tmp_path, qwen3):
    train(config(tmp_path, f"model={qwen3}", *LORA, "steps=1", "condition=reference", "rollout.max_new_tokens=16"), Dist())
    ckpt = latest_checkpoint(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "hf", local_files_only=True)
    assert type(merged).__name__ == "Qwen3ForCausalLM"
    base = AutoModelForCausalLM.from_pretrained(qwen3, local_files_only=True).state_dict()
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert moved and all(any(t in k for t in LORA_TARGETS) for k in moved)  # only adapted projections


# ---------------------------------------------------------------- adapter paths, bad input

def save_adapter(path: Path, model_dir: Path, seed=0) -> dict[str, torch.Tensor]:
    """A LoRA adapter of `model_dir` with nonzero B (so it changes the model), in PEFT format."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(path)
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_adapter_path_starts_from_it_and_initial_teacher_keeps_it(tmp_path):
    saved = save_adapter(tmp_path / "adapter", DEFAULT_MODEL_DIR)
    cfg, policy, teacher, tok, opt, sched = built(f"model.lora.path={tmp_path / 'adapter'}", "teacher=initial")
    live = adapters(policy)
    assert live["default"].keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in live["default"].items())
    assert policy.lm.peft_config["default"].r == 4 and teacher.adapter == "initial"
    h0 = hidden(policy)
    train_steps(cfg, policy, teacher, tok, opt, sched, n=1)
    assert torch.equal(hidden(teacher), h0)  # the initial policy is base + the loaded adapter
    assert not torch.allclose(hidden(policy), h0, atol=1e-5)


def test_bad_targets_and_adapter_paths_name_the_key(tmp_path, qwen3):
    with pytest.raises(ValueError, match=r"^model.lora.target_modules: \['qkv_proj'\] match no module of "
                                         r"LlamaForCausalLM \(its Linear layers are named \[.*'q_proj'"):
        built(*LORA, "model.lora.target_modules=[q_proj, qkv_proj]")
    with pytest.raises(ValueError, match=r"^model.lora.path: .*nowhere does not exist"):
        built(f"model.lora.path={tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"^model.lora.path: .* is not a PEFT adapter"):
        built(f"model.lora.path={tmp_path}")
    save_adapter(tmp_path / "qwen3-adapter", qwen3)  # hidden size 64, the built-in model's is 96
    with pytest.raises(ValueError, match=r"^model.lora.path: the adapter in .*qwen3-adapter \(trained on .*\) does not fit model.path"):
        built(f"model.lora.path={tmp_path / 'qwen3-adapter'}")


def test_bf16_base_trains_fp32_adapters_with_activation_checkpointing():
    """model.dtype=bfloat16 works with LoRA: the base is bf16, the adapter (and its AdamW state,
    and an ema adapter) fp32, so updates of ~lr are not rounded away. Activation checkpointing
    (non-reentrant) passes gradients to the adapter although the embeddings are frozen."""
    cfg, policy, teacher, tok, opt, sched = built(*LORA, "model.dtype=bfloat16", "teacher=ema",
                                                  "model.activation_checkpointing=true")
    train_steps(cfg, policy, teacher, tok, opt, sched, n=1)
    assert {p.dtype for a in adapter_params(policy.lm).values() for p in a.values()} == {torch.float32}
    assert all(p.abs().sum() > 0 for n, p in adapter_params(policy.lm)["default"].items() if "lora_B" in n)
    assert {p.dtype for n, p in policy.lm.named_parameters() if ".lora_" not in n} == {torch.bfloat16}


# ---------------------------------------------------------------- FSDP2

def test_two_process_lora_matches_one_process(fsdp_parity):
    one_and_two_processes_match(*fsdp_parity["lora-ema"])  # critique, LoRA r=8, teacher=ema: tests/conftest.py


def test_two_process_lora_checkpoint_resumes_bitwise(tmp_path):
    out = tmp_path / "out.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "fsdp_lora_worker.py"), str(tmp_path / "run"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = torch.load(out, weights_only=False)
    assert r["world"] == 2 and any(".ema." in k for k in r["saved"])
    assert r["saved"].keys() == r["loaded"].keys() and all(torch.equal(v, r["loaded"][k]) for k, v in r["saved"].items())
    assert r["stats"][0] == r["stats"][1]
    assert all(torch.equal(v, r["after"][1][k]) for k, v in r["after"][0].items())
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    pm = PeftModel.from_pretrained(base, Path(r["path"]) / "adapter")  # PEFT format, both adapters
    pm.load_adapter(str(Path(r["path"]) / "adapter" / "ema"), adapter_name="ema")
    loaded = {n: p for a in adapter_params(pm).values() for n, p in a.items()}
    assert loaded.keys() == r["saved"].keys() and all(torch.equal(p, r["saved"][n]) for n, p in loaded.items())


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("engine", ["fastsd", "generate"])
def test_sampling_through_the_peft_model(engine):
    """A fresh adapter (B = 0) samples exactly what the base model samples; the engine passes its
    cache under the name the model underneath takes (no deprecated keyword through peft)."""
    prompts = [[21, 15, 22, 33, 3], [23, 10, 24, 3]]
    kw = dict(eos_id=1, pad_id=0, temperature=1.0, top_p=1.0, max_new_tokens=12, d=Dist(), engine=engine)
    _, policy, *_ = built(*LORA)
    base = Policy(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True))
    torch.manual_seed(0)
    want = sample(base, prompts, **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert sample(policy, prompts, **kw) == want
