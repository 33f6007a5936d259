"""The rollout engine against transformers `generate` on the shipped tiny model (CPU, eager):
greedy token for token, sampled statistically, its log-probs, top-p, stop sequences, and the
trainer on the engine (one process here; two under torchrun in
tests/test_train.py, where the engine is the CPU default)."""

from __future__ import annotations

import gc
import weakref
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from fastsd.config import load_config
from fastsd.feedback.prompts import student_prompt
from fastsd.model.batch import pad
from fastsd.model.dist import Dist
from fastsd.model.load import DEFAULT_MODEL_DIR, load_model_and_tokenizer
from fastsd.rollout.engine import RolloutEngine, sample_next
from fastsd.rollout.sample import cut_at_eos
from fastsd.tasks.data import builtin_split
from fastsd.train import train


@pytest.fixture(scope="module")
def model():
    lm, tok = load_model_and_tokenizer(DEFAULT_MODEL_DIR, dtype=torch.float32)
    return lm.eval(), tok


def prompts_for(tok, n, seed=0):
    return [tok(student_prompt(ex.question), add_special_tokens=False)["input_ids"] for ex in builtin_split("test", n, seed)]


def hf_generate(lm, tok, prompts, **kw):
    ids, attn = (t.to(lm.device) for t in pad(prompts, tok.pad_token_id, left=True))
    with torch.no_grad():
        gen = lm.generate(input_ids=ids, attention_mask=attn, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **kw)
    return [cut_at_eos(r.tolist(), tok.eos_token_id, tok.pad_token_id) for r in gen[:, ids.shape[1]:]]


def test_greedy_equals_generate_token_for_token(model):
    lm, tok = model
    prompts = prompts_for(tok, 12)
    assert len({len(p) for p in prompts}) > 2  # prompts of different lengths in one batch
    got, lps = RolloutEngine(lm).generate(prompts, max_new_tokens=320, temperature=0, eos_id=tok.eos_token_id,
                                          pad_id=tok.pad_token_id)
    want = hf_generate(lm, tok, prompts, do_sample=False, max_new_tokens=320)
    assert got == want
    assert all(r[-1] == tok.eos_token_id or len(r) == 320 for r in got)  # stopped at EOS, nothing after
    assert sum(r[-1] == tok.eos_token_id for r in got) >= len(got) // 2
    assert [len(x) for x in lps] == [len(r) for r in got]


def _frequencies(rows, positions):
    return [Counter(r[i] if i < len(r) else -1 for r in rows) for i in range(positions)]


def _tv(a: Counter, b: Counter, n: int) -> float:
    return 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / n


def test_samples_follow_the_same_distribution_as_generate(model):
    lm, tok = model
    prompt = prompts_for(tok, 1, seed=3)[0]
    n, positions = 1200, 40
    torch.manual_seed(0)
    ours, _ = RolloutEngine(lm).generate([prompt] * n, max_new_tokens=positions, temperature=1.1, top_p=0.9,
                                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    torch.manual_seed(1)
    theirs = hf_generate(lm, tok, [prompt] * n, do_sample=True, temperature=1.1, top_p=0.9, top_k=0,
                         max_new_tokens=positions)
    torch.manual_seed(2)
    hotter = hf_generate(lm, tok, [prompt] * n, do_sample=True, temperature=2.0, top_p=1.0, top_k=0,
                         max_new_tokens=positions)
    f_ours, f_theirs, f_hot = (_frequencies(r, positions) for r in (ours, theirs, hotter))
    same = [_tv(a, b, n) for a, b in zip(f_ours, f_theirs)]
    other = [_tv(a, b, n) for a, b in zip(f_theirs, f_hot)]
    # Two samples of 1200 from one distribution: total variation well under 0.06 per position
    # (seen: at most 0.037). The test can fail: generate at temperature 2.0 is 0.84 away at some
    # position. (Temperature 0.6 was, 0.30, on the checkpoint shipped before 2026-12-01; the
    # one since is so sure of this prompt that 0.6 moves it by 0.15 at most: 2.0 is the contrast.)
    assert max(same) < 0.06, same
    assert max(other) > 0.15, other


def test_sampling_log_probs_are_those_of_the_sampled_distribution(model):
    lm, tok = model
    prompts = prompts_for(tok, 4, seed=5)
    torch.manual_seed(0)
    rows, lps = RolloutEngine(lm).generate(prompts, max_new_tokens=40, temperature=1.3, eos_id=tok.eos_token_id,
                                           pad_id=tok.pad_token_id)
    for p, r, lp in zip(prompts, rows, lps):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1].double()
        want = torch.log_softmax(logits / 1.3, -1).gather(1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), want, atol=1e-4)


