"""Triton GEMMs for the fused losses: logits of a chunk, dX and dW, over compacted rows.

Rows are compacted without a host sync: `rows` [N] (int64) lists the valid rows first and
`nv` [1] (int64, on the device) counts them. Each kernel reads `nv` and skips every tile whose
rows are all past it, so masked rows cost no matmul work. Chunks cover compact rows
[c0, c0 + C); a chunk's live rows are min(nv - c0, C).

Legend: C rows in a chunk, D hidden width, V vocabulary. All offsets are 64-bit.

    logits:  z[c, v]  = (h[rows[c0 + c], :] . W[v, :]) * inv_temp      fp32 out, fp32 accumulate
    dX:      dX[rows[c0 + c], :] = g[c, :] @ W                         written in dX's dtype
    dW:      dW[v, :] += sum_c g[c, v] * h[rows[c0 + c], :]           fp32 accumulation

dW's fp32 accumulator for bf16 weights is split in two int16 planes: the high half *is* the
bf16 output tensor and the low half is a scratch buffer, so the exact fp32 sum costs one extra
bf16-sized buffer instead of a full fp32 copy plus a cast. `dw_finish` scales the exact sum by
the upstream gradient and rounds it to nearest bf16 in place, once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr):
    # UPCAST: fp32 operands (and the interpreter, whose bf16 dot is wrong): exact IEEE fp32.
    # Otherwise 16-bit tensor-core products, accumulated in fp32 (products of bf16 are exact).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even. bf16 is rounded by hand because the interpreter
    truncates fp32 -> bf16; on GPUs the bit trick costs three integer ops."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536  # -65536 == 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _join(hi, lo):
    """fp32 from its high and low int16 halves."""
    return ((hi.to(tl.int32) << 16) | (lo.to(tl.int32) & 0xFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _dw_finish_kernel(
    hi_ptr,  # [V * D] int16 view of the bf16 dW: high halves in, rounded bf16 out
    lo_ptr,  # [V * D] int16 low halves
    scale_ptr,  # [1] fp32 (HAS_SCALE): upstream gradient
    n, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    total = _join(tl.load(hi_ptr + offs, mask=ok, other=0), tl.load(lo_ptr + offs, mask=ok, other=0))
    if HAS_SCALE:
        total = total * tl.load(scale_ptr)
    tl.store(hi_ptr + offs, cast_rtne(total, tl.bfloat16).to(tl.int16, bitcast=True), mask=ok)


@triton.jit
def _logits_kernel(
    h_ptr,  # [N, D] hidden states, original row order, row stride stride_h
    rows_ptr,  # [N] int64 compact row -> original row
    nv_ptr,  # [1] int64 number of valid rows
    w_ptr,  # [V, D] weight, row stride stride_w
    z_ptr,  # [C, V] fp32 out, row stride stride_z
    c0, C, V, D, stride_h, stride_w, stride_z, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(C, BLOCK_M)
    pid_m = pid % num_m  # row tiles fastest: neighbours share a W tile in L2
    pid_n = pid // num_m
    n_rows = tl.minimum(tl.load(nv_ptr) - c0, C)
    if pid_m * BLOCK_M >= n_rows:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < n_rows
    n_ok = offs_n < V
    rows = tl.load(rows_ptr + c0 + offs_m, mask=m_ok, other=0)
    a_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    b_ptrs = w_ptr + offs_n[None, :] * stride_w + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    z_ptrs = z_ptr + offs_m[:, None].to(tl.int64) * stride_z + offs_n[None, :]
    tl.store(z_ptrs, acc * inv_temp, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dx_kernel(
    g_ptr,  # [C, V] d loss / d logits of the chunk, row stride stride_g
    w_ptr,  # [V, D] weight, row stride stride_w
    rows_ptr,  # [N] int64 compact row -> original row
    nv_ptr,  # [1] int64 number of valid rows
    dx_ptr,  # [N, D] out, original row order, row stride stride_dx
    c0, C, V, D, stride_g, stride_w, stride_dx,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(C, BLOCK_M)
    pid_m = pid % num_m  # row tiles fastest: neighbours stream the same W columns
    pid_n = pid // num_m
    n_rows = tl.minimum(tl.load(nv_ptr) - c0, C)
    if pid_m * BLOCK_M >= n_rows:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_ok = offs_m < n_rows
    n_ok = offs_n < D
    a_ptrs = g_ptr + offs_m[:, None].to(tl.int64) * stride_g + offs_k[None, :]
    b_ptrs = w_ptr + offs_k[:, None] * stride_w + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, V, BLOCK_K):
        k_ok = offs_k < V - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_w
    rows = tl.load(rows_ptr + c0 + offs_m, mask=m_ok, other=0)
    out = dx_ptr + rows[:, None] * stride_dx + offs_n[None, :]
    tl.store(out, cast_rtne(acc, dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dw_kernel(
    g_ptr,  # [C, V] d loss / d logits of the chunk, row stride stride_g
    h_ptr,  # [N, D] hidden states, original row order, row stride stride_h
    rows_ptr,  # [N] int64 compact row -> original row
    nv_ptr,  # [1] int64 number of valid rows
    acc_ptr,  # [V, D] fp32 accumulator, or (SPLIT_BF16) int16 view of the bf16 output = high halves
    lo_ptr,  # [V, D] int16 low halves of the fp32 accumulator (SPLIT_BF16 only)
    c0, C, V, D, stride_g, stride_h, stride_acc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_n = pid % num_n  # D tiles fastest: neighbours share a g tile in L2
    pid_m = pid // num_n
    nv = tl.load(nv_ptr)
    n_rows = tl.minimum(nv - c0, C)
    if n_rows <= 0:
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # vocabulary
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden width
    offs_k = tl.arange(0, BLOCK_K)  # chunk rows
    m_ok = offs_m < V
    n_ok = offs_n < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):  # run-time bound: only the live rows
        k = k0 + offs_k
        k_ok = k < n_rows
        a = tl.load(g_ptr + k[None, :].to(tl.int64) * stride_g + offs_m[:, None],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        rows = tl.load(rows_ptr + c0 + k, mask=k_ok, other=0)
        b = tl.load(h_ptr + rows[:, None] * stride_h + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST)
    offs = offs_m[:, None] * stride_acc + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_BF16:  # exact fp32 sum kept as (high half, low half)
        total = _join(tl.load(acc_ptr + offs, mask=ok, other=0), tl.load(lo_ptr + offs, mask=ok, other=0)) + acc
        bits = total.to(tl.int32, bitcast=True)
        tl.store(acc_ptr + offs, (bits >> 16).to(tl.int16), mask=ok)
        tl.store(lo_ptr + offs, (bits & 0xFFFF).to(tl.int16), mask=ok)
    else:
        old = tl.load(acc_ptr + offs, mask=ok, other=0.0)
        tl.store(acc_ptr + offs, old + acc, mask=ok)


# ---------------------------------------------------------------- launchers

# Compiled kernels fuse a*b+c into FMAs, said explicitly: Triton 3.9 warns when it is left to the
# default, which 3.10 turns off. The interpreter ignores the option.
FP_FUSION = dict(enable_fp_fusion=True)


def _cfg(kind: str, dtype: torch.dtype) -> dict:
    """Tile sizes. The interpreter wants few, large numpy ops; GPUs want tensor-core tiles for
    16-bit inputs. fp32 inputs take exact fp32 FMAs, whose operands need more registers: smaller
    tiles, or the accumulator spills (checked by tools/kernel_report.py). BLOCK_K=16 for fp32:
    the logits kernel at BLOCK_K=32 sat at 255 registers with Triton 3.6-3.8 and spilled with 3.9;
    at 16 it needs 222 with each of them (FMAs gain nothing from a deeper K step)."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    if dtype == torch.float32:
        tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16)
    else:
        tiles = dict(BLOCK_M=128, BLOCK_N=256 if kind == "logits" else 128, BLOCK_K=64)
    return dict(tiles, num_warps=8, num_stages=3, **FP_FUSION)


