"""Public API: fused linear teacher-student divergence and fused linear log-prob.

Both compute from hidden states and lm_head weights, chunked over tokens, so the [N, V] logits
never exist at once. The arguments are checked here (`checks.py`), before any work; the autograd
Functions and the chunking are in `autograd.py`, the backends in `torch_backend.py` and `kernels/`.

Legend: N tokens (leading dims flattened), D hidden width, V vocabulary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .autograd import FusedDivergenceFunction, FusedLogprobFunction, backend_ops, chunk_rows, compact
from .checks import BACKENDS, check_options, check_pair, check_rows, check_targets, check_weights, jsd_endpoint
from .topk import check_topk

__all__ = [
    "DivergenceOutput",
    "fused_linear_divergence",
    "fused_linear_logprob",
    "FusedLinearDivergence",
    "FusedLinearLogprob",
    "resolve_backend",
]

@dataclass
class DivergenceOutput:
    """Result of `fused_linear_divergence`.

    loss: scalar (reduction "mean"/"sum") or [N] ("none"), differentiable.
    per_token: [N] divergence of each row, detached; 0 on masked rows.
    student_logprob, teacher_logprob: [N] log-probs of `target_ids` under each head (detached;
        0 on masked rows), or None when no `target_ids` were given.
    entropy: [N] the student's entropy per row, -sum_v p_s log p_s at the temperature (detached;
        0 on masked rows), or None without `return_entropy=True`.
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    student_logprob: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Explicit argument > FASTSD_BACKEND environment variable > triton on CUDA, torch elsewhere."""
    choice = backend or os.environ.get("FASTSD_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if choice not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {choice!r}")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU, or use backend='torch'"
        )
    return choice


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    return_entropy: bool = False,
    backend: str | None = None,
    chunk_size: int | None = None,
    topk: int | None = None,
    topk_from: str = "teacher",
    tail: bool = True,
) -> DivergenceOutput:
    """Divergence between teacher and student next-token distributions, without the logits.

    p = softmax((hidden @ W.T) / temperature) for both heads. `forward_kl` = KL(p_t || p_s),
    `reverse_kl` = KL(p_s || p_t), `jsd` = beta KL(p_t || M) + (1-beta) KL(p_s || M) with
    M = (1-beta) p_s + beta p_t, for 0 <= beta <= 1: beta=0 is forward_kl, beta=1 reverse_kl.
    `clip` clamps each per-vocabulary summand of the divergence (forward_kl p_t (log p_t - log p_s),
    reverse_kl p_s (log p_s - log p_t), jsd beta p_t (log p_t - log M) + (1-beta) p_s (log p_s -
    log M)) at max=clip before the sum; a clamped summand passes no gradient. `weights` [N]
    (float, no gradient into it) multiplies each row's loss and gradient: `loss` is the reduction
    of weights * divergence ("mean" still divides by the valid rows), `per_token` stays the
    unweighted divergence. `return_entropy=True` fills `entropy` in the same pass over the
    vocabulary (no extra GEMM). `topk=K` takes the divergence over the K tokens with the largest
    logits of one side (`topk_from`), renormalised (`tail=False`) or with the rest of the
    probability as one more category (`tail=True`), `clip` then clamping each category's summand;
    see `fastsd.loss.topk` (`weights` and `entropy` as above: the entropy is the student's over the
    full vocabulary). `teacher_weight=None` shares `weight`. The teacher never gets a
    gradient. `mask` [N] bool drops rows before any matmul; "mean" divides by the number of valid
    rows (all masked: 0.0). `chunk_size` is rows per chunk (default: from a 512 MiB workspace,
    environment FASTSD_WORKSPACE_MB). Differentiable once (create_graph=True raises).

    Precision: the Triton backend rounds the logit gradient, times any per-row upstream gradient
    (reduction "none"), to the weight dtype before the dX/dW GEMMs. In fp16, per-row upstream
    gradients far below 1 lose digits to subnormals; bf16 has fp32's range and does not.
    """
    if teacher_weight is weight:
        teacher_weight = None  # shared head, said explicitly
    w_t = weight if teacher_weight is None else teacher_weight
    check_pair("student_hidden", student_hidden, "weight", weight)
    check_pair("teacher_hidden", teacher_hidden, "teacher_weight" if teacher_weight is not None else "weight", w_t)
    if w_t.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher_weight: vocabulary {w_t.shape[0]} differs from weight's {weight.shape[0]}")
    lead = tuple(student_hidden.shape[:-1])
    n = math.prod(lead)
    t_lead = tuple(teacher_hidden.shape[:-1])
    if t_lead != lead and (n,) not in (lead, t_lead) or math.prod(t_lead) != n:
        # one of the two may be flat ([N, D]); otherwise their leading shapes must agree, or
        # rows would pair up wrongly ([T, B] against [B, T])
        raise ValueError(f"teacher_hidden: leading shape {t_lead} does not match student_hidden's {lead}")
    if w_t.device != weight.device or teacher_hidden.device != student_hidden.device:
        raise ValueError("teacher_hidden: teacher tensors must be on the student's device")
    check_options(divergence=divergence, beta=beta, temperature=temperature, clip=clip,
                   reduction=reduction, chunk_size=chunk_size, topk=topk, topk_from=topk_from, tail=tail)
    check_topk(topk, topk_from, tail, weight.shape[0])
    divergence = jsd_endpoint(divergence, beta)
    device = student_hidden.device
    check_rows("mask", mask, n, lead, device)
    check_rows("target_ids", target_ids, n, lead, device)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
    if target_ids is not None:
        check_targets(target_ids, weight.shape[0], mask)
    check_weights(weights, n, lead, device)
    name = resolve_backend(backend, device)

    h_s = student_hidden.reshape(n, student_hidden.shape[-1]).contiguous()  # n may be 0
    h_t = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1]).contiguous()
    w_t = w_t.detach().contiguous() if teacher_weight is not None else weight.contiguous()
    rows, num_valid = compact(mask, n, device)
    targets_c = None if target_ids is None else target_ids.reshape(-1).to(torch.int64)[rows].contiguous()
    kw = dict(divergence=divergence, beta=float(beta), temperature=float(temperature),
              clip=None if clip is None else float(clip),
              chunk_size=chunk_rows(chunk_size, name, weight.shape[0], max(h_s.shape[1], h_t.shape[1]),
                                     divergence, clip, entropy=return_entropy, topk=topk),
              topk=None if topk is None else (topk, topk_from, tail))
    opts = dict(ops=backend_ops(name), reduction=reduction, kw=kw, grad_enabled=torch.is_grad_enabled(),
                weights=_compact_weights(weights, mask, rows), entropy=bool(return_entropy))
    # A shared teacher weight is passed as the same tensor object, so backends can reuse it;
    # backward returns no gradient for the teacher slots.
    loss, per_token, s_lp, t_lp, entropy = FusedDivergenceFunction.apply(
        h_s, weight.contiguous(), h_t, w_t, rows, num_valid, targets_c, opts
    )
    return DivergenceOutput(loss=loss, per_token=per_token, student_logprob=s_lp, teacher_logprob=t_lp,
                            entropy=entropy)


def _compact_weights(weights, mask, rows):
    """The per-token weights as fp32 in compact order, detached; masked rows 0 (whatever they held)."""
    if weights is None:
        return None
    w = weights.detach().reshape(-1).to(torch.float32)
    if mask is not None:
        w = torch.where(mask.reshape(-1), w, torch.zeros((), dtype=w.dtype, device=w.device))
    return w[rows].contiguous()


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    return_entropy: bool = False,
    backend: str | None = None,
    chunk_size: int | None = None,
):
    """log softmax((hidden @ W.T) / temperature)[target] per row, [N], differentiable (once) in
    hidden and weight, without materialising the logits. Masked rows give 0 and cost nothing.
    `weights` [N] (no gradient into it) multiplies each row's log-prob and its gradient.
    `return_entropy=True` returns (log-probs, entropy [N], detached, 0 on masked rows), the
    entropy computed in the same pass (no extra GEMM).
    The fp16 caveat of `fused_linear_divergence` applies to the upstream gradient here too."""
    check_pair("hidden", hidden, "weight", weight)
    if not isinstance(target_ids, torch.Tensor):
        raise ValueError("target_ids: expected a tensor")
    check_options(True, temperature=temperature, chunk_size=chunk_size)
    lead = tuple(hidden.shape[:-1])
    n = math.prod(lead)
    check_rows("target_ids", target_ids, n, lead, hidden.device)
    check_rows("mask", mask, n, lead, hidden.device)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
    check_targets(target_ids, weight.shape[0], mask)
    check_weights(weights, n, lead, hidden.device)
    name = resolve_backend(backend, hidden.device)
    rows, num_valid = compact(mask, n, hidden.device)
    targets_c = target_ids.reshape(-1).to(torch.int64)[rows].contiguous()
    kw = dict(temperature=float(temperature),
              chunk_size=chunk_rows(chunk_size, name, *weight.shape, "logprob", entropy=return_entropy))
    return FusedLogprobFunction.apply(
        hidden.reshape(n, hidden.shape[-1]).contiguous(), weight.contiguous(), rows, num_valid, targets_c,
        dict(ops=backend_ops(name), kw=kw, grad_enabled=torch.is_grad_enabled(),
             weights=_compact_weights(weights, mask, rows), entropy=bool(return_entropy)),
    )


class FusedLinearDivergence(torch.nn.Module):
    """nn.Module form of `fused_linear_divergence` with the loss options fixed at construction."""

    def __init__(self, divergence="forward_kl", *, beta=0.5, temperature=1.0, clip=None,
                 reduction="mean", return_entropy=False, backend=None, chunk_size=None, topk=None,
                 topk_from="teacher", tail=True):
        super().__init__()
        self.kw = dict(divergence=divergence, beta=beta, temperature=temperature, clip=clip,
                       reduction=reduction, backend=backend, chunk_size=chunk_size, topk=topk,
                       topk_from=topk_from, tail=tail)
        check_options(**self.kw)  # at construction, not at the first forward
        self.kw["return_entropy"] = bool(return_entropy)

    def forward(self, student_hidden, weight, teacher_hidden, teacher_weight=None, *, mask=None,
                target_ids=None, weights=None) -> DivergenceOutput:
        return fused_linear_divergence(student_hidden, weight, teacher_hidden, teacher_weight,
                                       mask=mask, target_ids=target_ids, weights=weights, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class FusedLinearLogprob(torch.nn.Module):
    """nn.Module form of `fused_linear_logprob`."""

    def __init__(self, *, temperature=1.0, return_entropy=False, backend=None, chunk_size=None):
        super().__init__()
        self.kw = dict(temperature=temperature, backend=backend, chunk_size=chunk_size)
        check_options(True, **self.kw)
        self.kw["return_entropy"] = bool(return_entropy)

    def forward(self, hidden, weight, target_ids, *, mask=None, weights=None) -> torch.Tensor:
        return fused_linear_logprob(hidden, weight, target_ids, mask=mask, weights=weights, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
