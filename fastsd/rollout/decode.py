"""A decode step written out for the Llama layout of decoder (llama, qwen2, qwen3): the eager
engine's step on a CPU, where a small model's step is all overhead.

transformers' forward of one new token per row goes through the cache classes, builds a 4-D mask
and attends over the whole static cache at every step. This step calls the model's own modules
(embedding, norms, projections, MLP, rotary embedding, lm_head: so LoRA layers and the model's
RoPE variant come along) and does the rest itself, with few, large operations:

- the keys and values live in one preallocated tensor per layer, [batch, kv heads, length, dim],
  filled from the prompt's forward (transformers' own, with a `DynamicCache`);
- attention reads only the filled prefix, with an additive mask kept up to date one column per
  step, and the query heads of one kv head as rows of one product (grouped-query attention
  without copying keys and values per query head);
- the products are `torch.matmul`s: the CPU flash-attention kernel costs several times as much
  for a query of one token;
- what can be decided once per call is: each layer's parts become plain functions (q/k/v and
  gate/up joined into one product each, a residual sum and its product in one `addmm`, the
  norms as one `rms_norm`, where the modules are plain and nothing must run in between), and
  RoPE's cos and sin of every position come from one call of the model's rotary embedding.

`StepDecoder.fits(lm)` says whether a model has that layout (no sliding window, not sharded by
FSDP, whose hooks run only on a module's own forward, no peft adapter but LoRA); otherwise the
engine keeps transformers' forward. The engine uses it by default on CPUs only. Equal to
transformers' forward up to float rounding: tests/rollout/test_decode.py."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..model.lora import base_model

__all__ = ["StepDecoder"]



def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return torch.cat((-second, first), -1)


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _norm(module, compute: torch.dtype | None):
    """`module` (the layout's RMSNorm) as a function: one fused `rms_norm` where it and the
    activations (`compute`: their dtype, None under autocast) are fp32 (the module's own float32
    arithmetic, in one operation instead of eight); the module otherwise."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None or compute != torch.float32 or module.weight.dtype != torch.float32 or _hooked(module):
        return module
    return functools.partial(F.rms_norm, normalized_shape=module.weight.shape, weight=module.weight, eps=eps)


def _plain(module) -> bool:
    return type(module) is torch.nn.Linear and not _hooked(module)


def _projection(module, names):
    """The outputs of `module`'s linear layers `names`, side by side, as one function of the input:
    one product of their weights concatenated (once per call, from the current weights) where all
    are plain nn.Linear; otherwise each called as itself (a LoRA layer, or a hook that must run)."""
    parts = [getattr(module, n) for n in names]
    if not all(_plain(p) for p in parts):
        return lambda h: torch.cat([p(h) for p in parts], -1)
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = None if all(p.bias is None for p in parts) else torch.cat(
        [p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features) for p in parts])
    return functools.partial(F.linear, weight=weight, bias=bias)


def _residual(module, autocast: bool):
    """x + module(h) as a function of (x, h): one `addmm` for a plain nn.Linear without a bias
    outside autocast (which would run the sum in the low precision too); the module otherwise."""
    if not _plain(module) or module.bias is not None or autocast:
        return lambda x, h: x + module(h)
    weight = module.weight.detach().t()
    return lambda x, h: torch.addmm(x, h, weight)


def _rope_table(model, length: int):
    """cos and sin [length, 1, head_dim] of every position, from the model's own rotary embedding
    (each position's values are computed alone, so equal to the step's); None for the RoPE types
    whose frequencies depend on the longest position seen (dynamic NTK, longrope)."""
    kind = getattr(model.rotary_emb, "rope_type", "default")
    if any(word in str(kind) for word in ("dynamic", "longrope")):
        return None
    weight = model.embed_tokens.weight
    cos, sin = model.rotary_emb(weight, torch.arange(length, device=weight.device)[None])
    return cos[0, :, None], sin[0, :, None]


