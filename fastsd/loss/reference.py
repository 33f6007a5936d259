"""Unfused reference for the fused losses: materialises the logits and, by default, runs in float64.

Tests and benchmarks import this module; it is written straight from the definitions (no
hand-derived gradients) so that autograd through it is an independent check of the kernels.

Shapes: N tokens, D hidden width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .api import DivergenceOutput

__all__ = ["reference_divergence", "reference_logprob", "per_token_divergence"]


def per_token_divergence(
    s_logits_NV: torch.Tensor,
    t_logits_NV: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    topk: int | None = None,
    topk_from: str = "teacher",
    tail: bool = True,
) -> torch.Tensor:
    """Per-row divergence [N] between teacher and student logits, from the definitions. `clip`
    clamps each summand (per token, or per category with `topk`) at max=clip."""
    if topk is not None:
        return _topk_divergence(s_logits_NV / temperature, t_logits_NV / temperature, divergence=divergence,
                                beta=beta, clip=clip, topk=topk, topk_from=topk_from, tail=tail)
    lp_s = torch.log_softmax(s_logits_NV / temperature, dim=-1)
    lp_t = torch.log_softmax(t_logits_NV / temperature, dim=-1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    if divergence == "jsd" and beta in (0, 1):  # the endpoints are the KLs (TRL's, Liger's convention)
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
    if divergence == "forward_kl":
        summand = p_t * (lp_t - lp_s)
    elif divergence == "reverse_kl":
        summand = p_s * (lp_s - lp_t)
    elif divergence == "jsd":
        log_m = torch.logsumexp(
            torch.stack([lp_s + torch.log1p(torch.tensor(-beta, dtype=lp_s.dtype)),
                         lp_t + torch.log(torch.tensor(beta, dtype=lp_s.dtype))]),
            dim=0,
        )
        summand = beta * (p_t * (lp_t - log_m)) + (1 - beta) * (p_s * (lp_s - log_m))
    else:
        raise ValueError(f"divergence: unknown {divergence!r}")
    if clip is not None:  # the pointwise summand; clamp's gradient is 0 where it clamps
        summand = summand.clamp(max=clip)
    return summand.sum(-1)


def _topk_divergence(s, t, *, divergence, beta, clip, topk, topk_from, tail):
    """The divergence between the two sides' top-k categories: the chosen side's K largest logits
    S per row, renormalised over S, or (`tail`) with 1 - sum_S p as one more category (left out
    when S is the whole vocabulary: it holds nothing). S is a constant (indices); the tail's mass
    is the probability off S, through the log-sum-exp of those logits."""
    idx = (t if topk_from == "teacher" else s).topk(topk, dim=-1).indices
    if not tail:  # the categories' logits: softmax over S
        return per_token_divergence(s.gather(-1, idx), t.gather(-1, idx), divergence=divergence, beta=beta,
                                    clip=clip)
    off = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)

    def categories(z):
        lp = torch.log_softmax(z, dim=-1)
        parts = [lp.gather(-1, idx)]
        if topk < z.shape[-1]:
            parts.append(lp.masked_fill(~off, float("-inf")).logsumexp(-1, keepdim=True))
        return torch.cat(parts, -1)  # log-probs of the categories: log_softmax leaves them as they are

    return per_token_divergence(categories(s), categories(t), divergence=divergence, beta=beta, clip=clip)


def reference_divergence(
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
    topk: int | None = None,
    topk_from: str = "teacher",
    tail: bool = True,
    dtype: torch.dtype = torch.float64,
) -> DivergenceOutput:
    """Same contract as `fastsd.fused_linear_divergence`, computed with materialised logits.

    Gradients flow (through autograd) into whichever of `student_hidden` and `weight` require
    them; the computation runs in `dtype` (float64 by default) on upcast copies. `entropy` is
    always filled.
    """
    w_t = weight if teacher_weight is None else teacher_weight
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1]).to(dtype)
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach().to(dtype)
    s_logits = h_s @ weight.to(dtype).T
    t_logits = h_t @ w_t.detach().to(dtype).T
    per_row = per_token_divergence(
        s_logits, t_logits, divergence=divergence, beta=beta, temperature=temperature, clip=clip,
        topk=topk, topk_from=topk_from, tail=tail,
    )
    valid = torch.ones_like(per_row, dtype=torch.bool) if mask is None else mask.reshape(-1)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    weighted = per_row if weights is None else per_row * torch.where(valid, weights.reshape(-1).to(dtype), 0.0)
    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted.sum() / valid.sum().clamp(min=1)
    out = DivergenceOutput(loss=loss, per_token=per_row.detach(),
                           entropy=torch.where(valid, _entropy(s_logits.detach() / temperature), 0.0))
    if target_ids is not None:
        ids = target_ids.reshape(-1, 1)
        zero = torch.zeros((), dtype=dtype)
        lp_s = torch.log_softmax(s_logits.detach() / temperature, -1).gather(1, ids).squeeze(1)
        lp_t = torch.log_softmax(t_logits / temperature, -1).gather(1, ids).squeeze(1)
        out.student_logprob = torch.where(valid, lp_s, zero)
        out.teacher_logprob = torch.where(valid, lp_t, zero)
    return out


def reference_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    return_entropy: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """Same contract as `fastsd.fused_linear_logprob`, with materialised logits."""
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    logits = h @ weight.to(dtype).T / temperature
    lp = F.log_softmax(logits, dim=-1).gather(1, target_ids.reshape(-1, 1)).squeeze(1)
    valid = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask.reshape(-1)
    if weights is not None:  # masked rows' weights may hold anything (NaN): never multiplied in
        lp = lp * torch.where(valid, weights.reshape(-1).to(dtype), 0.0)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    if not return_entropy:
        return lp
    return lp, torch.where(valid, _entropy(logits.detach()), 0.0)


def _entropy(logits_NV: torch.Tensor) -> torch.Tensor:
    """-sum_v p log p per row, from the definition."""
    lp = torch.log_softmax(logits_NV, dim=-1)
    return -(lp.exp() * lp).sum(-1)
