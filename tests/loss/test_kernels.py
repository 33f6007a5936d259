"""Kernel-level checks of the pieces the public tests only see through their results."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, rel_err

from fastsd.loss.kernels import finish_grads
from fastsd.loss.kernels.gemm import cast_rtne, dw_accumulate


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(y_ptr + offs, cast_rtne(tl.load(x_ptr + offs, mask=ok), y_ptr.dtype.element_ty), mask=ok)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rounds_to_nearest_even_like_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-6, 6, 4096)
    # exact ties between two normal bf16 values: random sign, exponent and 7-bit mantissa,
    # low 16 bits = 0x8000 (NaN payloads and subnormals are out of scope)
    sign = torch.randint(0, 2, (512,), generator=g).to(torch.int32) << 15
    exponent = torch.randint(100, 150, (512,), generator=g).to(torch.int32) << 7
    mantissa = torch.randint(0, 128, (512,), generator=g).to(torch.int32)
    ties = ((sign | exponent | mantissa) << 16 | 0x8000).view(torch.float32)
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38])]).to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int16), x.to(dtype).view(torch.int16))


@pytest.mark.parametrize("scale", [None, 0.37])
def test_bf16_dw_accumulates_exactly_in_fp32_and_rounds_once(scale):
    """Many small chunks into the split (high, low) accumulator == one fp32 sum, rounded once."""
    g = torch.Generator().manual_seed(1)
    n, v, d, chunk = 96, 67, 40, 16
    grad = (torch.randn(n, v, generator=g) * 1e-3).to(torch.bfloat16).to(DEVICE)
    h = torch.randn(n, d, generator=g).to(torch.bfloat16).to(DEVICE)
    rows = torch.randperm(n, generator=g).to(DEVICE)
    nv = torch.tensor([n - 5], device=DEVICE)  # the last 5 compact rows are masked
    hi = torch.zeros(v, d, dtype=torch.bfloat16, device=DEVICE)
    lo = torch.zeros(v, d, dtype=torch.int16, device=DEVICE)
    for c0 in range(0, n, chunk):
        dw_accumulate(grad[c0:], h, rows, nv, hi, lo, c0, min(chunk, n - c0))
    scale_t = None if scale is None else torch.tensor([scale], device=DEVICE)
    _, dw = finish_grads(None, (hi, lo), scale_t, torch.bfloat16, torch.bfloat16)
    live = rows[: n - 5]
    exact = grad[: n - 5].double().T @ h[live].double() * (1.0 if scale is None else scale)
    # fp32 accumulation is ~1e-7 relative; what remains is the single rounding to bf16.
    assert rel_err(dw, exact) < 2.5e-3
    assert rel_err(dw, exact.to(torch.bfloat16)) < 2e-4