class StepDecoder:
    """One call's decoding state (see the module docstring): `StepDecoder(lm, cache, attn, length)`
    takes the prompt's keys and values from `cache` (a `DynamicCache` after the prompt's forward) and
    its attention mask `attn` [batch, prompt]; `step(tok, pos, t)` feeds token `tok` [batch] at
    position `pos` [batch] into cache column `t` and returns the next token's logits [batch, vocab]."""

    LAYOUTS = ("llama", "qwen2", "qwen3")

    @staticmethod
    def fits(lm) -> bool:
        from torch.distributed.fsdp import FSDPModule

        if any(getattr(c, "peft_type", None) != "LORA" for c in (getattr(lm, "peft_config", None) or {}).values()):
            return False  # prompt learning adds positions to the cache
        base = base_model(lm)
        config = getattr(base, "config", None)
        if getattr(config, "model_type", None) not in StepDecoder.LAYOUTS or not hasattr(base, "lm_head"):
            return False
        windowed = getattr(config, "use_sliding_window", False) or any(
            kind != "full_attention" for kind in getattr(config, "layer_types", None) or ())
        return not windowed and not any(isinstance(m, FSDPModule) for m in base.modules())

    def __init__(self, lm, cache, attn: torch.Tensor, length: int):
        self.base = base_model(lm)
        self.layers = self.base.model.layers
        B, P = attn.shape
        self.keys, self.values = [], []
        for layer in cache.layers[:len(self.layers)]:
            for kept, done in ((self.keys, layer.keys), (self.values, layer.values)):
                full = done.new_empty(B, done.shape[1], length, done.shape[3])
                full[:, :, :P] = done
                kept.append(full)
        self.bias = torch.full((B, 1, 1, length), float("-inf"), dtype=self.keys[0].dtype, device=attn.device)
        self.bias[:, 0, 0, :P].masked_fill_(attn.bool(), 0.0)
        model = self.base.model
        self.rope = _rope_table(model, length)
        # each layer's parts as functions, decided once per call (see the helpers above)
        autocast = torch.is_autocast_enabled(attn.device.type)
        compute = None if autocast else model.embed_tokens.weight.dtype
        self.plans = []
        for layer in self.layers:
            attn_, mlp = layer.self_attn, layer.mlp
            qk_norms = (_norm(attn_.q_norm, compute), _norm(attn_.k_norm, compute)) \
                if hasattr(attn_, "q_norm") else None
            self.plans.append((
                _norm(layer.input_layernorm, compute), _projection(attn_, ("q_proj", "k_proj", "v_proj")), qk_norms,
                _residual(attn_.o_proj, autocast), _norm(layer.post_attention_layernorm, compute),
                _projection(mlp, ("gate_proj", "up_proj")), _residual(mlp.down_proj, autocast)))
        self.final_norm = _norm(model.norm, compute)
        self.heads, self.kv_heads = self.base.config.num_attention_heads, self.keys[0].shape[1]
        self.dim = self.layers[0].self_attn.head_dim

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with only these rows (indices into the current batch); a layer at a time, so the
        memory peaks at one layer's copy."""
        for kept in (self.keys, self.values):
            for i in range(len(kept)):
                kept[i] = kept[i][rows]
        self.bias = self.bias[rows]

    def step(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        model = self.base.model
        x = model.embed_tokens(tok)  # [B, hidden]
        cos, sin = (self.rope[0][pos], self.rope[1][pos]) if self.rope else model.rotary_emb(x, pos[:, None])
        self.bias[:, 0, 0, t] = 0.0
        bias = self.bias[..., :t + 1]
        B, H, KV, D = x.shape[0], self.heads, self.kv_heads, self.dim
        for layer, (norm1, qkv, qk_norms, o_proj, norm2, gate_up, down_proj), keys, values in zip(
                self.layers, self.plans, self.keys, self.values):
            out = qkv(norm1(x))  # [B, (H + 2 KV) D]
            qk = out[:, :(H + KV) * D].view(B, H + KV, D)
            if qk_norms is not None:  # qwen3
                qk = torch.cat((qk_norms[0](qk[:, :H]), qk_norms[1](qk[:, H:])), 1)
            qk = torch.addcmul(qk * cos, _rotate_half(qk), sin)  # RoPE on q and k at once
            keys[:, :, t] = qk[:, H:]
            values[:, :, t] = out[:, (H + KV) * D:].view(B, KV, D)
            q = qk[:, :H].view(B, KV, H // KV, D)
            scores = torch.matmul(q, keys[:, :, :t + 1].transpose(-1, -2)).mul_(layer.self_attn.scaling).add_(bias)
            weights = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(values.dtype)
            x = o_proj(x, torch.matmul(weights, values[:, :, :t + 1]).reshape(B, -1))
            gate, up = gate_up(norm2(x)).chunk(2, -1)
            x = down_proj(x, layer.mlp.act_fn(gate) * up)
        return self.base.lm_head(self.final_norm(x))
