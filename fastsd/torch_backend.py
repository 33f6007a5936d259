"""Chunked PyTorch implementation of the fused losses, for CPUs (and as a fallback anywhere).

Same contract as the Triton launchers in `fastsd.kernels`: rows arrive compacted (valid rows
first, `rows[i]` is the original index of compact row i), outputs are in compact order except
the hidden-state gradient, which is scattered back to the original rows. Only one chunk of
[chunk, V] logits exists at a time; logits and all softmax math are float32.

Gradient w.r.t. the student logits z_s (before the 1/temperature factor), per row:
    forward_kl          p_s - p_t
    forward_kl + clip   p_s * sum_v(k_v p_t,v) - k p_t,   k_v = [p_t,v (log p_t,v - log p_s,v) <= clip]
    reverse_kl          p_s * (log p_s - log p_t - KL)
    jsd(beta)           (1 - beta) p_s * (log p_s - log M - KL(p_s || M)),  M = (1-beta) p_s + beta p_t
"""

from __future__ import annotations

import math

import torch

__all__ = ["divergence_chunked", "logprob_chunked", "finish_grads"]


def _row_math(zs, zt, divergence, beta, clip):
    """Per-row loss [C] and d loss / d z_s [C, V] for one chunk of float32 logits."""
    lps, lpt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = lps.exp(), lpt.exp()
    if divergence == "forward_kl":
        if clip is None:
            return (pt * (lpt - lps)).sum(-1), ps - pt, lps, lpt
        summand = pt * (lpt - lps)
        kept = pt * (summand <= clip)
        return summand.clamp(max=clip).sum(-1), ps * kept.sum(-1, keepdim=True) - kept, lps, lpt
    if divergence == "reverse_kl":
        diff = lps - lpt
        kl = (ps * diff).sum(-1)
        return kl, ps * (diff - kl[:, None]), lps, lpt
    log_m = torch.logaddexp(lps + math.log1p(-beta), lpt + math.log(beta))
    kl_s = (ps * (lps - log_m)).sum(-1)
    loss = beta * (pt * (lpt - log_m)).sum(-1) + (1 - beta) * kl_s
    return loss, (1 - beta) * ps * (lps - log_m - kl_s[:, None]), lps, lpt


def divergence_chunked(h_s, w_s, h_t, w_t, rows, num_valid, targets_c, *, divergence, beta,
                       temperature, clip, row_scale, chunk_size, need_dx, need_dw):
    """Returns (loss_c [N], s_lp_c [N] | None, t_lp_c [N] | None, dx | None, dw | None), the
    gradients in fp32 and not yet rounded (see `finish_grads`).

    `row_scale` [N] (compact order) is d(output)/d(loss_c); None computes no gradient.
    """
    n, N = int(num_valid), rows.numel()
    f32 = torch.float32
    loss = torch.zeros(N, dtype=f32, device=h_s.device)
    s_lp = t_lp = None
    if targets_c is not None:
        s_lp, t_lp = torch.zeros_like(loss), torch.zeros_like(loss)
    grad = row_scale is not None
    dx = torch.zeros(h_s.shape, dtype=f32, device=h_s.device) if grad and need_dx else None
    dw32 = torch.zeros(w_s.shape, dtype=f32, device=w_s.device) if grad and need_dw else None
    ws32 = w_s.to(f32)
    wt32 = ws32 if w_t is w_s else w_t.to(f32)
    for c0 in range(0, n, chunk_size):
        c1 = min(c0 + chunk_size, n)
        r = rows[c0:c1]
        hs = h_s[r].to(f32)
        zs = (hs @ ws32.T) / temperature
        zt = (h_t[r].to(f32) @ wt32.T) / temperature
        loss[c0:c1], g, lps, lpt = _row_math(zs, zt, divergence, beta, clip)
        if targets_c is not None:
            tgt = targets_c[c0:c1, None]
            s_lp[c0:c1] = lps.gather(1, tgt).squeeze(1)
            t_lp[c0:c1] = lpt.gather(1, tgt).squeeze(1)
        if grad:
            g = g * (row_scale[c0:c1, None] / temperature)
            if dx is not None:
                dx[r] = g @ ws32
            if dw32 is not None:
                dw32 += g.T @ hs
    return loss, s_lp, t_lp, dx, dw32


def logprob_chunked(h, w, rows, num_valid, targets_c, *, temperature, row_scale, chunk_size,
                    need_dx, need_dw):
    """Returns (lp_c [N], dx [N, D] | None, dw [V, D] | None): log p(target) per compact row."""
    n, N = int(num_valid), rows.numel()
    f32 = torch.float32
    lp = torch.zeros(N, dtype=f32, device=h.device)
    grad = row_scale is not None
    dx = torch.zeros(h.shape, dtype=f32, device=h.device) if grad and need_dx else None
    dw32 = torch.zeros(w.shape, dtype=f32, device=w.device) if grad and need_dw else None
    w32 = w.to(f32)
    for c0 in range(0, n, chunk_size):
        c1 = min(c0 + chunk_size, n)
        r = rows[c0:c1]
        hc = h[r].to(f32)
        lps = torch.log_softmax((hc @ w32.T) / temperature, -1)
        tgt = targets_c[c0:c1, None]
        lp[c0:c1] = lps.gather(1, tgt).squeeze(1)
        if grad:
            # d log p(y) / d z = onehot(y) - p
            g = -lps.exp()
            g.scatter_add_(1, tgt, torch.ones_like(tgt, dtype=f32))
            g *= row_scale[c0:c1, None] / temperature
            if dx is not None:
                dx[r] = g @ w32
            if dw32 is not None:
                dw32 += g.T @ hc
    return lp, dx, dw32


def finish_grads(dx, dw, scale, dx_dtype, dw_dtype):
    """Scale the fp32 gradients by the upstream gradient `scale` (None: 1), round once."""
    if scale is not None:
        dx = None if dx is None else dx.mul_(scale)
        dw = None if dw is None else dw.mul_(scale)
    return (None if dx is None else dx.to(dx_dtype)), (None if dw is None else dw.to(dw_dtype))
