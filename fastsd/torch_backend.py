"""Chunked PyTorch implementation of the fused losses, for CPUs (and as a fallback anywhere).

Same contract as the Triton launchers in `fastsd.kernels`: rows arrive compacted (valid rows
first, `rows[i]` is the original index of compact row i), outputs are in compact order except
the hidden-state gradient, which is scattered back to the original rows. Logits and all softmax
math are float32.

Memory (`workspace_bytes`, which `fastsd.loss` sizes the chunks with): per call, one [C, V] fp32
buffer per head plus the row math's scratch (forward and reverse KL: one [C, V] fp32 buffer, and
clip a [C, V] bool mask; JSD: three; log-prob: none), allocated once and reused by every chunk.
The GEMMs write into them and the row math works in place: log_softmax into its own input (one
fused op per row), then a few elementwise passes, leaving d loss / d z_s in the student buffer,
which the dX/dW GEMMs read. Few, large ops: on a loaded 2-core machine each parallel op can wait
a scheduler slice, so splitting a chunk's row math into cache-sized row blocks was 2-10x slower.

Per row, and the gradient w.r.t. the student logits z_s (before the 1/temperature factor):
    forward_kl          sum_v p_t (log p_t - log p_s),  grad p_s - p_t
    forward_kl + clip   grad p_s * sum_v(k_v p_t,v) - k p_t,   k_v = [p_t,v (log p_t,v - log p_s,v) <= clip]
    reverse_kl          KL = sum_v p_s (log p_s - log p_t),  grad p_s * (log p_s - log p_t - KL)
    jsd(beta)           grad (1 - beta) p_s * (log p_s - log M - KL(p_s || M)),  M = (1-beta) p_s + beta p_t
"""

from __future__ import annotations

import torch

__all__ = ["divergence_chunked", "logprob_chunked", "logprob_backward_kept", "finish_grads", "workspace_bytes",
           "chunk_rows"]

F32 = torch.float32
_TINY = torch.finfo(F32).tiny  # log M where both p underflow: finite, and times p = 0 it gives 0
_SCRATCH = {"forward_kl": 1, "reverse_kl": 1, "jsd": 3, "logprob": 0}  # [C, V] fp32 scratch buffers


def _row_bytes(vocab: int, width: int, kind: str, clip) -> int:
    heads = 1 if kind == "logprob" else 2
    per_elem = 4 * (heads + _SCRATCH[kind]) + (clip is not None)  # clip: a bool mask
    return per_elem * vocab + (heads + 1) * width * 4


def workspace_bytes(chunk: int, vocab: int, width: int, kind: str, clip: float | None = None) -> int:
    """Peak bytes one call allocates beyond its inputs, the fp32 gradient accumulators (dX [N, D],
    dW [V, D]) and, for 16-bit weights, fp32 copies of the weights ([V, D] per head): the [C, V]
    buffers above and [C, D] fp32 hidden states per head plus the chunk's dX product.
    `kind`: a divergence or "logprob"."""
    return chunk * _row_bytes(vocab, width, kind, clip)