def test_top_p_keeps_the_same_nucleus_as_transformers():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    for top_p in (0.3, 0.75, 0.95):
        kept_hf = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        seen = torch.zeros_like(kept_hf)
        for _ in range(300):
            tok, lp = sample_next(logits, 1.0, top_p)
            seen[torch.arange(64), tok] = True
            assert torch.isfinite(lp).all()
        assert not (seen & ~kept_hf).any()  # never a token outside transformers' nucleus
    tok, lp = sample_next(torch.tensor([[0.0, 5.0, 1.0]]), 0, 1.0)
    assert tok.tolist() == [1] and lp.tolist() == [0.0]  # greedy


def test_stop_sequence_ends_a_response(model):
    lm, tok = model
    stop = tok("</answer>", add_special_tokens=False)["input_ids"]
    rows, _ = RolloutEngine(lm).generate(prompts_for(tok, 6), max_new_tokens=320, temperature=0,
                                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, stop=stop)
    texts = [tok.decode(r) for r in rows]
    assert all(t.endswith("</answer>") and tok.eos_token_id not in r for t, r in zip(texts, rows)), texts


def test_bad_arguments(model):
    lm, tok = model
    eng = RolloutEngine(lm)
    with pytest.raises(ValueError, match="prompts"):
        eng.generate([[]], max_new_tokens=4, temperature=1.0, eos_id=0, pad_id=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([[1]], max_new_tokens=0, temperature=1.0, eos_id=0, pad_id=0)


SMALL = ["steps=2", "questions_per_step=2", "eval.k=2", "data.eval_size=2", "data.train_size=16",
         "rollout.max_new_tokens=40", "optim.micro_batch=2", "rollout.engine=fastsd"]


def test_trainer_runs_on_the_engine(tmp_path, caplog):
    with caplog.at_level("INFO", logger="fastsd"):
        train(load_config(overrides=[*SMALL, f"run_dir={tmp_path}", "rollout.stop_at_answer=true",
                                     "rollout.max_new_tokens=120"]), Dist())
    assert "rollouts: fastsd, eager, the written decode step" in caplog.text  # the CPU's default
    import json

    rolls = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(rolls) == 4 and all(r["response"] for r in rolls)
    assert all(r["response"].endswith("</answer>") for r in rolls if "</answer>" in r["response"])


def test_compiled_step_matches_eager_and_keeps_to_one_shape(model):
    """torch.compile on the CPU (no CUDA graphs here): the same greedy output as eager, and batches
    of 7 and 5 share one padded shape, so one cache. Without a working compiler the engine warns
    and decodes eagerly, which must give the same output too."""
    lm, tok = model
    prompts = prompts_for(tok, 7)
    kw = dict(max_new_tokens=48, temperature=0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    want, _ = RolloutEngine(lm, compile=False).generate(prompts, **kw)
    eng = RolloutEngine(lm, compile=True)
    assert eng.generate(prompts, **kw)[0] == want
    assert eng.generate(prompts[:5], **kw)[0] == want[:5]
    if eng.compile:  # compiled for real
        assert list(eng._caches) == [(8, 64 + 48, None)]


def test_a_failing_compiled_step_falls_back_to_eager(model):
    lm, tok = model
    prompts = prompts_for(tok, 3)
    kw = dict(max_new_tokens=40, temperature=0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    want, _ = RolloutEngine(lm, compile=False).generate(prompts, **kw)
    eng = RolloutEngine(lm, compile=True)

    def broken(*args):
        raise RuntimeError("no compiler")

    eng._step = broken
    with pytest.warns(UserWarning, match="decoding eagerly"):
        got, _ = eng.generate(prompts, **kw)
    assert got == want and not eng.compile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_on_cuda_the_compiled_step_with_cuda_graphs_samples_like_generate(model):
    """The default CUDA path (torch.compile, reduce-overhead: CUDA graphs, replayed every step):
    greedy output equal to eager decoding, and the random draws advance on every replay (the
    sampled tokens follow generate's distribution, not one frozen draw)."""
    lm_cpu, tok = model
    lm = lm_cpu.to("cuda")
    try:
        prompts = prompts_for(tok, 7)
        kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        eng = RolloutEngine(lm)
        assert eng.compile
        want, _ = RolloutEngine(lm, compile=False).generate(prompts, max_new_tokens=64, temperature=0, **kw)
        assert eng.generate(prompts, max_new_tokens=64, temperature=0, **kw)[0] == want
        prompt = prompts_for(tok, 1, seed=3)[0]
        n, positions = 1024, 40  # a power of two: the compiled path pads the batch to one
        torch.manual_seed(0)
        ours, _ = eng.generate([prompt] * n, max_new_tokens=positions, temperature=1.1, **kw)
        assert eng.compile  # still compiled: no fallback to eager happened
        torch.manual_seed(1)
        theirs = hf_generate(lm, tok, [prompt] * n, do_sample=True, temperature=1.1, top_k=0,
                             max_new_tokens=positions)
        same = [_tv(a, b, n) for a, b in zip(_frequencies(ours, positions), _frequencies(theirs, positions))]
        assert max(same) < 0.06, same
    finally:
        lm_cpu.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_on_cuda_under_autocast_the_graphs_read_the_refreshed_copy(model):
    """The trainer's one-GPU mode: fp32 parameters, bf16 autocast, CUDA graphs over the bf16 copy.
    Same tokens as the compiled step that casts on every step, before and after an update."""
    _, tok = model
    lm = _fresh_model().to("cuda")
    prompts = prompts_for(tok, 8)
    kw = dict(max_new_tokens=32, temperature=0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    plain, eng = RolloutEngine(lm, autocast_weights=False), RolloutEngine(lm)

    def run(e):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return e.generate(prompts, **kw)[0]

    before = run(plain)
    assert run(eng) == before and eng._weights and eng.compile
    with torch.no_grad():
        lm.lm_head.weight.neg_()
    after = run(plain)
    assert run(eng) == after != before and eng.compile


def _fresh_model():
    lm, _ = load_model_and_tokenizer(DEFAULT_MODEL_DIR, dtype=torch.float32)
    return lm.eval()


def test_compiled_under_autocast_decodes_with_a_refreshed_low_precision_copy(model):
    """fp32 parameters under bf16 autocast (the trainer's single-process CUDA mode, here on the
    CPU): the compiled engine decodes with a bf16 copy of the Linear weights, refreshed each call,
    and gives exactly what autocast gives (tokens and log-probs), also after the weights change in
    place; the copy is what it reads (corrupting it changes the output); eager decoding, where
    autocast caches its casts for the call anyway, makes no copy."""
    _, tok = model
    lm = _fresh_model()
    prompts = prompts_for(tok, 8)
    kw = dict(max_new_tokens=24, temperature=1.2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    plain = RolloutEngine(lm, compile=True, autocast_weights=False)
    eng, eager = RolloutEngine(lm, compile=True), RolloutEngine(lm, compile=False)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731 (a new one: autocast caches its casts)

    def run(e):
        torch.manual_seed(0)
        with bf16():
            return e.generate(prompts, **kw)

    want, got = run(plain), run(eng)
    assert got == want
    assert "lm_head.weight" in eng._weights and not any("embed" in n for n in eng._weights)
    assert {w.dtype for w in eng._weights.values()} == {torch.bfloat16}
    run(eager)
    assert eager._weights == {}
    with torch.no_grad():  # an optimizer step, in effect
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    want2, got2 = run(plain), run(eng)
    assert got2 == want2 and got2[0] != got[0]  # the copy followed the update
    refresh = eng._refresh_weights

    def corrupted(device):
        refresh(device)
        eng._weights["lm_head.weight"].neg_()

    eng._refresh_weights = corrupted
    assert run(eng)[0] != want2[0]  # it decodes with the copy
    eng._refresh_weights = refresh
    eng.generate(prompts, **kw)
    assert eng._weights == {}  # no autocast: the parameters as they are


def test_static_cache_values_keep_their_dtype_on_older_transformers(model, monkeypatch):
    """transformers before 5.2x (5.17 is on the GPU image) allocated a static layer's values in
    the keys' dtype; under autocast the keys are fp32 and the values bf16, and decoding failed."""
    from transformers.cache_utils import StaticLayer

    real = StaticLayer.lazy_initialization

    def older(self, key_states, value_states):
        real(self, key_states, value_states.to(key_states.dtype))

    monkeypatch.setattr(StaticLayer, "lazy_initialization", older)
    lm, tok = model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows, _ = RolloutEngine(lm, compile=False, written_step=False).generate(
            prompts_for(tok, 3), max_new_tokens=8, temperature=0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert len(rows) == 3 and all(rows)


def test_eager_decoding_keeps_one_cache_and_frees_the_last_at_once(model):
    """Eager shapes change with every prompt width: a cache kept per shape only costs memory (the
    default run's evaluation held four of 220 MB each). A dropped cache is freed when it is
    dropped, before the next one is allocated, not at the garbage collector's next run."""
    lm, tok = model
    kw = dict(max_new_tokens=8, temperature=1.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    shapes = {(n, max(map(len, prompts_for(tok, n, seed=n)))) for n in (1, 2, 3)}
    assert len(shapes) == 3  # three calls, three shapes
    eng = RolloutEngine(lm, compile=False, written_step=False)  # transformers' forward on a static cache
    gc.disable()
    try:
        eng.generate(prompts_for(tok, 1, seed=1), **kw)
        first = weakref.ref(next(iter(eng._caches.values())).layers[0].keys)  # a tensor of the cache
        for n in (2, 3):
            eng.generate(prompts_for(tok, n, seed=n), **kw)
        assert first() is None
    finally:
        gc.enable()
    assert len(eng._caches) == 1
