"""On-policy sampling with transformers `generate` and its KV cache.

Prompts of different lengths are left-padded into one batch. Under FSDP2 the root's own
parameters (embeddings, final norm, head) are unsharded around the call, the decoder layers
unshard themselves, and `synced_gpus=True` keeps every rank stepping until all are done.
"""

from __future__ import annotations

import torch

from .batch import pad
from .dist import Dist


def cut_at_eos(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Response tokens up to and including the first EOS; trailing padding dropped."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    while tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens


@torch.no_grad()
def sample(policy, prompts: list[list[int]], *, eos_id: int, pad_id: int, temperature: float,
           top_p: float, max_new_tokens: int, d: Dist, batch_size: int = 256) -> list[list[int]]:
    """Sample one response per prompt from `policy.lm` (a Policy, possibly an FSDP root)."""
    lm = policy.lm
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    if d.enabled:
        policy.unshard()
    out: list[list[int]] = []
    try:
        # Ranks may hold different numbers of prompts; every rank runs the same number of calls.
        n_calls = d.all_max((len(prompts) + batch_size - 1) // batch_size)
        for c in range(n_calls):
            chunk = prompts[c * batch_size:(c + 1) * batch_size] or prompts[:1] or [[pad_id]]
            ids, attn = (t.to(device) for t in pad(chunk, pad_id, left=True))
            with policy.compute():
                gen = lm.generate(
                    input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature,
                    top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                    pad_token_id=pad_id, synced_gpus=d.enabled,
                )
            if c * batch_size < len(prompts):
                out += [cut_at_eos(row.tolist(), eos_id, pad_id) for row in gen[:, ids.shape[1]:].cpu()]
    finally:
        if d.enabled:
            policy.reshard()
        lm.train(was_training)
    return out
