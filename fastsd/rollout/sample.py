"""On-policy sampling: vLLM (`fastsd.rollout.vllm_engine`), fastsd's `RolloutEngine` (static KV cache,
fused decode step) or transformers `generate`.

Prompts of different lengths are left-padded into one batch. Under FSDP2 the root's own
parameters (embeddings, final norm, head) are unsharded around the call, the decoder layers
unshard themselves, and every rank keeps stepping until all are done (`synced_gpus=True` for
`generate`, an all-reduced "all done" for the engine). With `generate`, a stop sequence only
cuts the response afterwards.
"""

from __future__ import annotations

import torch
from transformers.generation.streamers import BaseStreamer

from ..model.batch import pad
from ..model.dist import Dist
from ..model.lora import base_model
from .engine import RolloutEngine, cut_at_eos, cut_at_stop
from .vllm_engine import hf_weights


class _Steps(BaseStreamer):
    """Tells `on_step(t)` each time `generate` has decoded its t-th new token (it hands a
    streamer the prompt first, then each new token)."""

    def __init__(self, on_step):
        self.on_step, self.calls = on_step, 0

    def put(self, value) -> None:
        if self.calls:
            self.on_step(self.calls)
        self.calls += 1

    def end(self) -> None:
        pass


def _engine(policy) -> RolloutEngine:
    """The policy's rollout engine, made on first use (it holds the compiled decode step). An
    FSDP2-sharded model runs it eagerly: its per-layer all-gathers do not fit in a CUDA graph."""
    if getattr(policy, "_rollout_engine", None) is None:
        from torch.distributed.fsdp import FSDPModule

        sharded = isinstance(policy, FSDPModule) or isinstance(policy.lm, FSDPModule)  # shard() wraps the Policy
        policy._rollout_engine = RolloutEngine(policy.lm, compile=False if sharded else None,
                                                autocast_weights=not sharded)
    return policy._rollout_engine


BATCH = 256  # prompts per sampler call, unless asked otherwise


def fitting_batch(lm, tokens: int, device: torch.device) -> int:
    """Samples per sampler call for `batch_size=0`: 256 (`BATCH`) on CUDA; on a CPU as many as keep
    their KV cache (keys and values of `tokens` positions in every layer, in the parameters' dtype)
    within 1 GiB, at most 1024 (a larger batch spreads each decode step's fixed cost: docs/rollouts.md)."""
    if device.type == "cuda":
        return BATCH
    config = base_model(lm).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    size = next(lm.parameters()).element_size()
    row = 2 * config.num_hidden_layers * kv_heads * dim * size * tokens
    return max(1, min(1024, (1 << 30) // row))


@torch.no_grad()
def sample(policy, prompts: list[list[int]], *, eos_id: int, pad_id: int, temperature: float,
           top_p: float, max_new_tokens: int, d: Dist, batch_size: int = BATCH, engine: str = "generate",
           stop: list[int] | None = None, stop_text: str | None = None, progress=None, logprobs: bool = False):
    """Sample one response per prompt from `policy.lm` (a Policy, possibly an FSDP root) with
    `engine` ("vllm", "fastsd" or "generate"); `stop`: token ids that also end a response (vllm
    matches `stop_text` on the decoded text instead). `progress`, if given, is called as
    progress(batches_done, batches) before the first batch, after each, and within one after each
    decode step (`batches_done` then fractional, below the batch's end until it is done). Returns the
    responses' token ids, and with `logprobs` also each token's log-prob under the sampling
    distribution (softmax(logits / temperature) in the top-p nucleus), one list per response.
    `batch_size`: prompts per sampler call (0: `fitting_batch`)."""
    if engine == "vllm":  # vLLM batches by itself: one call
        if progress is not None:
            progress(0, 1)
        policy.vllm.push(hf_weights(policy.lm))
        rows, lps = policy.vllm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, eos_id=eos_id, stop=stop_text, logprobs=logprobs)
        if progress is not None:
            progress(1, 1)
        return (rows, lps) if logprobs else rows
    lm = policy.lm
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    if d.enabled:
        policy.unshard()
    if batch_size == 0:
        batch_size = fitting_batch(lm, max(map(len, prompts or [[]])) + max_new_tokens, device)
    out: list[list[int]] = []
    out_lp: list[list[float]] = []
    try:
        # Ranks may hold different numbers of prompts; every rank runs the same number of calls.
        n_calls = d.all_max((len(prompts) + batch_size - 1) // batch_size)
        if progress is not None:
            progress(0, n_calls)
        for c in range(n_calls):
            chunk = prompts[c * batch_size:(c + 1) * batch_size] or prompts[:1] or [[pad_id]]
            on_step = None if progress is None else (lambda t, c=c: progress(c + t / (max_new_tokens + 1), n_calls))
            if engine == "fastsd":
                with policy.compute():
                    rows, lps = _engine(policy).generate(
                        chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        eos_id=eos_id, pad_id=pad_id, stop=stop, on_step=on_step,
                        all_done=(lambda mine: d.all_sum(float(not mine))[0] == 0) if d.enabled else None)
            else:
                ids, attn = (t.to(device) for t in pad(chunk, pad_id, left=True))
                with policy.compute():
                    gen = lm.generate(
                        input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature,
                        top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                        pad_token_id=pad_id, synced_gpus=d.enabled, streamer=_Steps(on_step) if on_step else None,
                        output_scores=logprobs, return_dict_in_generate=logprobs,
                    )
                seqs = gen.sequences if logprobs else gen
                rows = [cut_at_stop(cut_at_eos(row.tolist(), eos_id, pad_id), stop)
                        for row in seqs[:, ids.shape[1]:].cpu()]
                if logprobs:  # the scores are the warped logits: log_softmax gives the sampling distribution
                    lp = torch.stack([torch.log_softmax(s.float(), -1) for s in gen.scores], 1)
                    lp = lp.gather(-1, seqs[:, ids.shape[1]:, None]).squeeze(-1).cpu()
                    lps = [lrow[:len(row)] for row, lrow in zip(rows, lp.tolist())]
            if c * batch_size < len(prompts):
                out += rows
                out_lp += lps if logprobs else []
            if progress is not None:
                progress(c + 1, n_calls)
    finally:
        if d.enabled:
            policy.reshard()
        lm.train(was_training)
    return (out, out_lp) if logprobs else out