def _upcast(t: torch.Tensor) -> bool:
    return INTERPRET or t.dtype == torch.float32


def logits(h, rows, nv, w, z, c0: int, c: int, inv_temp: float) -> None:
    """z[:c] = (h[rows[c0:c0+c]] @ w.T) * inv_temp in fp32 (rows past nv untouched)."""
    V, D = w.shape
    cfg = _cfg("logits", w.dtype)
    grid = (triton.cdiv(c, cfg["BLOCK_M"]) * triton.cdiv(V, cfg["BLOCK_N"]),)
    _logits_kernel[grid](h, rows, nv, w, z, c0, c, V, D, h.stride(0), w.stride(0), z.stride(0),
                         inv_temp, UPCAST=_upcast(w), **cfg)


def dx_rows(g, w, rows, nv, dx, c0: int, c: int) -> None:
    """dx[rows[c0 + i]] = g[i] @ w for the live rows of the chunk."""
    V, D = w.shape
    cfg = _cfg("dx", w.dtype)
    grid = (triton.cdiv(c, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)
    _dx_kernel[grid](g, w, rows, nv, dx, c0, c, V, D, g.stride(0), w.stride(0), dx.stride(0),
                     UPCAST=_upcast(w), **cfg)


def dw_accumulate(g, h, rows, nv, acc, lo, c0: int, c: int) -> None:
    """acc += g[:live].T @ h[rows[c0:c0+live]]; `lo` is the low-half plane for a bf16 `acc`."""
    V, D = acc.shape
    cfg = _cfg("dw", h.dtype)
    split = lo is not None
    grid = (triton.cdiv(V, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)
    _dw_kernel[grid](g, h, rows, nv, acc.view(torch.int16) if split else acc, lo if split else acc,
                     c0, c, V, D, g.stride(0), h.stride(0), acc.stride(0),
                     UPCAST=_upcast(h), SPLIT_BF16=split, **cfg)


def dw_finish(hi: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Round the split accumulator (times `scale`, if given) to bf16, in place in `hi`."""
    n = hi.numel()
    block = 1024
    _dw_finish_kernel[(triton.cdiv(n, block),)](
        hi.view(torch.int16), lo, lo if scale is None else scale, n,
        HAS_SCALE=scale is not None, BLOCK=block, **FP_FUSION,
    )
    return hi