def chunk_rows(budget: int, vocab: int, width: int, kind: str, clip: float | None = None) -> int:
    """Rows per chunk: the largest multiple of 16 whose `workspace_bytes` fits `budget` bytes
    (at least 16, whatever the budget)."""
    return max(16, budget // _row_bytes(vocab, width, kind, clip) // 16 * 16)


def _log_softmax_(a):
    """In place, one fused op per row: a = log softmax(a). (The CPU kernel reads a row for its
    max and sum before it writes it: checked equal to the out-of-place result.)"""
    return torch.log_softmax(a, 1, out=a)


def _row_math(a, b, s, divergence, beta, clip, tgt, scale):
    """Row math for one chunk, in place. a, b: [C, V] student / teacher logits (divided by the
    temperature); s: the scratch buffers ([C, V] each). Returns (loss [C], lp_s, lp_t (None
    without `tgt`)); with `scale` [C] (d out / d loss times 1/temperature), a ends as d out / d z_s."""
    _log_softmax_(a), _log_softmax_(b)
    lps = lpt = None
    if tgt is not None:
        lps, lpt = a.gather(1, tgt).squeeze(1), b.gather(1, tgt).squeeze(1)
    if divergence == "jsd":
        return _jsd(a, b, *s, beta, scale), lps, lpt
    d = s[0]
    if divergence == "reverse_kl":
        torch.sub(a, b, out=d)  # log p_s - log p_t
        kl = torch.mul(a.exp_(), d, out=b).sum(1)  # a = p_s
        if scale is not None:  # p_s (log p_s - log p_t - KL)
            a.mul_(d.sub_(kl[:, None]).mul_(scale[:, None]))
        return kl, lps, lpt
    torch.sub(b, a, out=d).mul_(b.exp_())  # b = p_t, d = p_t (log p_t - log p_s)
    if clip is None:
        loss = d.sum(1)
        if scale is not None:  # p_s - p_t
            a.exp_().sub_(b).mul_(scale[:, None])
        return loss, lps, lpt
    kept = d <= clip
    loss = d.clamp_(max=clip).sum(1)
    if scale is not None:  # p_s K - [kept] p_t
        # not torch.mul(b, kept): a bool operand is cast to a float [C, V] temporary
        k = d.copy_(b).masked_fill_(kept.logical_not_(), 0).sum(1)
        a.exp_().mul_((scale * k)[:, None]).addcmul_(d, scale[:, None], value=-1)
    return loss, lps, lpt


def _jsd(a, b, ps, pt, log_m, beta, scale):
    """JSD row math in place on a = log p_s, b = log p_t; the other three are scratch."""
    torch.exp(a, out=ps), torch.exp(b, out=pt)
    torch.mul(ps, 1 - beta, out=log_m).add_(pt, alpha=beta).clamp_(min=_TINY).log_()
    kl_t = b.sub_(log_m).mul_(pt).sum(1)  # b is free after this
    kl_s = torch.mul(a.sub_(log_m), ps, out=pt).sum(1)  # a = log p_s - log M
    if scale is not None:
        a.sub_(kl_s[:, None]).mul_(ps).mul_(((1 - beta) * scale)[:, None])
    return beta * kl_t + (1 - beta) * kl_s


def _logits(h, rows, w32, out, inv_temp):
    """out = (h[rows] @ w32.T) * inv_temp in fp32; returns the chunk's fp32 hidden states."""
    hc = h[rows].to(F32)
    torch.mm(hc, w32.T, out=out)
    if inv_temp != 1.0:
        out.mul_(inv_temp)
    return hc


def _grad_buffers(h, w, need_dx, need_dw, n):
    """fp32 dX (zeros: masked rows keep 0) and dW (written by the first chunk's GEMM if n > 0)."""
    dx = torch.zeros(h.shape, dtype=F32, device=h.device) if need_dx else None
    dw = (torch.empty if n else torch.zeros)(w.shape, dtype=F32, device=w.device) if need_dw else None
    return dx, dw


def _backprop(g, hc, w32, r, dx, dw, first):
    if dx is not None:
        dx[r] = g @ w32
    if dw is not None:  # in place: no [V, D] temporary; the first chunk also skips a zero fill
        torch.mm(g.T, hc, out=dw) if first else dw.addmm_(g.T, hc)


def divergence_chunked(h_s, w_s, h_t, w_t, rows, num_valid, targets_c, *, divergence, beta,
                       temperature, clip, row_scale, chunk_size, need_dx, need_dw):
    """Returns (loss_c [N], s_lp_c [N] | None, t_lp_c [N] | None, dx | None, dw | None), the
    gradients in fp32 and not yet rounded (see `finish_grads`).

    `row_scale` [N] (compact order) is d(output)/d(loss_c); None computes no gradient.
    """
    n, N, V = int(num_valid), rows.numel(), w_s.shape[0]
    dev = h_s.device
    loss = torch.zeros(N, dtype=F32, device=dev)
    s_lp = t_lp = None
    if targets_c is not None:
        s_lp, t_lp = torch.zeros_like(loss), torch.zeros_like(loss)
    grad = row_scale is not None
    dx, dw = _grad_buffers(h_s, w_s, grad and need_dx, grad and need_dw, n)
    if n == 0:
        return loss, s_lp, t_lp, dx, dw
    ws32 = w_s.to(F32)
    wt32 = ws32 if w_t is w_s else w_t.to(F32)
    C = max(1, min(chunk_size, n))
    zs, zt, *scratch = (torch.empty(C, V, dtype=F32, device=dev) for _ in range(2 + _SCRATCH[divergence]))
    inv_temp = 1.0 / temperature
    for c0 in range(0, n, C):
        c1 = min(c0 + C, n)
        c, r = c1 - c0, rows[c0:c1]
        hs = _logits(h_s, r, ws32, zs[:c], inv_temp)
        _logits(h_t, r, wt32, zt[:c], inv_temp)
        tgt = None if targets_c is None else targets_c[c0:c1, None]
        scale = row_scale[c0:c1] * inv_temp if grad else None
        loss[c0:c1], lps, lpt = _row_math(zs[:c], zt[:c], [t[:c] for t in scratch], divergence, beta,
                                          clip, tgt, scale)
        if tgt is not None:
            s_lp[c0:c1], t_lp[c0:c1] = lps, lpt
        if grad:
            _backprop(zs[:c], hs, ws32, r, dx, dw, c0 == 0)
    return loss, s_lp, t_lp, dx, dw


def logprob_chunked(h, w, rows, num_valid, targets_c, *, temperature, row_scale, chunk_size,
                    need_dx, need_dw, keep=None):
    """Returns (lp_c [N], dx [N, D] | None, dw [V, D] | None): log p(target) per compact row.

    `keep` (a list, forward only): when the valid rows fit one chunk, the chunk's d log p / d z
    (onehot - p, unscaled) is appended to it, for `logprob_backward_kept`: the backward then
    needs no second logits GEMM (3 GEMMs in all, as eager), and the buffer, at most the
    workspace, lives until then."""
    n, N, V = int(num_valid), rows.numel(), w.shape[0]
    lp = torch.zeros(N, dtype=F32, device=h.device)
    grad = row_scale is not None
    dx, dw = _grad_buffers(h, w, grad and need_dx, grad and need_dw, n)
    if n == 0:
        return lp, dx, dw
    w32 = w.to(F32)
    C = max(1, min(chunk_size, n))
    z = torch.empty(C, V, dtype=F32, device=h.device)
    inv_temp = 1.0 / temperature
    for c0 in range(0, n, C):
        c1 = min(c0 + C, n)
        a, r, tgt = z[:c1 - c0], rows[c0:c1], targets_c[c0:c1, None]
        hc = _logits(h, r, w32, a, inv_temp)
        lp[c0:c1] = picked = _log_softmax_(a).gather(1, tgt).squeeze(1)
        if grad:  # d log p(y) / d z = onehot(y) - p, times row_scale / temperature
            scale = row_scale[c0:c1] * inv_temp
            a.exp_().mul_(-scale[:, None]).scatter_add_(1, tgt, scale[:, None])
            _backprop(a, hc, w32, r, dx, dw, c0 == 0)
        elif keep is not None and n <= C:
            keep.append(a.exp_().neg_().scatter_add_(1, tgt, torch.ones_like(picked)[:, None]))
    return lp, dx, dw


def logprob_backward_kept(g0, h, w, rows, row_scale, *, temperature, need_dx, need_dw):
    """dX, dW (fp32) from the kept onehot - p of `logprob_chunked`. The per-row scale goes on
    the [n, D] operands, not on g0, so g0 stays as it is (a second backward gives the same)."""
    n = g0.shape[0]
    dx, dw = _grad_buffers(h, w, need_dx, need_dw, n)
    r, u = rows[:n], (row_scale[:n] / temperature)[:, None]
    w32 = w.to(F32)
    if dx is not None:
        dx[r] = (g0 @ w32).mul_(u)
    if dw is not None:
        torch.mm(g0.T, h[r].to(F32).mul_(u), out=dw)  # h[r] is a copy: the in-place scale is safe
    return dx, dw


def finish_grads(dx, dw, scale, dx_dtype, dw_dtype):
    """Scale the fp32 gradients by the upstream gradient `scale` (None: 1), round once."""
    if scale is not None:
        dx = None if dx is None else dx.mul_(scale)
        dw = None if dw is None else dw.mul_(scale)
    return (None if dx is None else dx.to(dx_dtype)), (None if dw is None else dw.to(dw_dtype))
