"""Both fused functions under torch.autocast (CPU bf16 here; CUDA bf16/fp16 by the same code):
16-bit activations over fp32 weights, as autocast leaves a model's hidden states and its fp32
head, and matching dtypes. The math stays fp32: values and gradients against float64, each
gradient in its input's dtype. Forward and backward inside autocast, and a forward with grad
inside with the backward outside (the divergence's scalar loss computes its gradient in the
forward)."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, VALUE_TOL, grad_tol, leaf64, make_inputs, random_mask, rel_err

import fastsd
from fastsd.reference import reference_divergence, reference_logprob

F32, BF16 = torch.float32, torch.bfloat16


def _autocast(device):
    return torch.autocast(torch.device(device).type, dtype=BF16)


# (activation dtype, weight dtype): autocast's 16-bit activations over an fp32 head; all fp32; all bf16
DTYPES = [(BF16, F32), (F32, F32), (BF16, BF16)]


def _tol(h_dtype, w_dtype, backend):
    return grad_tol(h_dtype, backend), grad_tol(w_dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"h{str(d[0])[6:]}-w{str(d[1])[6:]}")
@pytest.mark.parametrize("divergence,reduction", [("forward_kl", "mean"), ("reverse_kl", "none"), ("jsd", "sum")])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_divergence_under_autocast_matches_float64(backend, dtypes, divergence, reduction, backward_inside, device):
    h_dtype, w_dtype = dtypes
    n, d, v = 29, 32, 211
    h_s, w, h_t, w_t, g = make_inputs(n, d, v, device=device)
    h_s, h_t = h_s.to(h_dtype), h_t.to(h_dtype)
    w, w_t = w.to(w_dtype), w_t.to(w_dtype)
    mask = random_mask("some", n, g).to(device)
    upstream = torch.randn(n, generator=g).to(device) if reduction == "none" else torch.tensor(1.3, device=device)
    kw = dict(divergence=divergence, reduction=reduction, mask=mask, temperature=1.2)
    h_s.requires_grad_(True)
    w.requires_grad_(True)
    with _autocast(device):
        out = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, backend=backend, chunk_size=8, **kw)
        if backward_inside:
            (out.loss * upstream).sum().backward()
    if not backward_inside:
        (out.loss * upstream).sum().backward()
    assert out.loss.dtype == F32
    h64, w64 = leaf64(h_s), leaf64(w)
    ref = reference_divergence(h64, w64, h_t, w_t.double(), **kw)
    (ref.loss * upstream.double()).sum().backward()
    assert rel_err(out.loss, ref.loss) < VALUE_TOL[F32]
    assert rel_err(out.per_token, ref.per_token) < VALUE_TOL[F32]
    assert h_s.grad.dtype == h_dtype and w.grad.dtype == w_dtype
    tol_h, tol_w = _tol(h_dtype, w_dtype, backend)
    assert rel_err(h_s.grad, h64.grad) < tol_h
    assert rel_err(w.grad, w64.grad) < tol_w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"h{str(d[0])[6:]}-w{str(d[1])[6:]}")
@pytest.mark.parametrize("backward_inside", [True, False])
def test_logprob_under_autocast_matches_float64(backend, dtypes, backward_inside, device):
    h_dtype, w_dtype = dtypes
    n, d, v = 31, 32, 199
    h, w, _, _, g = make_inputs(n, d, v, device=device)
    h, w = h.to(h_dtype).requires_grad_(True), w.to(w_dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    mask = random_mask("some", n, g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    with _autocast(device):
        lp = fastsd.fused_linear_logprob(h, w, targets, mask=mask, temperature=0.9, backend=backend, chunk_size=8)
        if backward_inside:
            (lp * upstream).sum().backward()
    if not backward_inside:
        (lp * upstream).sum().backward()
    assert lp.dtype == F32
    h64, w64 = leaf64(h), leaf64(w)
    ref = reference_logprob(h64, w64, targets, mask=mask, temperature=0.9)
    (ref * upstream.double()).sum().backward()
    assert rel_err(lp, ref) < VALUE_TOL[F32]
    assert h.grad.dtype == h_dtype and w.grad.dtype == w_dtype
    tol_h, tol_w = _tol(h_dtype, w_dtype, backend)
    assert rel_err(h.grad, h64.grad) < tol_h
    assert rel_err(w.grad, w64.grad) < tol_w


@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_head_in_a_module(backend, device):
    """Liger's amp case, written for fastsd: a model's bf16 activations under autocast meet an
    fp32 lm_head (an nn.Linear) through the nn.Module forms, and the head's fp32 parameter gets
    an fp32 gradient equal to float64's."""
    n, d, v = 24, 32, 173
    h_s, w, h_t, _, g = make_inputs(n, d, v, device=device)
    head = torch.nn.Linear(d, v, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(w)
    loss_fn = fastsd.FusedLinearDivergence("jsd", beta=0.4, backend=backend, chunk_size=8)
    lp_fn = fastsd.FusedLinearLogprob(backend=backend, chunk_size=8)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    x = h_s.clone().requires_grad_(True)
    with _autocast(device):
        act = x * 1.0  # autocast leaves elementwise ops in the input dtype: cast like a bf16 model would
        act = act.to(BF16)
        loss = loss_fn(act, head.weight, h_t.to(BF16)).loss + lp_fn(act, head.weight, targets).mean()
    loss.backward()
    x64, w64 = leaf64(x.detach().to(BF16)), leaf64(head.weight)
    ref = reference_divergence(x64, w64, h_t.to(BF16), divergence="jsd", beta=0.4).loss
    ref = ref + reference_logprob(x64, w64, targets).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= VALUE_TOL[F32] * max(1.0, abs(ref.item()))
    assert head.weight.grad.dtype == F32
    assert rel_err(head.weight.grad, w64.grad) < grad_tol(F32, backend)
    assert x.grad.dtype == F32
    assert rel_err(x.grad, x64.grad) < grad_tol(BF16, backend)
