"""Chunked PyTorch implementation of the fused losses, for CPUs (and as a fallback anywhere).

Same contract as the Triton launchers in `fastsd.kernels`: rows arrive compacted (valid rows
first, `rows[i]` is the original index of compact row i), outputs are in compact order except
the hidden-state gradient, which is scattered back to the original rows. Logits and all softmax
math are float32.

Memory (see `workspace_bytes`, which `fastsd.loss` sizes the chunks with): one [C, V] fp32
buffer per head, allocated once per call and reused by every chunk; the GEMMs write into them,
the row math works in place and leaves d loss / d z_s in the student buffer, which the dX/dW
GEMMs read. The row math runs over blocks of `_block_rows` rows so that its few scratch buffers
([R, V], R small) stay in the CPU cache: the exponentials are computed once per element, and the
other passes cost cache, not DRAM, bandwidth.

With a = z - max(z) per row, l = log sum_v exp(a), log p = a - l. Gradient w.r.t. the student
logits z_s (before the 1/temperature factor), per row:
    forward_kl          p_s - p_t,  loss = E_pt[a_t - a_s] - l_t + l_s
    forward_kl + clip   p_s * sum_v(k_v p_t,v) - k p_t,   k_v = [p_t,v (log p_t,v - log p_s,v) <= clip]
    reverse_kl          p_s * (log p_s - log p_t - KL),  KL = E_ps[a_s - a_t] - l_s + l_t
    jsd(beta)           (1 - beta) p_s * (log p_s - log M - KL(p_s || M)),  M = (1-beta) p_s + beta p_t
"""

from __future__ import annotations

import torch

__all__ = ["divergence_chunked", "logprob_chunked", "finish_grads", "workspace_bytes", "chunk_rows"]

F32 = torch.float32
_BLOCK_BYTES = 2 * 2**20  # one [R, V] fp32 scratch block: ~2 MiB, three of them sit in the L3 cache
_SCRATCH = 3  # [R, V] fp32 scratch blocks the row math uses (clip adds a [R, V] bool mask)
_TINY = torch.finfo(F32).tiny  # log M of rows where both p underflow: finite, times p = 0 gives 0


def _block_rows(vocab: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * vocab))


def _scratch_bytes(rows: int, vocab: int, heads: int) -> int:
    # divergence: three fp32 blocks and clip's bool mask; log-prob: one fp32 block
    return (_SCRATCH * 4 + 1 if heads == 2 else 4) * rows * vocab


def workspace_bytes(chunk: int, vocab: int, width: int, heads: int) -> int:
    """Peak bytes one call allocates beyond its inputs, the fp32 gradient accumulators (dX
    [N, D], dW [V, D]) and, for 16-bit weights, their fp32 copies ([V, D] per head): `heads`
    [C, V] fp32 logits buffers, the row math's scratch blocks, and [C, D] fp32 hidden states
    per head plus the chunk's dX product."""
    rows = min(chunk, _block_rows(vocab))
    return heads * chunk * vocab * 4 + _scratch_bytes(rows, vocab, heads) + (heads + 1) * chunk * width * 4


