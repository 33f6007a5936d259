"""Public API: fused linear teacher-student divergence and fused linear log-prob.

Both compute from hidden states and lm_head weights, chunked over tokens, so the [N, V] logits
never exist at once. Masked rows are compacted before any matmul: a stable argsort puts valid
rows first and the count of valid rows stays on the device (no host synchronisation).

Legend: N tokens (leading dims flattened), D hidden width, V vocabulary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import torch_backend

__all__ = [
    "DivergenceOutput",
    "fused_linear_divergence",
    "fused_linear_logprob",
    "FusedLinearDivergence",
    "FusedLinearLogprob",
    "resolve_backend",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Default workspace of one call (torch backend: every buffer; Triton: the fp32 logits), in MiB.
_WORKSPACE_BYTES = int(float(os.environ.get("FASTSD_WORKSPACE_MB", "512")) * 2**20)


@dataclass
class DivergenceOutput:
    """Result of `fused_linear_divergence`.

    loss: scalar (reduction "mean"/"sum") or [N] ("none"), differentiable.
    per_token: [N] divergence of each row, detached; 0 on masked rows.
    student_logprob, teacher_logprob: [N] log-probs of `target_ids` under each head (detached;
        0 on masked rows), or None when no `target_ids` were given.
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    student_logprob: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None


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


def _ops(backend: str):
    if backend == "torch":
        return torch_backend
    from . import kernels  # imported lazily: triton is only needed for this backend

    return kernels


