"""Chunked PyTorch implementation of the fused losses, for CPUs (and as a fallback anywhere).

Same contract as the Triton launchers in `fastsd.loss.kernels`: rows arrive compacted (valid rows
first, `rows[i]` is the original index of compact row i), outputs are in compact order except
the hidden-state gradient, which is scattered back to the original rows. Logits and all softmax
math are float32.

Memory (`workspace_bytes`, which `fastsd.loss.api` sizes the chunks with): per call, one [C, V] fp32
buffer per head plus the row math's scratch (forward KL: one [C, V] fp32 buffer, and clip a
[C, V] bool mask; reverse KL and log-prob: none; JSD: three), allocated once and reused by every
chunk. The GEMMs write into them and the row math works in place: log_softmax into its own input
(one fused op per row), then a few elementwise passes, leaving d loss / d z_s in one of the
buffers, which the dX/dW GEMMs read. Whatever is per row (the upstream gradient, 1/temperature,
JSD's 1 - beta, the log-prob's one-hot) goes on the [C, D] operands of the GEMMs, not on [C, V].
Few, large ops: on a loaded 2-core machine each parallel op can wait a scheduler slice, so
splitting a chunk's row math into cache-sized row blocks was 2-10x slower.

Per row, and the gradient w.r.t. the student logits z_s (before the 1/temperature factor):
    forward_kl          sum_v p_t (log p_t - log p_s),  grad p_s - p_t
    forward_kl + clip   grad p_s * sum_v(k_v p_t,v) - k p_t,   k_v = [p_t,v (log p_t,v - log p_s,v) <= clip]
    reverse_kl          KL = sum_v p_s (log p_s - log p_t),  grad p_s * (log p_s - log p_t - KL)
    reverse_kl + clip   grad p_s * ([kept] (log p_s - log p_t + 1) - A),  A = sum_v [kept] p_s (log p_s - log p_t + 1)
    jsd(beta)           grad (1 - beta) p_s * (log p_s - log M - KL(p_s || M)),  M = (1-beta) p_s + beta p_t
    jsd + clip          grad (1 - beta) p_s * ([kept] (log p_s - log M) - K),  K = sum_v [kept] p_s (log p_s - log M)
(kept: the summand <= clip). JSD with beta 0 or 1 arrives as forward or reverse KL.
"""

from __future__ import annotations

import torch

from . import topk as _topk
from .topk import topk_rows

__all__ = ["divergence_chunked", "logprob_chunked", "logprob_backward_kept", "finish_grads", "workspace_bytes",
           "chunk_rows"]

F32 = torch.float32
_TINY = torch.finfo(F32).tiny  # log M where both p underflow: finite, and times p = 0 it gives 0
_SCRATCH = {"forward_kl": 1, "reverse_kl": 0, "jsd": 3, "logprob": 0}  # [C, V] fp32 scratch buffers


def _row_bytes(vocab: int, width: int, kind: str, clip, entropy: bool = False, topk=None) -> int:
    heads = 1 if kind == "logprob" else 2
    if topk is not None:  # the row math of fastsd.loss.topk: no [C, V] scratch but the entropy's, [C, K] temporaries
        return 4 * (heads + bool(entropy)) * vocab + _topk.row_bytes(topk) + 3 * width * 4
    # clip: a bool mask; entropy: one more fp32 scratch buffer
    per_elem = 4 * (heads + _SCRATCH[kind] + bool(entropy)) + (clip is not None)
    # [c, D] fp32: the hidden states per head and the dX product; the log-prob's W[targets]
    return per_elem * vocab + 3 * width * 4


def workspace_bytes(chunk: int, vocab: int, width: int, kind: str, clip: float | None = None, *,
                    entropy: bool = False, topk: int | None = None) -> int:
    """Peak bytes one call allocates beyond its inputs, the fp32 gradient accumulators (dX [N, D],
    dW [V, D]) and, for 16-bit weights, fp32 copies of the weights ([V, D] per head): the [C, V]
    buffers above and three [C, D] fp32 ones (the hidden states per head and the chunk's dX
    product; for the log-prob its hidden states, dX product and the target rows of W).
    `kind`: a divergence or "logprob"; `entropy`: the student's entropy is computed too; `topk`: K of a
    top-k divergence."""
    return chunk * _row_bytes(vocab, width, kind, clip, entropy, topk)


