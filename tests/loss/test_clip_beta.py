"""Clip on every divergence and JSD's endpoints: beta = 0 is the forward KL, beta = 1 the reverse
KL (TRL's and Liger's convention), both backends; float64 checks of each option are in
test_loss.py's CASES."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, VALUE_TOL, grad_tol, leaf64, make_inputs, rel_err

import fastsd
from fastsd.reference import per_token_divergence, reference_divergence

F32 = torch.float32


def _pair(n, d, v, device):
    h_s, w, h_t, _, g = make_inputs(n, d, v, device=device)
    h_t = h_s + 0.7 * torch.randn(h_s.shape, generator=g).to(device)  # a perturbed student
    return h_s, w, h_t, g


def _run(h_s, w, h_t, backend, **kw):
    h, ww = h_s.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fastsd.fused_linear_divergence(h, ww, h_t, backend=backend, chunk_size=8, reduction="none", **kw)
    upstream = torch.linspace(-1.0, 2.0, h.shape[0], device=h.device)
    (out.loss * upstream).sum().backward()
    return out.per_token, h.grad, ww.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta,kl", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
@pytest.mark.parametrize("clip", [None, 0.01])
def test_jsd_endpoints_equal_the_kls(backend, beta, kl, clip, device):
    h_s, w, h_t, _ = _pair(23, 32, 157, device)
    jsd = _run(h_s, w, h_t, backend, divergence="jsd", beta=beta, clip=clip)
    want = _run(h_s, w, h_t, backend, divergence=kl, clip=clip)
    for got, ref in zip(jsd, want):
        assert rel_err(got, ref) < VALUE_TOL[F32]
    # and both against float64 of the KL, written from its definition
    h64, w64 = leaf64(h_s), leaf64(w)
    ref = reference_divergence(h64, w64, h_t, divergence=kl, clip=clip, reduction="none")
    (ref.loss * torch.linspace(-1.0, 2.0, 23, dtype=torch.float64)).sum().backward()
    assert rel_err(jsd[0], ref.per_token) < VALUE_TOL[F32]
    assert rel_err(jsd[1], h64.grad) < grad_tol(F32, backend)
    assert rel_err(jsd[2], w64.grad) < grad_tol(F32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_clip_binds_and_matches_float64(backend, divergence, beta, device):
    """A clip that binds: the clipped divergence lies strictly below the unclipped one on some
    rows, and values and gradients match float64's clamp (and differ from the unclipped ones)."""
    h_s, w, h_t, g = _pair(21, 32, 149, device)
    h_s = h_s * 2.0  # sharper: some summands well above the clip
    clip = 0.01
    kw = dict(divergence=divergence, beta=beta)
    z_s, z_t = (h_s.double() @ w.double().T), (h_t.double() @ w.double().T)
    free = per_token_divergence(z_s, z_t, **kw)
    clipped = per_token_divergence(z_s, z_t, clip=clip, **kw)
    assert (clipped < free - 1e-6).any()
    per_token, dh, dw = _run(h_s, w, h_t, backend, clip=clip, **kw)
    h64, w64 = leaf64(h_s), leaf64(w)
    ref = reference_divergence(h64, w64, h_t, clip=clip, reduction="none", **kw)
    (ref.loss * torch.linspace(-1.0, 2.0, 21, dtype=torch.float64)).sum().backward()
    assert rel_err(per_token, ref.per_token) < VALUE_TOL[F32]
    assert rel_err(dh, h64.grad) < grad_tol(F32, backend)
    assert rel_err(dw, w64.grad) < grad_tol(F32, backend)
    # the unclipped gradient differs: the clip changed it
    _, dh_free, _ = _run(h_s, w, h_t, backend, **kw)
    assert rel_err(dh_free, h64.grad) > 10 * grad_tol(F32, backend)


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_jsd_beta_outside_unit_interval_is_refused(beta):
    h, w, t, _, _ = make_inputs(4, 8, 11)
    with pytest.raises(ValueError, match="beta"):
        fastsd.fused_linear_divergence(h, w, t, divergence="jsd", beta=beta)