def _chunk_rows(chunk_size: int | None, backend: str, vocab: int, width: int, kind: str, clip=None) -> int:
    """Rows per chunk: `chunk_size`, or the most whose buffers fit the workspace. The torch
    backend counts every buffer it allocates (`torch_backend.workspace_bytes`); the Triton
    backend counts its fp32 logits only (its gradient buffer adds half again, see README).
    `kind`: the divergence or "logprob"."""
    if chunk_size is not None:
        return int(chunk_size)
    if backend == "torch":
        return torch_backend.chunk_rows(_WORKSPACE_BYTES, vocab, width, kind, clip)
    heads = 1 if kind == "logprob" else 2
    return max(16, _WORKSPACE_BYTES // (4 * heads * vocab) // 16 * 16)


def _check_options(logprob=False, *, divergence="forward_kl", beta=0.5, temperature=1.0, clip=None,
                   reduction="mean", backend=None, chunk_size=None) -> None:
    """The scalar options, shared by the functions and the modules' constructors (`logprob`: only
    those of the log-prob)."""
    if not logprob and divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if not logprob and reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if clip is not None:
        if divergence != "forward_kl":
            raise ValueError(f"clip: only supported with divergence='forward_kl', got {divergence!r}")
        if not clip > 0:
            raise ValueError(f"clip: must be > 0 (or None), got {clip}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"beta: jsd needs 0 < beta < 1, got {beta}")
    if chunk_size is not None and not chunk_size >= 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")


def _check_pair(name_h: str, h: torch.Tensor, name_w: str, w: torch.Tensor) -> None:
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
    if h.dtype != w.dtype:
        raise ValueError(f"{name_h}: dtype {h.dtype} differs from {name_w} dtype {w.dtype}")
    if h.device != w.device:
        raise ValueError(f"{name_h}: device {h.device} differs from {name_w} device {w.device}")


def _check_rows(name: str, t: torch.Tensor | None, n: int, lead: tuple, device) -> None:
    if t is None:
        return
    if tuple(t.shape) not in (lead, (n,)):
        raise ValueError(f"{name}: expected shape {lead} or ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: device {t.device} differs from the hidden states' {device}")


def _check_targets(target_ids: torch.Tensor, vocab: int, mask: torch.Tensor | None) -> None:
    """Ids of valid rows must lie in [0, vocab); masked rows may hold anything (e.g. -100)."""
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids: expected int64 or int32, got {target_ids.dtype}")
    bad = (target_ids < 0) | (target_ids >= vocab)
    if mask is not None:
        bad &= mask.reshape(target_ids.shape)
    # Hazard: on CUDA this range check is one host synchronisation (a tiny reduction).
    if target_ids.numel() and bool(bad.any()):
        raise ValueError(f"target_ids: id {target_ids[bad][0].item()} outside the vocabulary [0, {vocab})")


def _compact(mask: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid rows first (stable), and their count as a device tensor: no host sync."""
    if mask is None:
        return torch.arange(n, device=device), torch.full((1,), n, dtype=torch.int64, device=device)
    m = mask.reshape(-1).to(torch.bool)
    rows = torch.argsort((~m).to(torch.int8), stable=True)
    return rows, m.sum(dtype=torch.int64).reshape(1)


def _scatter(values_c: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """Compact order -> original order (rows past num_valid hold zeros already)."""
    if values_c is None:
        return None
    return torch.empty_like(values_c).index_copy_(0, rows, values_c)


def _once_differentiable(name: str) -> None:
    """Backward runs with grad mode on only under create_graph=True. The gradients computed here
    are not differentiable, so a second derivative would silently miss this term: refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: not twice differentiable (backward with create_graph=True)")


class _FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, rows, num_valid, targets_c, opts):
        # needs_input_grad ignores torch.no_grad(); the caller's grad mode is in opts.
        need_dx = opts["grad_enabled"] and ctx.needs_input_grad[0]
        need_dw = opts["grad_enabled"] and ctx.needs_input_grad[1]
        eager = opts["reduction"] != "none" and (need_dx or need_dw)
        # Scalar output: compute the gradient now and scale it by grad_output (and, for "mean",
        # 1 / valid rows) in backward, after the exact fp32 sums: a 1/N folded into the 16-bit
        # logit gradient would push fp16 values into the subnormals at large N.
        row_scale = torch.ones(rows.numel(), dtype=torch.float32, device=h_s.device) if eager else None
        loss_c, s_lp, t_lp, dx, dw = opts["ops"].divergence_chunked(
            h_s, w_s, h_t, w_t, rows, num_valid, targets_c, row_scale=row_scale,
            need_dx=need_dx, need_dw=need_dw, **opts["kw"],
        )
        per_token = _scatter(loss_c, rows)
        if opts["reduction"] == "none":
            loss = per_token.clone()
            ctx.save_for_backward(h_s, w_s, h_t, w_t, rows, num_valid)
        else:
            loss = loss_c.sum()
            if opts["reduction"] == "mean":
                loss = loss / num_valid.clamp(min=1).squeeze(0)
        # Eager gradients stay unrounded (fp32) until backward knows grad_output.
        ctx.grads = (dx, dw) if eager else None
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.opts, ctx.eager = opts, eager
        ctx.num_valid = num_valid if eager else None
        outs = (per_token, _scatter(s_lp, rows), _scatter(t_lp, rows))
        ctx.mark_non_differentiable(*[t for t in outs if t is not None])
        return (loss, *outs)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        _once_differentiable("fused_linear_divergence")
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ops = ctx.opts["ops"]
        if ctx.eager:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_divergence: backward through the same call twice is not supported")
            (dx, dw), ctx.grads = ctx.grads, None  # finished in place: release them
            scale = grad_loss.to(torch.float32).reshape(1)
            if ctx.opts["reduction"] == "mean":
                scale = scale / ctx.num_valid.clamp(min=1).to(torch.float32)
        else:
            h_s, w_s, h_t, w_t, rows, num_valid = ctx.saved_tensors
            row_scale = grad_loss.to(torch.float32)[rows].contiguous()
            _, _, _, dx, dw = ops.divergence_chunked(
                h_s, w_s, h_t, w_t, rows, num_valid, None, row_scale=row_scale,
                need_dx=need_dx, need_dw=need_dw, **ctx.opts["kw"],
            )
            scale = None
        dx, dw = ops.finish_grads(dx, dw, scale, *ctx.dtypes)
        return dx, dw, None, None, None, None, None, None


class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, rows, num_valid, targets_c, opts):
        # torch backend, gradient wanted: the last chunk's softmax is kept for backward (all rows
        # when they fit one chunk)
        keep = [] if (opts["ops"] is torch_backend and opts["grad_enabled"]
                      and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])) else None
        lp_c, _, _ = opts["ops"].logprob_chunked(
            h, w, rows, num_valid, targets_c, row_scale=None, need_dx=False, need_dw=False,
            **opts["kw"], **({} if keep is None else {"keep": keep}),
        )
        ctx.kept = keep[0] if keep else None
        ctx.save_for_backward(h, w, rows, num_valid, targets_c)
        ctx.opts = opts
        return _scatter(lp_c, rows)

    @staticmethod
    def backward(ctx, grad_lp):
        _once_differentiable("fused_linear_logprob")
        h, w, rows, num_valid, targets_c = ctx.saved_tensors
        row_scale = grad_lp.to(torch.float32)[rows].contiguous()
        ops = ctx.opts["ops"]
        if ctx.kept is not None:
            # released here, not with the graph (a caller may hold the output for long); the
            # buffer is also reused for the rows before the kept ones. A second backward
            # (retain_graph) recomputes every row.
            kept, ctx.kept = ctx.kept, None
            dx, dw = torch_backend.logprob_backward_kept(
                kept, h, w, rows, num_valid, targets_c, row_scale, temperature=ctx.opts["kw"]["temperature"],
                need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        else:
            _, dx, dw = ops.logprob_chunked(
                h, w, rows, num_valid, targets_c, row_scale=row_scale,
                need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1], **ctx.opts["kw"],
            )
        dx, dw = ops.finish_grads(dx, dw, None, h.dtype, w.dtype)
        return dx, dw, None, None, None, None


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
    backend: str | None = None,
    chunk_size: int | None = None,
) -> DivergenceOutput:
    """Divergence between teacher and student next-token distributions, without the logits.

    p = softmax((hidden @ W.T) / temperature) for both heads. `forward_kl` = KL(p_t || p_s),
    `reverse_kl` = KL(p_s || p_t), `jsd` = beta KL(p_t || M) + (1-beta) KL(p_s || M) with
    M = (1-beta) p_s + beta p_t. `clip` (forward_kl only) clamps each per-vocabulary summand at
    max=clip before the sum. `teacher_weight=None` shares `weight`. The teacher never gets a
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
    _check_pair("student_hidden", student_hidden, "weight", weight)
    _check_pair("teacher_hidden", teacher_hidden, "teacher_weight" if teacher_weight is not None else "weight", w_t)
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
    _check_options(divergence=divergence, beta=beta, temperature=temperature, clip=clip,
                   reduction=reduction, chunk_size=chunk_size)
    device = student_hidden.device
    _check_rows("mask", mask, n, lead, device)
    _check_rows("target_ids", target_ids, n, lead, device)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
    if target_ids is not None:
        _check_targets(target_ids, weight.shape[0], mask)
    name = resolve_backend(backend, device)

    h_s = student_hidden.reshape(n, student_hidden.shape[-1]).contiguous()  # n may be 0
    h_t = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1]).contiguous()
    w_t = w_t.detach().contiguous() if teacher_weight is not None else weight.contiguous()
    rows, num_valid = _compact(mask, n, device)
    targets_c = None if target_ids is None else target_ids.reshape(-1).to(torch.int64)[rows].contiguous()
    kw = dict(divergence=divergence, beta=float(beta), temperature=float(temperature),
              clip=None if clip is None else float(clip),
              chunk_size=_chunk_rows(chunk_size, name, weight.shape[0], max(h_s.shape[1], h_t.shape[1]),
                                     divergence, clip))
    opts = dict(ops=_ops(name), reduction=reduction, kw=kw, grad_enabled=torch.is_grad_enabled())
    # A shared teacher weight is passed as the same tensor object, so backends can reuse it;
    # backward returns no gradient for the teacher slots.
    loss, per_token, s_lp, t_lp = _FusedDivergence.apply(
        h_s, weight.contiguous(), h_t, w_t, rows, num_valid, targets_c, opts
    )
    return DivergenceOutput(loss=loss, per_token=per_token, student_logprob=s_lp, teacher_logprob=t_lp)


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log softmax((hidden @ W.T) / temperature)[target] per row, [N], differentiable (once) in
    hidden and weight, without materialising the logits. Masked rows give 0 and cost nothing.
    The fp16 caveat of `fused_linear_divergence` applies to the upstream gradient here too."""
    _check_pair("hidden", hidden, "weight", weight)
    if not isinstance(target_ids, torch.Tensor):
        raise ValueError("target_ids: expected a tensor")
    _check_options(True, temperature=temperature, chunk_size=chunk_size)
    lead = tuple(hidden.shape[:-1])
    n = math.prod(lead)
    _check_rows("target_ids", target_ids, n, lead, hidden.device)
    _check_rows("mask", mask, n, lead, hidden.device)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
    _check_targets(target_ids, weight.shape[0], mask)
    name = resolve_backend(backend, hidden.device)
    rows, num_valid = _compact(mask, n, hidden.device)
    targets_c = target_ids.reshape(-1).to(torch.int64)[rows].contiguous()
    kw = dict(temperature=float(temperature), chunk_size=_chunk_rows(chunk_size, name, *weight.shape, "logprob"))
    return _FusedLogprob.apply(
        hidden.reshape(n, hidden.shape[-1]).contiguous(), weight.contiguous(), rows, num_valid, targets_c,
        dict(ops=_ops(name), kw=kw, grad_enabled=torch.is_grad_enabled()),
    )


