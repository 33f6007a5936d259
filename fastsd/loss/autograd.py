"""The autograd Functions of the fused losses, and what they run on: the backend's chunked ops,
the rows per chunk, the compaction of masked rows.

Masked rows are compacted before any matmul: a stable argsort puts valid rows first and the count
of valid rows stays on the device (no host synchronisation). The divergence with a scalar loss
(reduction mean or sum) computes its gradients in the forward, in the same pass over the
vocabulary, and the backward only scales them; with reduction="none", and for the log-prob, the
backward recomputes the chunks (the log-prob's torch backend keeps its last chunk's softmax).
"""

from __future__ import annotations

import functools
import os

import torch

from . import torch_backend

__all__ = ["FusedDivergenceFunction", "FusedLogprobFunction", "backend_ops", "chunk_rows", "compact", "scatter"]

# Default workspace of one call (torch backend: every buffer; Triton: the fp32 logits), in MiB.
_WORKSPACE_BYTES = int(float(os.environ.get("FASTSD_WORKSPACE_MB", "512")) * 2**20)


def backend_ops(backend: str):
    if backend == "torch":
        return torch_backend
    from . import kernels  # imported lazily: triton is only needed for this backend

    return kernels


def chunk_rows(chunk_size: int | None, backend: str, vocab: int, width: int, kind: str, clip=None, *,
               entropy: bool = False, topk=None) -> int:
    """Rows per chunk: `chunk_size`, or the most whose buffers fit the workspace. The torch
    backend counts every buffer it allocates (`torch_backend.workspace_bytes`); the Triton
    backend counts its fp32 logits only (its gradient buffer adds half again, see docs/loss.md).
    `kind`: the divergence or "logprob"; `topk`: K of a top-k divergence."""
    if chunk_size is not None:
        return int(chunk_size)
    if backend == "torch":
        return torch_backend.chunk_rows(_WORKSPACE_BYTES, vocab, width, kind, clip, entropy=entropy, topk=topk)
    heads = 1 if kind == "logprob" else 2
    return max(16, _WORKSPACE_BYTES // (4 * heads * vocab) // 16 * 16)


def compact(mask: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid rows first (stable), and their count as a device tensor: no host sync."""
    if mask is None:
        return torch.arange(n, device=device), torch.full((1,), n, dtype=torch.int64, device=device)
    m = mask.reshape(-1).to(torch.bool)
    rows = torch.argsort((~m).to(torch.int8), stable=True)
    return rows, m.sum(dtype=torch.int64).reshape(1)


def scatter(values_c: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """Compact order -> original order (rows past num_valid hold zeros already)."""
    if values_c is None:
        return None
    return torch.empty_like(values_c).index_copy_(0, rows, values_c)


def _entropy_buffer(opts, rows):
    """[N] fp32 (compact order) for the student's entropy when asked for (zeros: masked rows)."""
    return torch.zeros(rows.numel(), dtype=torch.float32, device=rows.device) if opts["entropy"] else None


def _weighted(values_c, opts):
    """values_c times the per-token weights (compact order; masked rows 0), if any."""
    return values_c if opts["weights"] is None else values_c * opts["weights"]


def _once_differentiable(name: str) -> None:
    """Backward runs with grad mode on only under create_graph=True. The gradients computed here
    are not differentiable, so a second derivative would silently miss this term: refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: not twice differentiable (backward with create_graph=True)")


def _autocast_off(fn):
    """Run a forward/backward with autocast off on the inputs' device: the backends cast
    explicitly (fp32 logits and softmax math; dX/dW in fp32, rounded to each input's dtype by
    `finish_grads`), and an autocast matmul would hand them 16-bit products."""

    @functools.wraps(fn)
    def run(ctx, first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return fn(ctx, first, *args)

    return run


class FusedDivergenceFunction(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, h_s, w_s, h_t, w_t, rows, num_valid, targets_c, opts):
        # needs_input_grad ignores torch.no_grad(); the caller's grad mode is in opts.
        need_dx = opts["grad_enabled"] and ctx.needs_input_grad[0]
        need_dw = opts["grad_enabled"] and ctx.needs_input_grad[1]
        eager = opts["reduction"] != "none" and (need_dx or need_dw)
        # Scalar output: compute the gradient now and scale it by grad_output (and, for "mean",
        # 1 / valid rows) in backward, after the exact fp32 sums: a 1/N folded into the 16-bit
        # logit gradient would push fp16 values into the subnormals at large N.
        # The per-token weights ride on the row factor: each row's gradient is scaled by its weight.
        row_scale = None
        if eager:
            row_scale = (torch.ones(rows.numel(), dtype=torch.float32, device=h_s.device)
                         if opts["weights"] is None else opts["weights"])
        entropy = _entropy_buffer(opts, rows)
        loss_c, s_lp, t_lp, dx, dw = opts["ops"].divergence_chunked(
            h_s, w_s, h_t, w_t, rows, num_valid, targets_c, row_scale=row_scale,
            need_dx=need_dx, need_dw=need_dw, entropy=entropy, **opts["kw"],
        )
        per_token = scatter(loss_c, rows)
        if opts["reduction"] == "none":
            loss = per_token.clone() if opts["weights"] is None else scatter(_weighted(loss_c, opts), rows)
            ctx.save_for_backward(h_s, w_s, h_t, w_t, rows, num_valid)
        else:
            loss = _weighted(loss_c, opts).sum()
            if opts["reduction"] == "mean":
                loss = loss / num_valid.clamp(min=1).squeeze(0)
        # Eager gradients stay unrounded (fp32) until backward knows grad_output.
        ctx.grads = (dx, dw) if eager else None
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.opts, ctx.eager = opts, eager
        ctx.num_valid = num_valid if eager else None
        outs = (per_token, scatter(s_lp, rows), scatter(t_lp, rows), scatter(entropy, rows))
        ctx.mark_non_differentiable(*[t for t in outs if t is not None])
        return (loss, *outs)

    @staticmethod
    @_autocast_off
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
            row_scale = _weighted(grad_loss.to(torch.float32)[rows], ctx.opts).contiguous()
            _, _, _, dx, dw = ops.divergence_chunked(
                h_s, w_s, h_t, w_t, rows, num_valid, None, row_scale=row_scale,
                need_dx=need_dx, need_dw=need_dw, **ctx.opts["kw"],
            )
            scale = None
        dx, dw = ops.finish_grads(dx, dw, scale, *ctx.dtypes)
        return dx, dw, None, None, None, None, None, None


class FusedLogprobFunction(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, h, w, rows, num_valid, targets_c, opts):
        # torch backend, gradient wanted: the last chunk's softmax is kept for backward (all rows
        # when they fit one chunk)
        keep = [] if (opts["ops"] is torch_backend and opts["grad_enabled"]
                      and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])) else None
        entropy = _entropy_buffer(opts, rows)
        lp_c, _, _ = opts["ops"].logprob_chunked(
            h, w, rows, num_valid, targets_c, row_scale=None, need_dx=False, need_dw=False,
            entropy=entropy, **opts["kw"], **({} if keep is None else {"keep": keep}),
        )
        ctx.kept = keep[0] if keep else None
        ctx.save_for_backward(h, w, rows, num_valid, targets_c)
        ctx.opts = opts
        lp = scatter(_weighted(lp_c, opts), rows)
        if entropy is None:
            return lp
        entropy = scatter(entropy, rows)
        ctx.mark_non_differentiable(entropy)
        return lp, entropy

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_lp, *_):
        _once_differentiable("fused_linear_logprob")
        h, w, rows, num_valid, targets_c = ctx.saved_tensors
        row_scale = _weighted(grad_lp.to(torch.float32)[rows], ctx.opts).contiguous()
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
