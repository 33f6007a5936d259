"""Tests for fastsd.run.checkpoint: round trip, HF export, keep-K, interrupted writes, resume, FSDP2."""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastsd.run.checkpoint as ckpt
import fastsd.run.checkpoint_files as ckpt_files
from fastsd.model.load import build_tokenizer, tiny_config
from fastsd.run.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def make(tok, seed=0):
    """A tiny tied-embedding Qwen2 with an AdamW optimizer and a LambdaLR scheduler."""
    torch.manual_seed(seed)
    cfg = tiny_config(len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


IDS = torch.randint(0, 99, (2, 6), generator=torch.Generator().manual_seed(0))


def step(model, opt, sched):
    model(input_ids=IDS).logits.pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def save(run_dir, n, model, tok, opt, sched, keep=3, **kw):
    return save_checkpoint(run_dir, n, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                           state={"step": n}, keep=keep, **kw)


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def same_sd(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip(tok, tmp_path):
    model, opt, sched = make(tok)
    step(model, opt, sched)
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        teacher.model.norm.weight.add_(1.0)
    state = {"step": 3, "data_pos": 17, "first_eval": {"avg@k": 0.25, "k": 4}, "note": None}
    path = save_checkpoint(tmp_path, 3, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                           state=state, teacher=teacher, keep=2)
    assert path == tmp_path / "checkpoints" / "step_00000003"
    assert (path / "COMPLETE").is_file() and (path / "rng_rank0.pt").is_file()
    assert (path / "teacher.safetensors").is_file() and (path / "trainer_state.pt").is_file()
    expected_draws = draws()
    expected_opt, expected_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()
    step(model, opt, sched)  # the continuation the restored run must reproduce

    model2, opt2, sched2 = make(tok, seed=1)
    teacher2 = make(tok, seed=2)[0].requires_grad_(False)
    draws()  # move the RNGs on
    got = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, teacher=teacher2)
    assert got == state
    assert draws() == expected_draws
    assert same_sd(teacher2.state_dict(), teacher.state_dict())
    assert sched2.state_dict() == expected_sched
    got_opt = opt2.state_dict()
    assert got_opt["param_groups"] == expected_opt["param_groups"]
    for i, s in expected_opt["state"].items():
        assert same_sd(got_opt["state"][i], s)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # tie survives loading
    step(model2, opt2, sched2)
    assert same_sd(model2.state_dict(), model.state_dict())


def test_hf_export_loads_with_from_pretrained(tok, tmp_path):
    model, opt, sched = make(tok)
    step(model, opt, sched)
    path = save(tmp_path, 1, model, tok, opt, sched)
    loaded = AutoModelForCausalLM.from_pretrained(path / "hf", local_files_only=True)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    tok2 = AutoTokenizer.from_pretrained(path / "hf", local_files_only=True)
    assert tok2("1+2=3")["input_ids"] == tok("1+2=3")["input_ids"]


def test_unstepped_optimizer_is_not_touched(tok, tmp_path):
    model, opt, sched = make(tok)
    path = save(tmp_path, 0, model, tok, opt, sched)
    assert not opt.state  # saving did not take a hidden zero-lr step
    model2, opt2, sched2 = make(tok, seed=1)
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert not opt2.state and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    step(model, opt, sched), step(model2, opt2, sched2)
    assert same_sd(model2.state_dict(), model.state_dict())


def test_keep_last_k(tok, tmp_path):
    model, opt, sched = make(tok)
    for n in (1, 2, 3, 4):
        save(tmp_path, n, model, tok, opt, sched, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path) == root / "step_00000004"
    # a lower step saved after higher ones is kept too (never delete what was just written)
    save(tmp_path, 2, model, tok, opt, sched, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003", "step_00000004"]


def test_resave_same_step_replaces_it(tok, tmp_path):
    model, opt, sched = make(tok)
    save(tmp_path, 5, model, tok, opt, sched)
    step(model, opt, sched)
    path = save(tmp_path, 5, model, tok, opt, sched)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_00000005"]
    model2 = make(tok, seed=1)[0]
    load_checkpoint(path, model=model2)
    assert same_sd(model2.state_dict(), model.state_dict())


def test_interrupted_write_is_never_latest(tok, tmp_path, monkeypatch):
    model, opt, sched = make(tok)
    first = save(tmp_path, 1, model, tok, opt, sched)
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if str(f).endswith("trainer_state.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, tok, opt, sched)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # the failed tmp dir is gone

    # what a hard crash leaves: a tmp dir (even one already holding COMPLETE), a dir without COMPLETE
    (root / "step_00000007.tmp-dead").mkdir()
    (root / "step_00000007.tmp-dead" / "COMPLETE").write_text("{}")
    (root / "step_00000008").mkdir()
    (root / "step_00000009.old-dead").mkdir()
    (root / "step_00000009.old-dead" / "COMPLETE").write_text("{}")
    assert latest_checkpoint(tmp_path) == first
    assert resolve_resume("auto", tmp_path) == first
    with pytest.raises(ValueError, match="path: .*step_00000008 is not a complete checkpoint"):
        load_checkpoint(root / "step_00000008", model=model)

    # the next successful save cleans up stale tmp/old dirs (not the unknown incomplete one)
    save(tmp_path, 3, model, tok, opt, sched)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000003", "step_00000008"]


def test_failure_while_publishing_keeps_previous(tok, tmp_path, monkeypatch):
    model, opt, sched = make(tok)
    first = save(tmp_path, 1, model, tok, opt, sched)

    def crash(tmp, final):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_files, "publish", crash)  # seal() looks it up there
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, tok, opt, sched)
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


def test_resolve_resume(tok, tmp_path):
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "missing") is None
    model, opt, sched = make(tok)
    path = save(tmp_path, 4, model, tok, opt, sched)
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume("auto", tmp_path) == path
    assert resolve_resume(str(path), "elsewhere") == path
    with pytest.raises(ValueError, match="resume: .*nope.* does not exist"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="resume: .*half.* is not a complete checkpoint"):
        resolve_resume(str(tmp_path / "half"), tmp_path)


