"""On-policy sampling with a preallocated KV cache and a fused decode step.

`RolloutEngine(lm)` samples from a transformers causal LM with its current weights (the model
being trained, so there is no second model and no weight sync).
Prompts of different lengths are left-padded into one batch; the KV cache is preallocated for
prompt + `max_new_tokens` (transformers `StaticCache`), so every decode step has the same shapes.
One decode step = one forward of the new tokens + sampling, with no host synchronisation:

    temperature (0: greedy) -> top-p (keep the smallest set of most likely tokens whose
    probability reaches top_p, as transformers' TopPLogitsWarper) -> a sample by the
    exponential race argmax(p / E), E ~ Exp(1), which draws exactly from p

On CUDA the step is compiled (`torch.compile(mode="reduce-overhead")`: CUDA graphs) unless
`compile=False`; its outputs are copied out before the next replay. To keep to a few shapes (each
new one compiles and records again), the compiled path pads the batch to a power of two and the
prompts to a multiple of 64 tokens, and reuses one cache per shape. If compiling fails, the call
starts over eagerly (with a warning) and stays eager. A sequence finishes at EOS or
at the end of a stop sequence (e.g. the answer tag's token ids); finished rows keep stepping
(padding) until all are done, which is checked every `check_every` steps. `all_done` lets
FSDP ranks agree, so every rank runs the same number of forwards.

On CPUs, models of the Llama layout (llama, qwen2, qwen3) decode with the step written out in
`fastsd.rollout.decode` instead (`written_step`; default: on a CPU where the model fits it, never
compiled): transformers runs the prompt, the written step each new token, over its own cache
(not the static one above), and finished rows are dropped from the batch whenever a quarter of
it is done (at the checks every `check_every` steps), so a row's random draws depend on which
rows are still running.

Under autocast with fp32 parameters (the trainer's single-process CUDA mode: bf16 compute), a
compiled decode step would cast every weight again on every step (eager autocast caches its
casts for the call; a compiled graph does not): 8 bytes moved per parameter instead of 2, in a
step bound by reading the weights. So a compiled engine first refreshes, in place, a copy of the
fp32 nn.Linear weights and biases in the autocast dtype (exactly the values autocast would make;
embeddings and norms stay as autocast leaves them) and decodes with those. It costs one cast
per call and the memory of the copy; `autocast_weights=False` turns it off.

Returns per prompt the response token ids (up to and including EOS or the stop sequence) and the
log-probability of each under the distribution it was sampled from (after temperature and top-p).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from ..model.batch import pad
from ..model.lora import base_model
from .decode import StepDecoder

__all__ = ["RolloutEngine", "sample_next", "cut_at_eos", "cut_at_stop"]


def cut_at_eos(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Response tokens up to and including the first EOS; trailing padding dropped."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    while tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens


def cut_at_stop(tokens: list[int], stop: list[int] | None) -> list[int]:
    """Tokens up to and including the first occurrence of `stop` (unchanged without one)."""
    n = len(stop or [])
    for i in range(n, len(tokens) + 1) if n else ():
        if tokens[i - n:i] == stop:
            return tokens[:i]
    return tokens


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


class _CompileFailed(RuntimeError):
    pass


def _values_keep_their_dtype(cache: StaticCache) -> StaticCache:
    """Under autocast with fp32 weights the keys leave RoPE in fp32 and the values leave v_proj in
    bf16. transformers before 5.2x allocates a static layer's values in the keys' dtype, and the
    first update then fails ("index_copy_(): self and source expected to have the same dtype");
    later versions size each from its own states. Make the older ones do the same (attention
    layers only: the layers of linear-attention models initialise differently)."""
    for layer in cache.layers:
        if not isinstance(layer, StaticLayer):
            continue

        # weakly: the layer holds this function, and a cycle would keep a dropped cache's memory
        # until the garbage collector runs (a new cache of the next shape is allocated before)
        def init(*args, _ref=weakref.ref(layer), _init=type(layer).lazy_initialization, **kwargs):
            _layer = _ref()
            _init(_layer, *args, **kwargs)
            value_states = kwargs.get("value_states", args[1] if len(args) > 1 else None)
            values = getattr(_layer, "values", None)
            if isinstance(value_states, torch.Tensor) and isinstance(values, torch.Tensor) \
                    and values.dtype != value_states.dtype:
                _layer.values = torch.zeros_like(_layer.values, dtype=value_states.dtype)
                if not torch.compiler.is_compiling():
                    torch._dynamo.mark_static_address(_layer.values)

        layer.lazy_initialization = init
    return cache


class RolloutEngine:
    """Static-cache sampler for `lm` (see the module docstring)."""

    def __init__(self, lm, *, compile: bool | None = None, check_every: int = 16, autocast_weights: bool = True,
                 written_step: bool | None = None):
        self.lm = lm
        device = next(lm.parameters()).device
        self.compile = device.type == "cuda" if compile is None else compile
        # eager: fastsd.rollout.decode's step on a CPU where the model has its layout (False: transformers' forward)
        if written_step and not StepDecoder.fits(lm):
            raise ValueError("written_step: the model does not have the layout of fastsd.rollout.decode "
                             f"({', '.join(StepDecoder.LAYOUTS)}; no sliding window, not under FSDP2, LoRA only)")
        self.written_step = self.written_by_default(lm) if written_step is None else written_step
        self.check_every = check_every
        self.autocast_weights = autocast_weights
        self._weights: dict[str, torch.Tensor] = {}  # the autocast-dtype copies, refreshed per call
        # transformers renamed past_key_values to cache (5.2x); use whichever this version takes
        # (a peft model's forward passes **kwargs on: ask the model underneath)
        base = base_model(lm)
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self._step = torch.compile(self._decode, mode="reduce-overhead", dynamic=False) if self.compile else self._decode
        self._caches: dict[tuple, StaticCache] = {}

    @staticmethod
    def written_by_default(lm) -> bool:
        """Whether an eager engine decodes `lm` with the written step unless told (`written_step`):
        on a CPU, where the model has its layout."""
        return next(lm.parameters()).device.type == "cpu" and StepDecoder.fits(lm)

    def _forward(self, ids, attn, pos, cache_pos, cache):
        kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, cache_position=cache_pos,
                  use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        if self._weights:  # tie_weights=False: a tied embedding keeps its own (uncast) weight
            out = torch.func.functional_call(self.lm, self._weights, kwargs=kw, tie_weights=False)
        else:
            out = self.lm(**kw)
        return out.logits[:, -1]

    def _refresh_weights(self, device) -> None:
        """Refresh the autocast-dtype copy of the fp32 nn.Linear parameters, in place (see the
        module docstring); none when eager, without autocast, or with nothing in fp32."""
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        linear = {} if not (self.compile and self.autocast_weights and dtype) else {
            f"{m}.{n}": p for m, mod in self.lm.named_modules() if isinstance(mod, torch.nn.Linear)
            for n, p in mod.named_parameters(recurse=False) if p.dtype == torch.float32}
        layout = {name: (p.shape, p.device, dtype) for name, p in linear.items()}
        if layout != {name: (w.shape, w.device, w.dtype) for name, w in self._weights.items()}:
            self._weights = {}  # dropped before the new copy is made
            self._weights = {name: torch.empty_like(p, dtype=dtype) for name, p in linear.items()}
            for w in self._weights.values():  # fixed addresses: CUDA graphs read them in place
                torch._dynamo.mark_static_address(w)
        for name, p in linear.items():
            self._weights[name].copy_(p.detach())

    def _decode(self, tok, attn, pos, cache_pos, cache, temperature: float, top_p: float):
        return sample_next(self._forward(tok[:, None], attn, pos[:, None], cache_pos, cache), temperature, top_p)

    def _decode_step(self, *args):
        if not self.compile:
            return self._decode(*args)
        torch.compiler.cudagraph_mark_step_begin()
        try:
            tok, lp = self._step(*args)
        except torch.OutOfMemoryError:
            raise  # the caller's to handle: not a reason to stop compiling
        except Exception as e:  # noqa: BLE001 - a compiler failure must not cost the run
            raise _CompileFailed(f"{type(e).__name__}: {e}") from e
        return tok.clone(), lp.clone()  # CUDA graph outputs are overwritten by the next replay

    def _cache(self, batch: int, length: int, device) -> StaticCache:
        """A zeroed static cache for `batch` x `length`, reused across calls of the same shape (a
        new one would make the compiled step record new CUDA graphs) and compute dtype (the cache
        takes the dtype of the first keys written to it). The compiled step keeps up to 4 shapes;
        eager decoding keeps only the last one: its prompts' widths vary from call to call, and an
        evaluation's batch of 256 samples holds a cache of about 220 MB on the shipped model."""
        autocast = torch.is_autocast_enabled(device.type)
        key = (batch, length, torch.get_autocast_dtype(device.type) if autocast else None)
        if key not in self._caches:
            while len(self._caches) >= (4 if self.compile else 1):
                self._caches.pop(next(iter(self._caches)))
            self._caches[key] = _values_keep_their_dtype(StaticCache(config=self.lm.config, max_cache_len=length))
        cache = self._caches[key]
        cache.reset()
        return cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 eos_id: int, pad_id: int, stop: list[int] | None = None,
                 all_done: Callable[[bool], bool] | None = None,
                 on_step: Callable[[int], None] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Sample a response to each prompt (see the module docstring); `on_step(t)`, if given, is
        called after the t-th new token of every row is drawn."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: expected at least one prompt, each with at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        args = (prompts, max_new_tokens, temperature, top_p, eos_id, pad_id, stop or [], all_done, on_step)
        try:
            return self._generate(*args)
        except _CompileFailed as e:  # start over eagerly, with a clean cache
            warnings.warn(f"fastsd.rollout.engine: the compiled decode step failed ({e}); decoding eagerly from now on")
            self.compile, self._step = False, self._decode
            return self._generate(*args)

    def _generate(self, prompts, max_new_tokens, temperature, top_p, eos_id, pad_id, stop, all_done, on_step):
        device = next(self.lm.parameters()).device
        self._refresh_weights(device)
        n = len(prompts)
        if self.compile:  # a few fixed shapes, so the compiled step is reused: the batch to a power of 2
            prompts = prompts + [prompts[0]] * ((1 << (n - 1).bit_length()) - n)  # dummy rows, dropped
        ids, prompt_attn = pad(prompts, pad_id, left=True)
        if self.compile:  # and the prompt width to a multiple of 64
            extra = -(-ids.shape[1] // 64) * 64 - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (extra, 0), value=pad_id)
            prompt_attn = torch.nn.functional.pad(prompt_attn, (extra, 0), value=0)
        ids, prompt_attn = ids.to(device), prompt_attn.to(device)
        B, P = ids.shape
        total = P + max_new_tokens
        attn = torch.zeros(B, total, dtype=torch.long, device=device)
        attn[:, :P] = prompt_attn
        positions = torch.arange(total, device=device)  # cache positions: sliced, never copied from the host
        pos = (prompt_attn.cumsum(-1) - 1).clamp(min=0)
        decoder = None
        if self.written_step and not self.compile:  # the prompt by transformers, the new tokens by the written step
            cache = DynamicCache()
            logits = self._forward(ids, prompt_attn, pos, positions[:P], cache)
            decoder = StepDecoder(self.lm, cache, prompt_attn, total)
            del cache
        else:
            cache = self._cache(B, total, device)
            logits = self._forward(ids, attn, pos, positions[:P], cache)
        tok, lp = sample_next(logits, temperature, top_p)
        pos = pos[:, -1]
        stop_t = torch.tensor(stop, dtype=torch.long, device=device)
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logps = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)  # the written step drops finished rows: each row's own
        steps = max_new_tokens
        for t in range(max_new_tokens):
            tok = torch.where(done, pad_id, tok)
            tokens[rows, t] = tok
            logps[rows, t] = torch.where(done, 0.0, lp)
            done = done | (tok == eos_id)
            if on_step is not None:
                on_step(t + 1)
            if len(stop_t) and t + 1 >= len(stop_t):
                done = done | (tokens[rows, t + 1 - len(stop_t):t + 1] == stop_t).all(-1)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % self.check_every == 0:
                finished = bool(done[:n].all())
                if (all_done(finished) if all_done is not None else finished):
                    steps = t + 1
                    break
                if decoder is not None and not finished and 4 * int(done.sum()) >= len(done):  # a quarter: drop
                    keep = (~done).nonzero()[:, 0]
                    decoder.keep(keep)
                    tok, lp, pos, done, rows = tok[keep], lp[keep], pos[keep], done[keep], rows[keep]
            pos = pos + 1
            if decoder is not None:  # it keeps its own mask
                tok, lp = sample_next(decoder.step(tok, pos, P + t), temperature, top_p)
            else:
                attn[:, P + t] = 1
                tok, lp = self._decode_step(tok, attn, pos, positions[P + t:P + t + 1], cache, temperature, top_p)
        return self._rows(tokens[:n, :steps], logps[:n, :steps], eos_id, pad_id, stop)

    @staticmethod
    def _rows(tokens, logps, eos_id, pad_id, stop) -> tuple[list[list[int]], list[list[float]]]:
        rows = [cut_at_stop(cut_at_eos(row, eos_id, pad_id), stop) for row in tokens.tolist()]
        return rows, [lrow[:len(row)] for row, lrow in zip(rows, logps.tolist())]
