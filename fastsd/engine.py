"""On-policy sampling with a static KV cache and a fused decode step.

`RolloutEngine(lm)` samples from a transformers causal LM with its current weights (no copy).
Prompts of different lengths are left-padded into one batch; the KV cache is preallocated for
prompt + `max_new_tokens` (transformers `StaticCache`), so every decode step has the same shapes.
One decode step = one forward of the new tokens + sampling, with no host synchronisation:

    temperature (0: greedy) -> top-p (keep the smallest set of most likely tokens whose
    probability reaches top_p, as transformers' TopPLogitsWarper) -> a sample by the
    exponential race argmax(p / E), E ~ Exp(1), which draws exactly from p

On CUDA the step is compiled (`torch.compile(mode="reduce-overhead")`: CUDA graphs) unless
`compile=False`; its outputs are copied out before the next replay. A sequence finishes at EOS or
at the end of a stop sequence (e.g. the answer tag's token ids); finished rows keep stepping
(padding, cheap) until all are done, which is checked every `check_every` steps. `all_done` lets
FSDP ranks agree, so every rank runs the same number of forwards.

Returns per prompt the response token ids (up to and including EOS or the stop sequence) and the
log-probability of each under the distribution it was sampled from (after temperature and top-p).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch
from transformers import StaticCache

from .batch import pad

__all__ = ["RolloutEngine", "sample_next"]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token [B] and its log-prob [B] under softmax(logits / temperature) restricted to the top-p
    nucleus (renormalised); temperature 0 is greedy (log-prob 0)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    logp = torch.log_softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_lp, order = logp.sort(-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the strictly more likely tokens
        drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
    race = torch.empty_like(logp).exponential_()
    token = (logp.exp() / race).argmax(-1)
    return token, logp.gather(-1, token[:, None])[:, 0]


class RolloutEngine:
    """Static-cache sampler for `lm` (see the module docstring)."""

    def __init__(self, lm, *, compile: bool | None = None, check_every: int = 16):
        self.lm = lm
        device = next(lm.parameters()).device
        self.compile = device.type == "cuda" if compile is None else compile
        self.check_every = check_every
        # transformers renamed past_key_values to cache (5.2x); use whichever this version takes
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self._step = torch.compile(self._decode, mode="reduce-overhead", dynamic=False) if self.compile else self._decode

    def _forward(self, ids, attn, pos, cache_pos, cache):
        out = self.lm(input_ids=ids, attention_mask=attn, position_ids=pos, cache_position=cache_pos,
                      use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1]

    def _decode(self, tok, attn, pos, cache_pos, cache, temperature: float, top_p: float):
        return sample_next(self._forward(tok[:, None], attn, pos[:, None], cache_pos, cache), temperature, top_p)

    def _decode_step(self, *args):
        if not self.compile:
            return self._decode(*args)
        torch.compiler.cudagraph_mark_step_begin()
        try:
            tok, lp = self._step(*args)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not cost the run
            warnings.warn(f"fastsd.engine: the compiled decode step failed ({type(e).__name__}: {e}); "
                          "decoding eagerly from now on")
            self.compile, self._step = False, self._decode
            return self._decode(*args)  # rewrites the same cache slot: idempotent
        return tok.clone(), lp.clone()  # CUDA graph outputs are overwritten by the next replay

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 eos_id: int, pad_id: int, stop: list[int] | None = None,
                 all_done: Callable[[bool], bool] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: expected at least one prompt, each with at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        device = next(self.lm.parameters()).device
        ids, prompt_attn = (t.to(device) for t in pad(prompts, pad_id, left=True))
        B, P = ids.shape
        total = P + max_new_tokens
        attn = torch.zeros(B, total, dtype=torch.long, device=device)
        attn[:, :P] = prompt_attn
        cache = StaticCache(config=self.lm.config, max_cache_len=total)
        pos = (prompt_attn.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, attn, pos, torch.arange(P, device=device), cache)
        tok, lp = sample_next(logits, temperature, top_p)
        pos = pos[:, -1]
        stop_t = torch.tensor(stop or [], dtype=torch.long, device=device)
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logps = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        steps = max_new_tokens
        for t in range(max_new_tokens):
            tok = torch.where(done, pad_id, tok)
            tokens[:, t] = tok
            logps[:, t] = torch.where(done, 0.0, lp)
            done = done | (tok == eos_id)
            if len(stop_t) and t + 1 >= len(stop_t):
                done = done | (tokens[:, t + 1 - len(stop_t):t + 1] == stop_t).all(-1)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % self.check_every == 0:
                finished = bool(done.all())
                if (all_done(finished) if all_done is not None else finished):
                    steps = t + 1
                    break
            attn[:, P + t] = 1
            pos = pos + 1
            tok, lp = self._decode_step(tok, attn, pos, torch.tensor([P + t], device=device), cache, temperature, top_p)
        return self._rows(tokens[:, :steps], logps[:, :steps], eos_id, stop or [])

    @staticmethod
    def _rows(tokens, logps, eos_id, stop) -> tuple[list[list[int]], list[list[float]]]:
        out_t, out_l = [], []
        for row, lrow in zip(tokens.tolist(), logps.tolist()):
            end = len(row)
            if eos_id in row:
                end = row.index(eos_id) + 1
            n = len(stop)
            for i in range(n, end + 1) if n else ():
                if row[i - n:i] == stop:
                    end = i
                    break
            out_t.append(row[:end])
            out_l.append(lrow[:end])
        return out_t, out_l
