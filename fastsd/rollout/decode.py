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
  for a query of one token.

`StepDecoder.fits(lm)` says whether a model has that layout (no sliding window, not sharded by
FSDP, whose hooks run only on a module's own forward, no peft adapter but LoRA); otherwise the
engine keeps transformers' forward. The engine uses it by default on CPUs only. Equal to
transformers' forward up to float rounding: tests/rollout/test_decode.py."""

from __future__ import annotations

import torch

__all__ = ["StepDecoder"]



def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return torch.cat((-second, first), -1)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """`module` (the layout's RMSNorm) on `x`: one fused `rms_norm` for fp32 outside autocast (the
    module's own float32 arithmetic, in one operation instead of eight); the module otherwise."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None or x.dtype != torch.float32 or module.weight.dtype != torch.float32 \
            or torch.is_autocast_enabled(x.device.type):
        return module(x)
    return torch.nn.functional.rms_norm(x, module.weight.shape, module.weight, eps)


def _joined(module, names):
    """(weight, bias) of `module`'s linear layers `names`, concatenated along the output; None
    unless all are plain nn.Linear."""
    parts = [getattr(module, n, None) for n in names]
    if not all(type(p) is torch.nn.Linear and not p._forward_hooks and not p._forward_pre_hooks for p in parts):
        return None  # a LoRA layer, or a hook (e.g. offloading) that must run
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = [p.bias for p in parts]
    if all(b is None for b in bias):
        return weight, None
    return weight, torch.cat([b.detach() if b is not None else p.weight.new_zeros(p.out_features)
                              for b, p in zip(bias, parts)])


def _projections(module, h, names, joined):
    """The outputs of `module`'s linear layers `names` on `h`: one product where they are `joined`."""
    if joined is None:
        return [getattr(module, n)(h) for n in names]
    sizes = [getattr(module, n).out_features for n in names]
    return torch.nn.functional.linear(h, *joined).split(sizes, -1)


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
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        config = getattr(base, "config", None)
        if getattr(config, "model_type", None) not in StepDecoder.LAYOUTS or not hasattr(base, "lm_head"):
            return False
        windowed = getattr(config, "use_sliding_window", False) or any(
            kind != "full_attention" for kind in getattr(config, "layer_types", None) or ())
        return not windowed and not any(isinstance(m, FSDPModule) for m in base.modules())

    def __init__(self, lm, cache, attn: torch.Tensor, length: int):
        self.base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
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
        # one product for q, k and v and one for gate and up, where they are plain nn.Linear (a LoRA
        # layer is called as itself); concatenated once per call, from the current weights (a copy
        # of those weights for the call's length)
        self.qkv = [_joined(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in self.layers]
        self.gate_up = [_joined(layer.mlp, ("gate_proj", "up_proj")) for layer in self.layers]

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
        cos, sin = model.rotary_emb(x, pos[:, None])  # [B, 1, head_dim]
        self.bias[:, 0, 0, t] = 0.0
        bias = self.bias[..., :t + 1]
        B = x.shape[0]
        for layer, keys, values, qkv, gate_up in zip(self.layers, self.keys, self.values, self.qkv, self.gate_up):
            attn, mlp = layer.self_attn, layer.mlp
            h = _norm(layer.input_layernorm, x)
            q, k, v = (p.view(B, -1, attn.head_dim) for p in _projections(attn, h, ("q_proj", "k_proj", "v_proj"), qkv))
            if hasattr(attn, "q_norm"):  # qwen3
                q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
            qk = torch.cat((q, k), 1)  # RoPE on both at once
            q, k = (qk * cos + _rotate_half(qk) * sin).split((q.shape[1], k.shape[1]), 1)
            keys[:, :, t] = k
            values[:, :, t] = v
            q = q.reshape(B, keys.shape[1], -1, attn.head_dim)
            scores = torch.matmul(q, keys[:, :, :t + 1].transpose(-1, -2)).mul_(attn.scaling).add_(bias)
            weights = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(values.dtype)
            out = torch.matmul(weights, values[:, :, :t + 1])
            x = x + attn.o_proj(out.reshape(B, -1))
            h = _norm(layer.post_attention_layernorm, x)
            gate, up = _projections(mlp, h, ("gate_proj", "up_proj"), gate_up)
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.base.lm_head(_norm(model.norm, x))