def test_load_errors(tok, tmp_path):
    model, opt, sched = make(tok)
    with pytest.raises(ValueError, match=f"path: {tmp_path / 'x'} does not exist"):
        load_checkpoint(tmp_path / "x", model=model)
    path = save(tmp_path, 1, model, tok, opt, sched)
    with pytest.raises(ValueError, match="no teacher.safetensors"):
        load_checkpoint(path, model=model, teacher=copy.deepcopy(model))
    other = AutoModelForCausalLM.from_config(tiny_config(len(tok), hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, num_key_value_heads=1,
                                                         intermediate_size=64))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(path, model=other)
    (path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no .safetensors weights"):
        load_checkpoint(path, model=model)


def test_argument_errors(tok, tmp_path):
    model, opt, sched = make(tok)
    with pytest.raises(ValueError, match="^keep:"):
        save(tmp_path, 1, model, tok, opt, sched, keep=0)
    with pytest.raises(ValueError, match="^step:"):
        save(tmp_path, -1, model, tok, opt, sched)
    with pytest.raises(ValueError, match="^state:"):
        save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                        state={"bad": object()}, keep=1)
    assert latest_checkpoint(tmp_path) is None


def test_fsdp2_two_ranks(tmp_path, tok):
    """torchrun, 2 ranks, gloo: save a sharded model + teacher + AdamW state, load into fresh
    sharded objects (checks in the worker); then load the same checkpoint in this single process."""
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "tests" / "fsdp_checkpoint_worker.py"), str(tmp_path), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert all(result["checks"].values()), result["checks"]

    path = Path(result["path"])
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE", "hf", "rng_rank0.pt", "rng_rank1.pt", "teacher.safetensors", "trainer_state.pt"]
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    model, opt, sched = make(tok, seed=3)
    teacher = make(tok, seed=4)[0]
    state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, teacher=teacher)
    assert state == {"step": 1, "pos": 5}
    assert same_sd(model.state_dict(), expected["model"])
    assert same_sd(teacher.state_dict(), expected["teacher"])
    names = [n for n, _ in model.named_parameters()]
    for i, s in opt.state_dict()["state"].items():
        assert same_sd(s, expected["optimizer"]["state"][names[i]])
    hf = AutoModelForCausalLM.from_pretrained(path / "hf", local_files_only=True)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=expected["ids"]).logits, model(input_ids=expected["ids"]).logits)
