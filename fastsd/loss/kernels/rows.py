"""Triton row kernels: the vocabulary-wise work on one chunk of fp32 logits.

One program per row walks the vocabulary in BLOCK_V slices. z = logits / temperature.

Pass 1 (always): online max / sum-exp per lane for both heads -> lse_s, lse_t (and, asked for,
the student's entropy H = lse_s - E_ps[z_s], its mean accumulated online like the KL's) (kept as max and
log sum-exp below it; log p = (z - max) - log_s, see `_finish`). Forward KL is accumulated
online too, as a probability-weighted mean of z_t - z_s:
    KL(p_t || p_s) = E_pt[z_t - z_s] - lse_t + lse_s
Pass 2 (reverse_kl, jsd, clip): needs the final lse. With lp = z - lse and M = (1-beta) p_s + beta p_t:
    reverse_kl: loss = sum_v p_s (lp_s - lp_t). Not the online E_ps[z_s - z_t] - lse_s + lse_t:
           that carries the rounding of terms far larger than the KL itself into the gradient's
           (lp_s - lp_t - loss), 4.6x over the fp32 bound on 4 of 100 draws of large logits
    jsd:   loss = beta KL(p_t || M) + (1-beta) KL(p_s || M),  K = KL(p_s || M)
    clip:  loss = sum_v min(summand_v, clip), the divergence's summand, and K sums only the kept
           (summand <= clip) terms: forward_kl p_t; reverse_kl p_s (lp_s - lp_t + 1); jsd
           p_s (lp_s - log M)
Pass 3 (gradient): d loss / d z_s, times row_scale / temperature (= d out / d logits):
    forward_kl  p_s - p_t          clip  p_s K - [kept] p_t
    reverse_kl  p_s (lp_s - lp_t - loss)   clip  p_s ([kept] (lp_s - lp_t + 1) - K)
    jsd  (1-beta) p_s (lp_s - log M - K)   clip  (1-beta) p_s ([kept] (lp_s - log M) - K)
JSD with beta 0 or 1 arrives here as forward or reverse KL.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .gemm import FP_FUSION, cast_rtne

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp(_NEG - m) is 0, never NaN


@triton.jit
def _online(m, s, a, z, w, ok):
    """One online-softmax step per lane: running max m, sum s of exp(z - m), and a, the
    exp(z - m)-weighted sum of w."""
    m_new = tl.maximum(m, z)
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new)
    return m_new, s * alpha + e, a * alpha + tl.where(ok, e * w, 0.0)


@triton.jit
def _finish(m, s, a):
    """Combine lanes: returns (max, log sum-exp below the max, weighted mean of w).

    lse = max + log_s, but it is never formed: log p = (z - max) - log_s keeps the digits that
    rounding lse at the magnitude of the largest logit would lose (ulp(76.5) = 7.6e-6)."""
    m_row = tl.max(m, axis=0)
    scale = tl.exp(m - m_row)
    s_row = tl.sum(s * scale, axis=0)
    return m_row, tl.log(s_row), tl.sum(a * scale, axis=0) / s_row


@triton.jit
def _divergence_row_kernel(
    zs_ptr, zt_ptr,  # [C, V] fp32 student / teacher logits / temperature, row stride stride_z
    g_ptr,  # [C, V] out (COMPUTE_GRAD): d out / d student logits, weight dtype, row stride stride_g
    loss_ptr,  # [N] fp32 out: divergence per compact row
    slp_ptr, tlp_ptr,  # [N] fp32 out (HAS_TARGET): log-probs of the target ids
    tgt_ptr,  # [N] int64 (HAS_TARGET): target id per compact row
    scale_ptr,  # [N] fp32 (COMPUTE_GRAD): d out / d loss per compact row
    nv_ptr,  # [1] int64 number of valid rows
    ent_ptr,  # [N] fp32 out (ENTROPY): the student's entropy per compact row
    c0, V, stride_z, stride_g, beta, clip, inv_temp,
    DIV: tl.constexpr,  # 0 forward_kl, 1 reverse_kl, 2 jsd
    HAS_CLIP: tl.constexpr, HAS_TARGET: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = c0 + r  # compact row index
    if row >= tl.load(nv_ptr):
        return
    zs_row = zs_ptr + r * stride_z
    zt_row = zt_ptr + r * stride_z
    lanes = tl.arange(0, BLOCK_V)
    m_s = tl.full((BLOCK_V,), _NEG, tl.float32)
    m_t = tl.full((BLOCK_V,), _NEG, tl.float32)
    s_s = tl.zeros((BLOCK_V,), tl.float32)
    s_t = tl.zeros((BLOCK_V,), tl.float32)
    a_s = tl.zeros((BLOCK_V,), tl.float32)
    a_t = tl.zeros((BLOCK_V,), tl.float32)
    z0 = tl.load(zs_row)  # the entropy's E_ps[z_s] is accumulated as E_ps[z_s - z0]: small terms
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        ok = offs < V
        zs = tl.load(zs_row + offs, mask=ok, other=float("-inf"))
        zt = tl.load(zt_row + offs, mask=ok, other=float("-inf"))
        if ENTROPY:
            m_s, s_s, a_s = _online(m_s, s_s, a_s, zs, zs - z0, ok)
        else:  # its weighted mean: unused
            m_s, s_s, a_s = _online(m_s, s_s, a_s, zs, 0.0, ok)
        m_t, s_t, a_t = _online(m_t, s_t, a_t, zt, zt - zs, ok)
    max_s, logs_s, mean_s = _finish(m_s, s_s, a_s)
    max_t, logs_t, mean_t = _finish(m_t, s_t, a_t)
    if ENTROPY:  # H = lse_s - E_ps[z_s]
        tl.store(ent_ptr + row, logs_s + ((max_s - z0) - mean_s))
    if DIV == 0:  # lse_s - lse_t, without forming either
        loss = mean_t + (max_s - max_t) + (logs_s - logs_t)
    k_row = 0.0
    log1mb = tl.log(1.0 - beta)
    logb = tl.log(beta)
    if HAS_CLIP or DIV >= 1:
        loss_v = tl.zeros((BLOCK_V,), tl.float32)
        k_v = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            ok = offs < V
            lps = (tl.load(zs_row + offs, mask=ok, other=0.0) - max_s) - logs_s
            lpt = (tl.load(zt_row + offs, mask=ok, other=0.0) - max_t) - logs_t
            ps = tl.exp(lps)
            pt = tl.exp(lpt)
            if DIV == 0:
                summand = pt * (lpt - lps)
                k_term = pt
            elif DIV == 1:
                summand = ps * (lps - lpt)
                k_term = summand + ps
            else:
                a = log1mb + lps
                b = logb + lpt
                hi = tl.maximum(a, b)
                log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                k_term = ps * (lps - log_m)
                summand = beta * pt * (lpt - log_m) + (1.0 - beta) * k_term
            if HAS_CLIP:
                loss_v += tl.where(ok, tl.minimum(summand, clip), 0.0)
                k_v += tl.where(ok & (summand <= clip), k_term, 0.0)
            else:
                loss_v += tl.where(ok, summand, 0.0)
                k_v += tl.where(ok, k_term, 0.0)
        loss = tl.sum(loss_v, axis=0)
        k_row = tl.sum(k_v, axis=0)
    tl.store(loss_ptr + row, loss)
    if HAS_TARGET:
        t = tl.load(tgt_ptr + row)
        tl.store(slp_ptr + row, (tl.load(zs_row + t) - max_s) - logs_s)
        tl.store(tlp_ptr + row, (tl.load(zt_row + t) - max_t) - logs_t)
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row) * inv_temp
        g_row = g_ptr + r * stride_g
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            ok = offs < V
            lps = (tl.load(zs_row + offs, mask=ok, other=0.0) - max_s) - logs_s
            lpt = (tl.load(zt_row + offs, mask=ok, other=0.0) - max_t) - logs_t
            ps = tl.exp(lps)
            pt = tl.exp(lpt)
            if DIV == 0:
                if HAS_CLIP:
                    kept = pt * (lpt - lps) <= clip
                    g = ps * k_row - tl.where(kept, pt, 0.0)
                else:
                    g = ps - pt
            elif DIV == 1:
                if HAS_CLIP:
                    kept = ps * (lps - lpt) <= clip
                    g = ps * (tl.where(kept, lps - lpt + 1.0, 0.0) - k_row)
                else:
                    g = ps * (lps - lpt - loss)
            else:
                a = log1mb + lps
                b = logb + lpt
                hi = tl.maximum(a, b)
                log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                if HAS_CLIP:
                    d_s = lps - log_m
                    kept = beta * pt * (lpt - log_m) + (1.0 - beta) * ps * d_s <= clip
                    g = (1.0 - beta) * ps * (tl.where(kept, d_s, 0.0) - k_row)
                else:
                    g = (1.0 - beta) * ps * (lps - log_m - k_row)
            tl.store(g_row + offs, cast_rtne(g * scale, g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _logprob_row_kernel(
    z_ptr,  # [C, V] fp32 logits / temperature, row stride stride_z
    g_ptr,  # [C, V] out (COMPUTE_GRAD): d out / d logits, weight dtype, row stride stride_g
    lp_ptr,  # [N] fp32 out: log p(target) per compact row
    tgt_ptr,  # [N] int64 target id per compact row
    scale_ptr,  # [N] fp32 (COMPUTE_GRAD): d out / d lp per compact row
    nv_ptr,  # [1] int64 number of valid rows
    ent_ptr,  # [N] fp32 out (ENTROPY): entropy per compact row
    c0, V, stride_z, stride_g, inv_temp,
    COMPUTE_GRAD: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = c0 + r
    if row >= tl.load(nv_ptr):
        return
    z_row = z_ptr + r * stride_z
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), _NEG, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    a = tl.zeros((BLOCK_V,), tl.float32)
    z0 = tl.load(z_row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        ok = offs < V
        z = tl.load(z_row + offs, mask=ok, other=float("-inf"))
        if ENTROPY:
            m, s, a = _online(m, s, a, z, z - z0, ok)
        else:
            m, s, a = _online(m, s, a, z, 0.0, ok)
    z_max, log_s, mean_z = _finish(m, s, a)
    if ENTROPY:
        tl.store(ent_ptr + row, log_s + ((z_max - z0) - mean_z))
    t = tl.load(tgt_ptr + row)
    tl.store(lp_ptr + row, (tl.load(z_row + t) - z_max) - log_s)
    if COMPUTE_GRAD:  # d log p(t) / d z = onehot(t) - p
        scale = tl.load(scale_ptr + row) * inv_temp
        g_row = g_ptr + r * stride_g
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            ok = offs < V
            p = tl.exp((tl.load(z_row + offs, mask=ok, other=float("-inf")) - z_max) - log_s)
            g = tl.where(offs == t, 1.0, 0.0) - p
            tl.store(g_row + offs, cast_rtne(g * scale, g_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launchers

_DIV_CODE = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


def _block_v() -> dict:
    return dict(BLOCK_V=128) if INTERPRET else dict(BLOCK_V=2048, num_warps=8, **FP_FUSION)


def divergence_rows(z_s, z_t, g, loss, s_lp, t_lp, targets, scale, nv, c0: int, c: int, *,
                    divergence: str, beta: float, clip, inv_temp: float, entropy=None) -> None:
    """Loss (and log-probs, gradient, the student's entropy) for compact rows c0 .. c0 + c; rows
    past nv skipped."""
    V = z_s.shape[1]
    has_target, grad = targets is not None, g is not None
    _divergence_row_kernel[(c,)](
        z_s, z_t, g if grad else z_s, loss, s_lp if has_target else loss,
        t_lp if has_target else loss, targets if has_target else nv, scale if grad else loss,
        nv, loss if entropy is None else entropy, c0, V, z_s.stride(0), g.stride(0) if grad else 0, beta,
        0.0 if clip is None else clip, inv_temp,
        DIV=_DIV_CODE[divergence], HAS_CLIP=clip is not None, HAS_TARGET=has_target,
        COMPUTE_GRAD=grad, ENTROPY=entropy is not None, **_block_v(),
    )


def logprob_rows(z, g, lp, targets, scale, nv, c0: int, c: int, *, inv_temp: float, entropy=None) -> None:
    """log p(target) (and its gradient, the entropy) for compact rows c0 .. c0 + c."""
    grad = g is not None
    _logprob_row_kernel[(c,)](
        z, g if grad else z, lp, targets, scale if grad else lp, nv, lp if entropy is None else entropy,
        c0, z.shape[1], z.stride(0), g.stride(0) if grad else 0, inv_temp, COMPUTE_GRAD=grad,
        ENTROPY=entropy is not None, **_block_v(),
    )