def chunk_rows(budget: int, vocab: int, width: int, heads: int) -> int:
    """Rows per chunk: the largest multiple of 16 whose `workspace_bytes` fits `budget` bytes
    (at least 16, whatever the budget)."""
    per_row = heads * vocab * 4 + (heads + 1) * width * 4
    fixed = _scratch_bytes(_block_rows(vocab), vocab, heads)
    return max(16, (budget - fixed) // per_row // 16 * 16)


def _lse(a, e):
    """In place: a -= max per row; e = exp(a). Returns the row sums of e and their log."""
    a.sub_(a.amax(1, keepdim=True))
    torch.exp(a, out=e)
    s = e.sum(1)
    return s, s.log()


def _div_block(a, b, s1, s2, s3, divergence, beta, clip, tgt, scale):
    """Row math for one block of rows, in place. a, b: [R, V] student / teacher logits (already
    divided by the temperature); s1..s3: [R, V] scratch. Returns (loss [R], lp_s, lp_t (or None));
    with `scale` [R] (d out / d loss times 1/temperature), a ends as d out / d z_s."""
    sum_s, l_s = _lse(a, s1)  # a = a_s, s1 = exp(a_s)
    sum_t, l_t = _lse(b, s2)  # b = a_t, s2 = exp(a_t)
    lps = lpt = None
    if tgt is not None:
        lps = a.gather(1, tgt).squeeze(1) - l_s
        lpt = b.gather(1, tgt).squeeze(1) - l_t
    if divergence == "forward_kl":
        torch.sub(b, a, out=s3)  # a_t - a_s = log p_t - log p_s + (l_t - l_s)
        if clip is None:
            loss = (s3.mul_(s2).sum(1) / sum_t) - (l_t - l_s)
            if scale is not None:  # p_s - p_t
                torch.mul(s2, (scale / sum_t)[:, None], out=s3)
                torch.mul(s1, (scale / sum_s)[:, None], out=a).sub_(s3)
            return loss, lps, lpt
        s2.mul_((1 / sum_t)[:, None])  # p_t
        s3.sub_((l_t - l_s)[:, None]).mul_(s2)  # summand p_t (log p_t - log p_s)
        kept = s3 <= clip
        loss = s3.clamp_(max=clip).sum(1)
        if scale is not None:  # p_s K - [kept] p_t
            torch.mul(s2, kept, out=s3)
            k = s3.sum(1)
            torch.mul(s1, (scale * k / sum_s)[:, None], out=a).sub_(s3.mul_(scale[:, None]))
        return loss, lps, lpt
    if divergence == "reverse_kl":
        torch.sub(a, b, out=s3)  # a_s - a_t
        kl = torch.mul(s1, s3, out=s2).sum(1) / sum_s - (l_s - l_t)
        if scale is not None:  # p_s (log p_s - log p_t - KL)
            s3.sub_((l_s - l_t + kl)[:, None])
            torch.mul(s1, (scale / sum_s)[:, None], out=a).mul_(s3)
        return kl, lps, lpt
    a.sub_(l_s[:, None])  # log p_s
    b.sub_(l_t[:, None])  # log p_t
    s1.mul_((1 / sum_s)[:, None])  # p_s
    s2.mul_((1 / sum_t)[:, None])  # p_t
    torch.mul(s1, 1 - beta, out=s3).add_(s2, alpha=beta).clamp_(min=_TINY).log_()  # log M
    kl_t = b.sub_(s3).mul_(s2).sum(1)  # b is free after this
    a.sub_(s3)  # log p_s - log M
    kl_s = torch.mul(a, s1, out=s2).sum(1)
    loss = beta * kl_t + (1 - beta) * kl_s
    if scale is not None:
        a.sub_(kl_s[:, None]).mul_(s1).mul_(((1 - beta) * scale)[:, None])
    return loss, lps, lpt


def _logits(h, rows, w32, out, inv_temp):
    """out = (h[rows] @ w32.T) * inv_temp in fp32; returns the chunk's fp32 hidden states."""
    hc = h[rows].to(F32)
    torch.mm(hc, w32.T, out=out)
    if inv_temp != 1.0:
        out.mul_(inv_temp)
    return hc


def _grad_buffers(h, w, need_dx, need_dw):
    dx = torch.zeros(h.shape, dtype=F32, device=h.device) if need_dx else None
    dw = torch.zeros(w.shape, dtype=F32, device=w.device) if need_dw else None
    return dx, dw


def _backprop(g, hc, w32, r, dx, dw):
    if dx is not None:
        dx[r] = g @ w32
    if dw is not None:
        dw.addmm_(g.T, hc)  # accumulates in place: no [V, D] temporary


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
    dx, dw = _grad_buffers(h_s, w_s, grad and need_dx, grad and need_dw)
    if n == 0:
        return loss, s_lp, t_lp, dx, dw
    ws32 = w_s.to(F32)
    wt32 = ws32 if w_t is w_s else w_t.to(F32)
    C = max(1, min(chunk_size, n))
    R = min(C, _block_rows(V))
    zs, zt = torch.empty(C, V, dtype=F32, device=dev), torch.empty(C, V, dtype=F32, device=dev)
    s1, s2, s3 = (torch.empty(R, V, dtype=F32, device=dev) for _ in range(_SCRATCH))
    inv_temp = 1.0 / temperature
    for c0 in range(0, n, C):
        c = min(C, n - c0)
        r = rows[c0:c0 + c]
        hs = _logits(h_s, r, ws32, zs[:c], inv_temp)
        _logits(h_t, r, wt32, zt[:c], inv_temp)
        for b0 in range(0, c, R):
            b1 = min(b0 + R, c)
            k, i0, i1 = b1 - b0, c0 + b0, c0 + b1
            tgt = None if targets_c is None else targets_c[i0:i1, None]
            scale = None if not grad else row_scale[i0:i1] * inv_temp
            out = _div_block(zs[b0:b1], zt[b0:b1], s1[:k], s2[:k], s3[:k], divergence, beta,
                             clip, tgt, scale)
            loss[i0:i1] = out[0]
            if tgt is not None:
                s_lp[i0:i1], t_lp[i0:i1] = out[1], out[2]
        if grad:
            _backprop(zs[:c], hs, ws32, r, dx, dw)
    return loss, s_lp, t_lp, dx, dw


def logprob_chunked(h, w, rows, num_valid, targets_c, *, temperature, row_scale, chunk_size,
                    need_dx, need_dw):
    """Returns (lp_c [N], dx [N, D] | None, dw [V, D] | None): log p(target) per compact row."""
    n, N, V = int(num_valid), rows.numel(), w.shape[0]
    lp = torch.zeros(N, dtype=F32, device=h.device)
    grad = row_scale is not None
    dx, dw = _grad_buffers(h, w, grad and need_dx, grad and need_dw)
    if n == 0:
        return lp, dx, dw
    w32 = w.to(F32)
    C = max(1, min(chunk_size, n))
    R = min(C, _block_rows(V))
    z = torch.empty(C, V, dtype=F32, device=h.device)
    e = torch.empty(R, V, dtype=F32, device=h.device)
    inv_temp = 1.0 / temperature
    for c0 in range(0, n, C):
        c = min(C, n - c0)
        r = rows[c0:c0 + c]
        hc = _logits(h, r, w32, z[:c], inv_temp)
        for b0 in range(0, c, R):
            b1 = min(b0 + R, c)
            a, i0, i1 = z[b0:b1], c0 + b0, c0 + b1
            tgt = targets_c[i0:i1, None]
            s, l = _lse(a, e[:b1 - b0])
            lp[i0:i1] = a.gather(1, tgt).squeeze(1) - l
            if grad:  # d log p(y) / d z = onehot(y) - p, times row_scale / temperature
                scale = row_scale[i0:i1] * inv_temp
                torch.mul(e[:b1 - b0], (-scale / s)[:, None], out=a)
                a.scatter_add_(1, tgt, scale[:, None])
        if grad:
            _backprop(z[:c], hc, w32, r, dx, dw)
    return lp, dx, dw


def finish_grads(dx, dw, scale, dx_dtype, dw_dtype):
    """Scale the fp32 gradients by the upstream gradient `scale` (None: 1), round once."""
    if scale is not None:
        dx = None if dx is None else dx.mul_(scale)
        dw = None if dw is None else dw.mul_(scale)
    return (None if dx is None else dx.to(dx_dtype)), (None if dw is None else dw.to(dw_dtype))
