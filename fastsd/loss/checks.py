"""Checks of the fused losses' arguments: every user error a ValueError naming the argument,
raised before any work."""

from __future__ import annotations

import torch

from .topk import check_topk

__all__ = ["BACKENDS", "DIVERGENCES", "REDUCTIONS", "check_options", "check_pair", "check_rows", "check_targets",
           "check_weights", "jsd_endpoint"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_options(logprob=False, *, divergence="forward_kl", beta=0.5, temperature=1.0, clip=None,
                   reduction="mean", backend=None, chunk_size=None, topk=None, topk_from="teacher",
                   tail=True) -> None:
    """The scalar options, shared by the functions and the modules' constructors (`logprob`: only
    those of the log-prob)."""
    if not logprob:
        check_topk(topk, topk_from, tail)
    if not logprob and divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if not logprob and reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip: must be > 0 (or None), got {clip}")
    if divergence == "jsd" and not 0 <= beta <= 1:
        raise ValueError(f"beta: jsd needs 0 <= beta <= 1, got {beta}")
    if chunk_size is not None and not chunk_size >= 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")


def jsd_endpoint(divergence: str, beta: float) -> str:
    """JSD at beta = 0 is KL(p_t || p_s) and at beta = 1 KL(p_s || p_t) (TRL's and Liger's
    convention; the mixture's limit would be 0): the divergence that computes it."""
    if divergence == "jsd" and beta in (0, 1):
        return "forward_kl" if beta == 0 else "reverse_kl"
    return divergence


def check_pair(name_h: str, h: torch.Tensor, name_w: str, w: torch.Tensor) -> None:
    if not isinstance(h, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise ValueError(f"{name_h}/{name_w}: expected tensors")
    if w.dim() != 2:
        raise ValueError(f"{name_w}: expected [V, D], got shape {tuple(w.shape)}")
    if h.dim() < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{name_h}: last dim {tuple(h.shape)[-1:]} does not match {name_w} width {w.shape[1]}"
        )
    for name, t in ((name_h, h), (name_w, w)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}; expected one of {_DTYPES}")
    # h's dtype may differ from w's (16-bit activations over fp32 weights, as torch.autocast
    # leaves them): the math is fp32 either way, and each gradient comes back in its input's dtype.
    if h.device != w.device:
        raise ValueError(f"{name_h}: device {h.device} differs from {name_w} device {w.device}")


def check_rows(name: str, t: torch.Tensor | None, n: int, lead: tuple, device) -> None:
    if t is None:
        return
    if tuple(t.shape) not in (lead, (n,)):
        raise ValueError(f"{name}: expected shape {lead} or ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: device {t.device} differs from the hidden states' {device}")


def check_targets(target_ids: torch.Tensor, vocab: int, mask: torch.Tensor | None) -> None:
    """Ids of valid rows must lie in [0, vocab); masked rows may hold anything (e.g. -100)."""
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids: expected int64 or int32, got {target_ids.dtype}")
    bad = (target_ids < 0) | (target_ids >= vocab)
    if mask is not None:
        bad &= mask.reshape(target_ids.shape)
    # Hazard: on CUDA this range check is one host synchronisation (a tiny reduction).
    if target_ids.numel() and bool(bad.any()):
        raise ValueError(f"target_ids: id {target_ids[bad][0].item()} outside the vocabulary [0, {vocab})")


def check_weights(weights: torch.Tensor | None, n: int, lead: tuple, device) -> None:
    """Per-token weights: a floating tensor, one per row."""
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise ValueError(f"weights: expected a floating-point tensor, got {getattr(weights, 'dtype', type(weights))}")
    check_rows("weights", weights, n, lead, device)
