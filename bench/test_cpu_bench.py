"""CPU microbenchmarks of fastsd's torch backend against the eager materialised-logits baseline.

    pytest bench/test_cpu_bench.py --benchmark-enable --benchmark-only  # timings, grouped by divergence and mask
    pytest bench/test_cpu_bench.py --benchmark-disable   # each body once, as a plain test (seconds)
(--benchmark-enable overrides a --benchmark-disable in the project's pytest addopts.)

Every benchmark times forward+backward at N=256 rows, D=64, V=4096 (float32; without and with 25% of
the rows masked) and then asserts that the loss and the gradients into the hidden states and the
weight match fastsd.reference in float64: loss within rtol 1e-5 (+ atol 1e-7), gradients within a
relative error ||g - g64|| / ||g64|| of 3e-5 (measured: ~3e-6). The baseline is fastsd.reference with dtype=float32
(full [N, V] logits, autograd), held to the same tolerances.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastsd
from fastsd.reference import reference_divergence, reference_logprob

N, D, V = 256, 64, 4096
LOGIT_STD, W_STD, TEACHER_NOISE = 3.0, 0.02, 0.2
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
MASKED = [0.0, 0.25]
LOSS_RTOL, LOSS_ATOL, GRAD_RTOL = 1e-5, 1e-7, 3e-5


@functools.lru_cache(maxsize=None)
def problem(masked: float):
    """Random float32 inputs (logits std ~3, teacher = student + noise) and a mask of the given fraction."""
    g = torch.Generator().manual_seed(1234)
    scale = LOGIT_STD / (W_STD * D**0.5)
    h = torch.randn(N, D, generator=g) * scale
    h_t = h + TEACHER_NOISE * scale * torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * W_STD
    ids = torch.randint(0, V, (N,), generator=g)
    mask = None
    if masked:
        mask = torch.ones(N, dtype=torch.bool)
        mask[torch.randperm(N, generator=g)[: round(masked * N)]] = False
    return h, w, h_t, ids, mask


def n_valid(mask):
    return N if mask is None else int(mask.sum())


@functools.lru_cache(maxsize=None)
def expected(kind: str, masked: float):
    """(loss, dX, dW) in float64 from the reference; kind is a divergence or "logprob"."""
    h, w, h_t, ids, mask = problem(masked)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    if kind == "logprob":
        loss = -reference_logprob(h64, w64, ids, mask=mask).sum() / n_valid(mask)
    else:
        loss = reference_divergence(h64, w64, h_t, mask=mask, divergence=kind).loss
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def fwd_bwd(loss_fn, masked):
    """A closure for `benchmark`: fresh leaves each call, forward, backward; returns (loss, dX, dW)."""
    h, w, h_t, ids, mask = problem(masked)

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = loss_fn(hh, ww, h_t, ids, mask)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    return run


def rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


def check(result, kind, masked):
    loss, dx, dw = result
    loss64, dx64, dw64 = expected(kind, masked)
    assert torch.isfinite(loss) and loss.item() > 0
    torch.testing.assert_close(loss.double(), loss64, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert rel_err(dx, dx64) < GRAD_RTOL, f"dX rel err {rel_err(dx, dx64):.2e}"
    assert rel_err(dw, dw64) < GRAD_RTOL, f"dW rel err {rel_err(dw, dw64):.2e}"
    _, _, _, _, mask = problem(masked)
    if mask is not None:  # masked rows get no gradient
        assert torch.count_nonzero(dx[~mask]) == 0


def group(kind, masked):
    return f"{kind} masked={masked:.0%}"


@pytest.mark.parametrize("masked", MASKED)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_divergence(benchmark, divergence, masked):
    benchmark.group = group(divergence, masked)

    def loss_fn(h, w, h_t, ids, mask):
        return fastsd.fused_linear_divergence(h, w, h_t, mask=mask, divergence=divergence, backend="torch").loss

    check(benchmark(fwd_bwd(loss_fn, masked)), divergence, masked)


@pytest.mark.parametrize("masked", MASKED)
def test_fused_divergence_small_chunks(benchmark, masked):
    """forward_kl in chunks of 32 rows (8 chunks): the cost of chunking on the CPU."""
    benchmark.group = group("forward_kl", masked)

    def loss_fn(h, w, h_t, ids, mask):
        return fastsd.fused_linear_divergence(h, w, h_t, mask=mask, backend="torch", chunk_size=32).loss

    check(benchmark(fwd_bwd(loss_fn, masked)), "forward_kl", masked)


@pytest.mark.parametrize("masked", MASKED)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_eager_divergence_fp32(benchmark, divergence, masked):
    benchmark.group = group(divergence, masked)

    def loss_fn(h, w, h_t, ids, mask):
        return reference_divergence(h, w, h_t, mask=mask, divergence=divergence, dtype=torch.float32).loss

    check(benchmark(fwd_bwd(loss_fn, masked)), divergence, masked)


@pytest.mark.parametrize("masked", MASKED)
def test_fused_logprob(benchmark, masked):
    benchmark.group = group("logprob", masked)

    def loss_fn(h, w, h_t, ids, mask):
        lp = fastsd.fused_linear_logprob(h, w, ids, mask=mask, backend="torch")
        return -lp.sum() / n_valid(mask)

    check(benchmark(fwd_bwd(loss_fn, masked)), "logprob", masked)


@pytest.mark.parametrize("masked", MASKED)
def test_eager_logprob_fp32(benchmark, masked):
    benchmark.group = group("logprob", masked)

    def loss_fn(h, w, h_t, ids, mask):
        return -reference_logprob(h, w, ids, mask=mask, dtype=torch.float32).sum() / n_valid(mask)

    check(benchmark(fwd_bwd(loss_fn, masked)), "logprob", masked)
