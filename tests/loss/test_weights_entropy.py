"""Per-token `weights` (multiplying each token's loss and gradient) and the student's entropy
(`return_entropy`), both fused functions, both backends, against the float64 reference on fresh
random inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, VALUE_TOL, grad_tol, leaf64, make_inputs, random_mask, rel_err

import fastsd
from fastsd.loss import torch_backend
from fastsd.reference import reference_divergence, reference_logprob

F32, BF16 = torch.float32, torch.bfloat16


def _weights(n, mask, g, device):
    """Weights in [0, 2], with NaN on masked rows (which must not leak)."""
    w = 2 * torch.rand(n, generator=g)
    if mask is not None:
        w[~mask] = float("nan")
    return w.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,clip,reduction,dtype", [
    ("forward_kl", None, "mean", F32), ("reverse_kl", 0.02, "none", F32), ("jsd", None, "sum", BF16),
    ("forward_kl", None, "none", BF16)])
def test_divergence_weights_and_entropy_match_float64(backend, divergence, clip, reduction, dtype, device):
    n, d, v = 27, 32, 173
    h_s, w, h_t, w_t, g = make_inputs(n, d, v, dtype=dtype, device=device)
    mask = random_mask("some", n, g).to(device)
    weights = _weights(n, mask, g, device)
    upstream = torch.randn(n, generator=g).to(device) if reduction == "none" else torch.tensor(0.8, device=device)
    kw = dict(divergence=divergence, clip=clip, reduction=reduction, mask=mask, temperature=1.1, beta=0.4)
    h_s.requires_grad_(True)
    w.requires_grad_(True)
    out = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, weights=weights, return_entropy=True, backend=backend,
                                         chunk_size=8, **kw)
    (out.loss * upstream).sum().backward()
    h64, w64 = leaf64(h_s), leaf64(w)
    ref = reference_divergence(h64, w64, h_t, w_t.double(), weights=weights, **kw)
    (ref.loss * upstream.double()).sum().backward()
    assert torch.isfinite(out.loss).all()
    assert rel_err(out.loss, ref.loss) < VALUE_TOL[dtype]
    assert rel_err(out.per_token, ref.per_token) < VALUE_TOL[dtype]  # unweighted
    assert rel_err(h_s.grad, h64.grad) < grad_tol(dtype, backend)
    assert rel_err(w.grad, w64.grad) < grad_tol(dtype, backend)
    assert not out.entropy.requires_grad and torch.all(out.entropy[~mask] == 0)
    assert rel_err(out.entropy, ref.entropy) < VALUE_TOL[dtype]
    # the weights are applied: doubled, the loss doubles. (Compared with the unweighted loss instead,
    # a draw whose weights average out over the rows, as random weights in [0, 2] can, would fail.)
    doubled = fastsd.fused_linear_divergence(h_s.detach(), w.detach(), h_t, w_t, weights=2 * weights,
                                             backend=backend, chunk_size=8, **kw)
    assert rel_err(doubled.loss, 2 * ref.loss) < VALUE_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [8, 64])  # the torch backend's kept softmax: the last chunk / all rows
def test_logprob_weights_and_entropy_match_float64(backend, chunk_size, device):
    n, d, v = 33, 32, 191
    h, w, _, _, g = make_inputs(n, d, v, device=device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    mask = random_mask("some", n, g).to(device)
    weights = _weights(n, mask, g, device)
    upstream = torch.randn(n, generator=g).to(device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    lp, ent = fastsd.fused_linear_logprob(h, w, targets, mask=mask, weights=weights, temperature=0.7,
                                          return_entropy=True, backend=backend, chunk_size=chunk_size)
    (lp * upstream).sum().backward()
    h64, w64 = leaf64(h), leaf64(w)
    ref, ref_ent = reference_logprob(h64, w64, targets, mask=mask, weights=weights, temperature=0.7,
                                     return_entropy=True)
    (ref * upstream.double()).sum().backward()
    assert rel_err(lp, ref) < VALUE_TOL[F32]
    assert rel_err(h.grad, h64.grad) < grad_tol(F32, backend)
    assert rel_err(w.grad, w64.grad) < grad_tol(F32, backend)
    assert not ent.requires_grad and torch.all(ent[~mask] == 0)
    assert rel_err(ent, ref_ent) < VALUE_TOL[F32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_confident_large_logits(backend, device):
    """Logits of ~1024 and sharply peaked: the entropy keeps fp32 digits (Triton accumulates
    E_p[z - z0], not E_p[z])."""
    n, d, v = 17, 32, 131
    h, w, h_t, _, g = make_inputs(n, d, v, device=device, confident=True)
    col = lambda t, x: torch.cat([t, torch.full((t.shape[0], 1), x, dtype=t.dtype, device=t.device)], 1)
    h, w, h_t = col(h, 64.0), col(w, 16.0), col(h_t, 64.0)
    out = fastsd.fused_linear_divergence(h, w, h_t, return_entropy=True, backend=backend, chunk_size=8)
    ref = reference_divergence(h.double(), w.double(), h_t.double())
    assert (ref.entropy.abs().max() > 1e-3).item()
    assert (out.entropy - ref.entropy).abs().max().item() < 2e-4 * max(1.0, ref.entropy.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_costs_no_extra_gemm(monkeypatch, backend, device):
    """The logits GEMMs are counted with and without the entropy: the same number."""
    if backend == "torch":
        target, name = torch_backend, "_logits"
    else:
        from fastsd.loss import kernels as target
        name = "logits"
    real = getattr(target, name)
    calls = []
    monkeypatch.setattr(target, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    h_s, w, h_t, _, g = make_inputs(20, 16, 67, device=device)
    ids = torch.randint(0, 67, (20,), generator=g).to(device)
    counts = []
    for entropy in (False, True):
        calls.clear()
        fastsd.fused_linear_divergence(h_s, w.requires_grad_(True), h_t, return_entropy=entropy, backend=backend,
                                       chunk_size=8).loss.backward()
        fastsd.fused_linear_logprob(h_s, w, ids, return_entropy=entropy, backend=backend, chunk_size=8)
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0


def test_weights_are_checked():
    h, w, t, _, _ = make_inputs(6, 8, 11)
    with pytest.raises(ValueError, match="weights"):
        fastsd.fused_linear_divergence(h, w, t, weights=torch.ones(5))
    with pytest.raises(ValueError, match="weights"):
        fastsd.fused_linear_logprob(h, w, torch.zeros(6, dtype=torch.long), weights=torch.ones(6, dtype=torch.long))