class FusedLinearDivergence(torch.nn.Module):
    """nn.Module form of `fused_linear_divergence` with the loss options fixed at construction."""

    def __init__(self, divergence="forward_kl", *, beta=0.5, temperature=1.0, clip=None,
                 reduction="mean", backend=None, chunk_size=None):
        super().__init__()
        self.kw = dict(divergence=divergence, beta=beta, temperature=temperature, clip=clip,
                       reduction=reduction, backend=backend, chunk_size=chunk_size)
        _check_options(**self.kw)  # at construction, not at the first forward

    def forward(self, student_hidden, weight, teacher_hidden, teacher_weight=None, *, mask=None,
                target_ids=None) -> DivergenceOutput:
        return fused_linear_divergence(student_hidden, weight, teacher_hidden, teacher_weight,
                                       mask=mask, target_ids=target_ids, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class FusedLinearLogprob(torch.nn.Module):
    """nn.Module form of `fused_linear_logprob`."""

    def __init__(self, *, temperature=1.0, backend=None, chunk_size=None):
        super().__init__()
        self.kw = dict(temperature=temperature, backend=backend, chunk_size=chunk_size)
        _check_options(True, **self.kw)

    def forward(self, hidden, weight, target_ids, *, mask=None) -> torch.Tensor:
        return fused_linear_logprob(hidden, weight, target_ids, mask=mask, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
