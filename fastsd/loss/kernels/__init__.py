"""Triton kernels and their launchers (inside the package: a top-level `kernels` would shadow
Hugging Face's package of that name, which transformers imports).

`divergence_chunked` and `logprob_chunked` are the Triton backend of `fastsd.loss.api`; they share
the contract of `fastsd.loss.torch_backend`. Rows arrive compacted (valid first, count on the
device), so nothing here synchronises with the host. Per chunk of C rows: two logits GEMMs into
fp32 workspaces, one row kernel; per group of chunks (the gradient block), the dX and dW GEMMs.
Workspace: 2 x [C, V] fp32 logits + [G, V] gradient in the weight dtype, independent of N.
Gradients come back unrounded (fp32 dX; dW as fp32 or, for bf16, a split accumulator) and
`finish_grads` scales and rounds them once.
"""

from __future__ import annotations

import functools

import torch

from ..topk import topk_rows_into
from .gemm import dw_accumulate, dw_finish, dx_rows, logits
from .rows import divergence_rows, logprob_rows

__all__ = ["divergence_chunked", "logprob_chunked", "finish_grads"]


def _grad_buffers(h, w, need_dx, need_dw):
    """fp32 dX (zeros: masked rows keep 0); the dW accumulator and, for bf16, its low-half plane."""
    dx = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_dx else None
    dw = lo = None
    if need_dw:
        if w.dtype == torch.bfloat16:
            dw = torch.zeros_like(w)
            lo = torch.zeros(w.shape, dtype=torch.int16, device=w.device)
        else:
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    return dx, dw, lo


def finish_grads(dx, dw, scale, dx_dtype, dw_dtype):
    """Scale the exact fp32 gradients by the upstream gradient `scale` (None: 1) and round
    them to the parameter dtypes, once."""
    if dx is not None:
        dx = (dx if scale is None else dx.mul_(scale)).to(dx_dtype)
    if isinstance(dw, tuple):
        dw = dw_finish(*dw, scale)
    elif dw is not None:
        dw = (dw if scale is None else dw.mul_(scale)).to(dw_dtype)
    return dx, dw


def _grad_rows(c: int, w: torch.Tensor) -> int:
    # dW re-reads and re-writes its accumulator once per gradient block, so 16-bit gradients
    # (half the bytes of the fp32 logits) get blocks of two chunks.
    return c * (2 if w.element_size() == 2 else 1)


def _as_weight(h, w):
    """h in w's dtype: the GEMMs take both operands in the weight's dtype (16-bit activations
    over fp32 weights, as autocast leaves them, are widened; dX stays fp32 and is rounded to
    h's own dtype by `finish_grads`)."""
    return h if h.dtype == w.dtype else h.to(w.dtype)


def divergence_chunked(h_s, w_s, h_t, w_t, rows, num_valid, targets_c, *, divergence, beta,
                       temperature, clip, row_scale, chunk_size, need_dx, need_dw, entropy=None, topk=None):
    """`topk` (k, topk_from, tail): the row math is `fastsd.loss.topk`'s, in torch on the chunk."""
    h_s, h_t = _as_weight(h_s, w_s), _as_weight(h_t, w_t)
    N, V = rows.numel(), w_s.shape[0]
    dev, f32 = h_s.device, torch.float32
    C = max(1, min(chunk_size, N))
    grad = row_scale is not None and (need_dx or need_dw)
    G = _grad_rows(C, w_s) if grad else C
    z_s = torch.empty(C, V, dtype=f32, device=dev)
    z_t = torch.empty(C, V, dtype=f32, device=dev)
    g = torch.empty(G, V, dtype=w_s.dtype, device=dev) if grad else None
    loss = torch.zeros(N, dtype=f32, device=dev)
    s_lp = t_lp = None
    if targets_c is not None:
        s_lp, t_lp = torch.zeros_like(loss), torch.zeros_like(loss)
    dx, dw, lo = _grad_buffers(h_s, w_s, grad and need_dx, grad and need_dw)
    inv_temp = 1.0 / temperature
    row_math = divergence_rows if topk is None else functools.partial(topk_rows_into, topk=topk)
    for g0 in range(0, N, G):
        gc = min(G, N - g0)
        for c0 in range(g0, g0 + gc, C):
            c = min(C, N - c0)
            logits(h_s, rows, num_valid, w_s, z_s, c0, c, inv_temp)
            logits(h_t, rows, num_valid, w_t, z_t, c0, c, inv_temp)
            row_math(z_s, z_t, None if g is None else g[c0 - g0:], loss, s_lp, t_lp,
                     targets_c, row_scale, num_valid, c0, c, divergence=divergence,
                     beta=beta, clip=clip, inv_temp=inv_temp, entropy=entropy)
        if dx is not None:
            dx_rows(g, w_s, rows, num_valid, dx, g0, gc)
        if dw is not None:
            dw_accumulate(g, h_s, rows, num_valid, dw, lo, g0, gc)
    return loss, s_lp, t_lp, dx, dw if lo is None else (dw, lo)


def logprob_chunked(h, w, rows, num_valid, targets_c, *, temperature, row_scale, chunk_size,
                    need_dx, need_dw, entropy=None):
    h = _as_weight(h, w)
    N, V = rows.numel(), w.shape[0]
    dev, f32 = h.device, torch.float32
    C = max(1, min(chunk_size, N))
    grad = row_scale is not None and (need_dx or need_dw)
    G = _grad_rows(C, w) if grad else C
    z = torch.empty(C, V, dtype=f32, device=dev)
    g = torch.empty(G, V, dtype=w.dtype, device=dev) if grad else None
    lp = torch.zeros(N, dtype=f32, device=dev)
    dx, dw, lo = _grad_buffers(h, w, grad and need_dx, grad and need_dw)
    inv_temp = 1.0 / temperature
    for g0 in range(0, N, G):
        gc = min(G, N - g0)
        for c0 in range(g0, g0 + gc, C):
            c = min(C, N - c0)
            logits(h, rows, num_valid, w, z, c0, c, inv_temp)
            logprob_rows(z, None if g is None else g[c0 - g0:], lp, targets_c, row_scale,
                         num_valid, c0, c, inv_temp=inv_temp, entropy=entropy)
        if dx is not None:
            dx_rows(g, w, rows, num_valid, dx, g0, gc)
        if dw is not None:
            dw_accumulate(g, h, rows, num_valid, dw, lo, g0, gc)
    return lp, dx, dw if lo is None else (dw, lo)