def chunk_rows(budget: int, vocab: int, width: int, kind: str, clip: float | None = None, *,
               entropy: bool = False, topk: int | None = None) -> int:
    """Rows per chunk: the largest multiple of 16 whose `workspace_bytes` fits `budget` bytes
    (at least 16, whatever the budget)."""
    return max(16, budget // _row_bytes(vocab, width, kind, clip, entropy, topk) // 16 * 16)


def _entropy(lp, buf):
    """-sum_v p log p per row of the log-probs `lp` [c, V], through the scratch `buf` (same shape;
    None: a new one)."""
    return torch.exp(lp, out=buf).mul_(lp).sum(1).neg_()


def _log_softmax_(a):
    """In place, one fused op per row: a = log softmax(a). (The CPU kernel reads a row for its
    max and sum before it writes it: checked equal to the out-of-place result.)"""
    return torch.log_softmax(a, 1, out=a)


def _row_math(a, b, s, divergence, beta, clip, tgt, grad, ent=None):
    """Row math for one chunk, in place. a, b: [C, V] student / teacher logits (divided by the
    temperature); s: the scratch buffers ([C, V] each). Returns (loss [C], lp_s, lp_t (None
    without `tgt`), g): with `grad`, g (one of the [C, V] buffers) holds d loss / d z_s, without
    the per-row factor, which `_backprop` puts on the [C, D] operands (a [C, V] pass fewer).
    `ent`: (scratch [C, V], out [C]) for the student's entropy, or None."""
    _log_softmax_(a), _log_softmax_(b)
    if ent is not None:
        ent[1][:] = _entropy(a, ent[0])
    lps = lpt = None
    if tgt is not None:
        lps, lpt = a.gather(1, tgt).squeeze(1), b.gather(1, tgt).squeeze(1)
    if divergence == "jsd":
        return (*_jsd(a, b, *s, beta, clip, grad), lps, lpt)
    g = None
    if divergence == "reverse_kl":  # no scratch: b = log p_s - log p_t, a = p_s, b = p_s b
        torch.sub(a, b, out=b).mul_(a.exp_())
        if clip is not None:
            return (*_reverse_clipped(a, b, clip, grad), lps, lpt)
        loss = b.sum(1)
        if grad:  # p_s (log p_s - log p_t - KL) = b - p_s KL, one fused pass
            g = b.addcmul_(a, loss[:, None], value=-1)
        return loss, g, lps, lpt
    d = s[0]
    torch.sub(b, a, out=d).mul_(b.exp_())  # b = p_t, d = p_t (log p_t - log p_s)
    if clip is None:
        loss = d.sum(1)
        if grad:  # p_s - p_t
            g = a.exp_().sub_(b)
        return loss, g, lps, lpt
    kept = d <= clip
    loss = d.clamp_(max=clip).sum(1)
    if grad:  # p_s K - [kept] p_t, K = sum_v [kept] p_t
        # d = -[kept] p_t (not torch.mul(b, kept): a bool operand is cast to a float [C, V] temporary)
        k = torch.neg(b, out=d).masked_fill_(kept.logical_not_(), 0).sum(1).neg_()
        g = torch.addcmul(d, a.exp_(), k[:, None], out=a)
    return loss, g, lps, lpt


def _reverse_clipped(ps, d, clip, grad):
    """Reverse KL with its summands d = p_s (log p_s - log p_t) clamped at `clip`, in place.
    A kept summand's gradient in z_s is p_s,j [kept_j] (log p_s,j - log p_t,j + 1) - p_s,j A,
    A = sum_v [kept_v] p_s,v (log p_s,v - log p_t,v + 1) = sum_v [kept_v] (d_v + p_s,v)."""
    kept = d <= clip
    loss = d.clamp_(max=clip).sum(1)
    if not grad:
        return loss, None
    d.add_(ps).masked_fill_(kept.logical_not_(), 0)  # [kept] (d + p_s)
    return loss, d.addcmul_(ps, d.sum(1)[:, None], value=-1)


def _jsd(a, b, ps, pt, log_m, beta, clip, grad):
    """JSD row math in place on a = log p_s, b = log p_t; the other three are scratch. Returns
    (loss, g): g (in a) is d loss / d z_s over (1 - beta), which goes on the per-row factor.
    With `clip`, each summand beta p_t (log p_t - log M) + (1 - beta) p_s (log p_s - log M) is
    clamped; its derivative in p_s is (1 - beta)(log p_s - log M), so the gradient over (1 - beta)
    is p_s ([kept] (log p_s - log M) - K), K = sum_v [kept_v] p_s,v (log p_s,v - log M_v)."""
    torch.exp(a, out=ps), torch.exp(b, out=pt)
    torch.mul(ps, 1 - beta, out=log_m).add_(pt, alpha=beta).clamp_(min=_TINY).log_()
    b.sub_(log_m).mul_(pt)  # b: the teacher's summands p_t (log p_t - log M)
    torch.mul(a.sub_(log_m), ps, out=pt)  # a = log p_s - log M; pt: the student's summands
    if clip is None:
        kl_s = pt.sum(1)
        g = a.sub_(kl_s[:, None]).mul_(ps) if grad else None
        return beta * b.sum(1) + (1 - beta) * kl_s, g
    summand = torch.mul(b, beta, out=log_m).add_(pt, alpha=1 - beta)  # log M is free
    kept = summand <= clip
    loss = summand.clamp_(max=clip).sum(1)
    if not grad:
        return loss, None
    dropped = kept.logical_not_()
    k = pt.masked_fill_(dropped, 0).sum(1)
    return loss, a.masked_fill_(dropped, 0).sub_(k[:, None]).mul_(ps)


def _hidden(h, rows, inv_temp):
    """The chunk's fp32 hidden states over T, [c, D]: a copy (h[rows] gathers), so callers may
    scale it in place. It is what the weight gradient wants (d z / d W = h / T), and the
    1/T goes on [c, D], not on the [c, V] logits."""
    hc = h[rows].to(F32)
    return hc.mul_(inv_temp) if inv_temp != 1.0 else hc


def _logits(h, rows, w32, out, inv_temp):
    """out = (h[rows] / T) @ w32.T in fp32; returns `_hidden`."""
    hc = _hidden(h, rows, inv_temp)
    torch.mm(hc, w32.T, out=out)
    return hc


def _even_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Bounds [c0, c1) splitting n > 0 rows into as few chunks as `chunk_size` allows, their
    sizes differing by one at most (larger first): the buffers take no more rows than needed,
    and a kept last chunk is as large as the others, less one row at most."""
    k = -(-n // max(1, chunk_size))
    q, r = divmod(n, k)
    cuts = [i * q + min(i, r) for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _grad_buffers(h, w, need_dx, need_dw, n):
    """fp32 dX (zeros: masked rows keep 0) and dW (written by the first chunk's GEMM if n > 0)."""
    dx = torch.zeros(h.shape, dtype=F32, device=h.device) if need_dx else None
    dw = (torch.empty if n else torch.zeros)(w.shape, dtype=F32, device=w.device) if need_dw else None
    return dx, dw


def _backprop(g, hc, w32, r, u, inv_temp, dx, dw, first, tgt=None):
    """Accumulate a chunk's dX rows and dW, the logits z = (h / T) W^T having the gradient u * g
    (u [c] a per-row factor, g [c, V]), or u * (onehot(tgt) - g) with `tgt` [c] (the log-prob,
    g = p). The factor and the one-hot go on the [c, D] operands, ~V/D times cheaper than on g;
    hc ([c, D], h / T) is scaled in place."""
    u = u[:, None]
    sign = 1.0 if tgt is None else -1.0
    if dx is not None:
        m, ut = g @ w32, u * inv_temp
        dx[r] = m.mul_(ut) if tgt is None else m.sub_(w32[tgt]).mul_(-ut)
    if dw is not None:  # in place: no [V, D] temporary; beta=0 ignores the first chunk's empty dW
        hu = hc.mul_(u)
        dw.addmm_(g.T, hu, beta=0.0 if first else 1.0, alpha=sign)
        if tgt is not None:
            dw.index_add_(0, tgt, hu)


def divergence_chunked(h_s, w_s, h_t, w_t, rows, num_valid, targets_c, *, divergence, beta,
                       temperature, clip, row_scale, chunk_size, need_dx, need_dw, entropy=None, topk=None):
    """Returns (loss_c [N], s_lp_c [N] | None, t_lp_c [N] | None, dx | None, dw | None), the
    gradients in fp32 and not yet rounded (see `finish_grads`).

    `row_scale` [N] (compact order) is d(output)/d(loss_c); None computes no gradient.
    `entropy` [N] fp32 (compact order), or None: the student's entropy per valid row written there.
    `topk` (k, topk_from, tail) or None: the top-k divergence of `fastsd.loss.topk`.
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
    bounds = _even_chunks(n, chunk_size)
    C = bounds[0][1]
    n_scratch = 0 if topk is not None else _SCRATCH[divergence]
    zs, zt, *scratch = (torch.empty(C, V, dtype=F32, device=dev) for _ in range(2 + n_scratch))
    e_buf = None if entropy is None else torch.empty(C, V, dtype=F32, device=dev)
    inv_temp = 1.0 / temperature
    # the JSD's (1 - beta) rides on the row factor (the top-k gradient has it already)
    factor = (1 - beta) if divergence == "jsd" and topk is None else 1.0
    for c0, c1 in bounds:
        c, r = c1 - c0, rows[c0:c1]
        hs = _logits(h_s, r, ws32, zs[:c], inv_temp)
        _logits(h_t, r, wt32, zt[:c], inv_temp)
        tgt = None if targets_c is None else targets_c[c0:c1, None]
        ent = None if entropy is None else (e_buf[:c], entropy[c0:c1])
        if topk is None:
            loss[c0:c1], g, lps, lpt = _row_math(zs[:c], zt[:c], [t[:c] for t in scratch], divergence, beta,
                                                 clip, tgt, grad, ent)
        else:
            loss[c0:c1], g, lps, lpt = topk_rows(zs[:c], zt[:c], k=topk[0], topk_from=topk[1], tail=topk[2],
                                                 divergence=divergence, beta=beta, clip=clip, tgt=tgt, grad=grad,
                                                 ent=ent)
        if tgt is not None:
            s_lp[c0:c1], t_lp[c0:c1] = lps, lpt
        if grad:
            _backprop(g, hs, ws32, r, row_scale[c0:c1] * factor, inv_temp, dx, dw, c0 == 0)
    return loss, s_lp, t_lp, dx, dw


def logprob_chunked(h, w, rows, num_valid, targets_c, *, temperature, row_scale, chunk_size,
                    need_dx, need_dw, keep=None, entropy=None):
    """Returns (lp_c [N], dx [N, D] | None, dw [V, D] | None): log p(target) per compact row.

    `keep` (a list, forward only): the last chunk's softmax p is left in the chunk buffer,
    appended to `keep` as (first row, buffer) for `logprob_backward_kept`, so the backward
    needs no logits GEMM for those rows (for all rows when they fit one chunk: 3 GEMMs in all,
    as eager) and no memory beyond the workspace. `entropy`: as in `divergence_chunked`."""
    n, N, V = int(num_valid), rows.numel(), w.shape[0]
    lp = torch.zeros(N, dtype=F32, device=h.device)
    grad = row_scale is not None
    dx, dw = _grad_buffers(h, w, grad and need_dx, grad and need_dw, n)
    if n == 0:
        return lp, dx, dw
    bounds = _even_chunks(n, chunk_size)
    z = torch.empty(bounds[0][1], V, dtype=F32, device=h.device)
    ent = None if entropy is None else (torch.empty_like(z), entropy)
    _logprob_rows(h, w.to(F32), rows, targets_c, z, bounds, 1.0 / temperature, row_scale, dx, dw, True, lp, keep,
                  ent)
    return lp, dx, dw


def _logprob_rows(h, w32, rows, targets_c, z, bounds, inv_temp, row_scale, dx, dw, writes_dw, lp,
                  keep=None, ent=None):
    """The compact rows of `bounds` chunk by chunk in z: their log p(target) into `lp` (if
    given), and with `row_scale` their dX rows and dW (the first chunk writes dW if
    `writes_dw`, else all add to it); with `keep`, the last chunk's p stays in z."""
    for i, (c0, c1) in enumerate(bounds):
        a, r, tgt = z[:c1 - c0], rows[c0:c1], targets_c[c0:c1]
        hc = _logits(h, r, w32, a, inv_temp)
        picked = _log_softmax_(a).gather(1, tgt[:, None]).squeeze(1)
        if ent is not None:  # (scratch, out [N])
            ent[1][c0:c1] = _entropy(a, ent[0][:c1 - c0])
        if lp is not None:
            lp[c0:c1] = picked
        if row_scale is not None:  # d log p(y) / d z = onehot(y) - p
            _backprop(a.exp_(), hc, w32, r, row_scale[c0:c1], inv_temp, dx, dw, writes_dw and i == 0, tgt)
        elif keep is not None and i == len(bounds) - 1:
            keep.append((c0, z))
            a.exp_()


def logprob_backward_kept(kept, h, w, rows, num_valid, targets_c, row_scale, *, temperature,
                          need_dx, need_dw):
    """dX, dW (fp32) from what `logprob_chunked` kept: the kept rows from their p, the rows
    before them recomputed in the same buffer (which so no longer holds p when kept[0] > 0)."""
    c0, z = kept
    n = int(num_valid)
    dx, dw = _grad_buffers(h, w, need_dx, need_dw, n)
    inv_temp, r, w32 = 1.0 / temperature, rows[c0:n], w.to(F32)
    # the kept rows first: their dW write needs no zero fill, and z is free afterwards
    _backprop(z[:n - c0], _hidden(h, r, inv_temp), w32, r, row_scale[c0:n], inv_temp, dx, dw,
              True, targets_c[c0:n])
    if c0:  # rows [0, c0) add to the kept rows' dW
        _logprob_rows(h, w32, rows, targets_c, z, _even_chunks(c0, z.shape[0]), inv_temp, row_scale, dx, dw,
                      False, None)
    return dx, dw


def finish_grads(dx, dw, scale, dx_dtype, dw_dtype):
    """Scale the fp32 gradients by the upstream gradient `scale` (None: 1), round once."""
    if scale is not None:
        dx = None if dx is None else dx.mul_(scale)
        dw = None if dw is None else dw.mul_(scale)
    return (None if dx is None else dx.to(dx_dtype)), (None if dw is None else dw.to(dw_dtype))
