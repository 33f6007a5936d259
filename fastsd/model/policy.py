"""The trained model as an FSDP2 root: decoder body + fused loss, never the full-sequence lm_head.

`Policy.forward` runs the decoder body of a transformers causal LM, keeps only the hidden states
at the response positions, and applies the fused loss there. Under FSDP2 each decoder layer is
sharded and the Policy is the root, so inside `forward` the lm_head weight (tied or not) is the
plain unsharded tensor the fused loss needs.

With LoRA, `lm` is a peft model: `get_decoder()` and `get_output_embeddings()` reach through it to
the base model's decoder body (whose projections are peft's LoRA layers) and its unadapted head.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..loss.api import fused_linear_divergence, fused_linear_logprob
from .lora import adapter_active, paired_adapters

log = logging.getLogger("fastsd")


class Policy(nn.Module):
    """`autocast`: a dtype (bf16) to run under torch.autocast on CUDA when not FSDP-sharded
    (FSDP2's mixed precision does that job under torchrun); None computes in the parameters' dtype."""

    def __init__(self, lm: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.lm = lm
        self.autocast = autocast

    def compute(self):
        """The autocast context of this policy (also used around `generate`)."""
        device = self.lm.get_output_embeddings().weight.device.type
        return torch.autocast(device, dtype=self.autocast, enabled=self.autocast is not None)

    @property
    def head_weight(self) -> torch.Tensor:
        """The lm_head weight, in the compute dtype: the fused loss's GEMMs then run in 16 bits (it
        would also take bf16 hidden states over the fp32 weight, widening them to fp32)."""
        w = self.lm.get_output_embeddings().weight
        return w if self.autocast is None else w.to(self.autocast)

    def forward(self, ids, attn, index, *, mode: str, targets=None, teacher_hidden=None,
                teacher_weight=None, loss_kw: dict | None = None, is_kw: dict | None = None):
        """mode "hidden": hidden states [R, D] at `index` (flat positions into [B * L]).
        mode "divergence": fused_linear_divergence(reduction="sum") against the teacher's
            hidden states [R, Dt] (and weight; None shares this head) -> DivergenceOutput.
        mode "logprob": log p(targets) [R] under this head, differentiable (with
            loss_kw["return_entropy"]: and the entropy [R]).
        `is_kw` (sampler_logprob [R], clip, temperature): the importance weights of the targets
        (`importance_weights`) weight the divergence (mode "logprob" leaves them to the caller's
        surrogate), and the call returns (result, weights)."""
        body = self.lm.get_decoder()
        with self.compute():
            h = body(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        h = h.reshape(-1, h.shape[-1]).index_select(0, index)
        if self.autocast is not None:
            h = h.to(self.autocast)
        if mode == "hidden":
            return h
        w = self.head_weight
        weights = None if is_kw is None else importance_weights(h, w, targets, **is_kw)
        if mode == "logprob":
            out = fused_linear_logprob(h, w, targets, temperature=loss_kw.get("temperature", 1.0),
                                       return_entropy=loss_kw.get("return_entropy", False))
        elif mode == "divergence":
            out = fused_linear_divergence(h, w, teacher_hidden.to(h.dtype), teacher_weight,
                                          target_ids=targets, reduction="sum", weights=weights, **loss_kw)
        else:
            raise ValueError(f"mode: unknown {mode!r}")
        return out if is_kw is None else (out, weights)


def importance_weights(h, w, targets, *, sampler_logprob, clip, temperature):
    """min(exp(trainer - sampler), clip) per target token, detached: the trainer's log-prob of each
    sampled token at the sampling temperature (one forward pass over the head, no gradient)
    against the sampler's. A NaN sampler log-prob (none recorded) gives weight 1."""
    with torch.no_grad():
        lp = fused_linear_logprob(h.detach(), w.detach(), targets, temperature=temperature)
        ratio = torch.exp(lp - sampler_logprob).clamp(max=clip)
        return torch.where(torch.isnan(sampler_logprob), torch.ones_like(ratio), ratio)


class AdapterTeacher:
    """A LoRA teacher that is the student's own module run with another adapter: None (every
    adapter off: the base model, the initial teacher of a fresh adapter), "default" (the live
    adapter: the current teacher) or a frozen copy ("ema", "initial"). No weights of its own
    beyond that adapter; it runs in eval mode (no adapter dropout), without gradient.

    It has the teacher interface `_micro_loss` and `update` use: calling it, `head_weight` (None:
    it shares the student's head, which LoRA leaves unadapted) and unshard/reshard (nothing to
    do: the student's FSDP root runs it)."""

    head_weight = None

    def __init__(self, policy: Policy, adapter: str | None):
        self.policy, self.adapter = policy, adapter

    @property
    def lm(self) -> nn.Module:
        return self.policy.lm

    def __call__(self, *args, **kwargs):
        lm = self.policy.lm
        was_training = lm.training
        lm.eval()
        try:
            with adapter_active(lm, self.adapter):
                return self.policy(*args, **kwargs)
        finally:
            lm.train(was_training)

    def unshard(self) -> None:
        pass

    def reshard(self) -> None:
        pass


def ema_pairs(teacher, policy: Policy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(teacher parameter, student parameter) pairs an EMA teacher averages: the "ema" adapter
    against "default" under LoRA, else every parameter of the teacher's copy of the model."""
    if isinstance(teacher, AdapterTeacher):
        return paired_adapters(policy.lm, "ema", "default")
    return list(zip(teacher.parameters(), policy.parameters()))


def shard(policy: Policy, *, mixed_precision: bool) -> Policy:
    """FSDP2: fully_shard every decoder layer, then the Policy root (tied embeddings included)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kw = {} if mp is None else {"mp_policy": mp}
    layers = getattr(policy.lm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError("model: cannot find the decoder layers (expected model.get_decoder().layers)")
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(policy, **kw)
    # FSDP2 initialises lazily in the root's first forward; `generate` calls the inner model,
    # not the root, so run one tiny root forward now (every rank, same shapes).
    device = next(policy.parameters()).device
    with torch.no_grad():
        one = torch.zeros((1, 1), dtype=torch.long, device=device)
        policy(one, torch.ones_like(one), torch.zeros(1, dtype=torch.long, device=device), mode="hidden")
    policy.reshard()  # the root keeps its parameters unsharded after a forward; the optimizer needs the shards
    return policy


def apply_liger(lm: nn.Module) -> bool:
    """liger-kernel's RMSNorm / RoPE / SwiGLU for this architecture, on CUDA only; the loss
    stays fastsd's. Returns whether they were applied."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.warning("model.liger: liger-kernel is not installed; using the model's own kernels")
        return False
    try:
        _apply_liger_kernel_to_instance(model=lm, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as e:  # unsupported architecture: keep the stock modules
        log.warning("model.liger: not applied to %s (%s)", type(lm).__name__, e)
        return False
    return True
