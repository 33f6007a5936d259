"""fused_linear_logprob against the float64 reference, both backends, and the torch backend's
kept softmax (what its backward reuses, and when it lets go of it)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import BACKENDS, VALUE_TOL, grad_tol, leaf64, make_inputs, random_mask, rel_err

import fastsd
from fastsd.reference import reference_logprob

F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_logprob_matches_float64(backend, dtype, device):
    _logprob_vs_float64(backend, dtype, device)


def _logprob_vs_float64(backend, dtype, device, chunk_size=16, retain_graph=False):
    n, d, v = 41, 40, 263
    h, w, _, _, g = make_inputs(n, d, v, dtype=dtype, device=device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    mask = random_mask("some", n, g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    lp = fastsd.fused_linear_logprob(h, w, targets, temperature=0.8, mask=mask, backend=backend, chunk_size=chunk_size)
    (lp * upstream).sum().backward(retain_graph=retain_graph)
    h64, w64 = leaf64(h), leaf64(w)
    ref = reference_logprob(h64, w64, targets, temperature=0.8, mask=mask)
    (ref * upstream.double()).sum().backward()
    assert rel_err(lp, ref) < VALUE_TOL[dtype]
    assert rel_err(h.grad, h64.grad) < grad_tol(dtype, backend)
    assert rel_err(w.grad, w64.grad) < grad_tol(dtype, backend)
    assert torch.all(lp[~mask] == 0) and torch.all(h.grad[~mask] == 0)
    return lp * upstream, h, w


def test_logprob_over_chunks_keeps_the_last_one(monkeypatch, device):
    """torch backend, valid rows over several chunks (equal to a row): the forward keeps the last
    one's softmax, so the backward recomputes the logits of the rows before it only;
    values and gradients match float64 as above. A second backward (retain_graph: the kept
    buffer was reused) recomputes every row and gives the same gradients to fp32 rounding."""
    from fastsd.loss import torch_backend

    seen = []
    real = torch_backend._logits
    monkeypatch.setattr(torch_backend, "_logits", lambda h, r, *a: seen.append(r.numel()) or real(h, r, *a))
    out, h, w = _logprob_vs_float64("torch", F32, device, chunk_size=12, retain_graph=True)
    n = int((out != 0).sum())  # valid rows: the mask is random, 41 rows with p = 0.7
    k = -(-n // 12)
    forward, backward = seen[:k], seen[k:]
    assert k >= 2 and sum(forward) == n and max(forward) - min(forward) <= 1
    assert sum(backward) == n - forward[-1] and max(backward) <= 12
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    seen.clear()
    out.sum().backward()
    assert sum(seen) == n and len(seen) == k
    assert rel_err(h.grad, first[0]) < 1e-6 and rel_err(w.grad, first[1]) < 1e-6


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_logprob_in_one_chunk_keeps_its_gradient(dtype, monkeypatch, device):
    """torch backend: when the valid rows fit one chunk (default chunk size here), the forward
    keeps its softmax p and the backward runs no second logits pass; values and gradients match
    float64 as above. The backward releases the buffer although the output is still held, and a
    second backward (retain_graph) recomputes it and gives the same gradients."""
    from fastsd.loss import torch_backend

    calls, kept = [], []
    real = torch_backend.logprob_chunked

    def spy(*a, **k):
        calls.append(sorted(k))
        got = real(*a, **k)
        if k.get("keep"):
            kept.append(weakref.ref(k["keep"][0][1]))
        return got

    monkeypatch.setattr(torch_backend, "logprob_chunked", spy)
    out, h, w = _logprob_vs_float64("torch", dtype, device, chunk_size=None, retain_graph=True)
    assert len(calls) == 1 and "keep" in calls[0]  # the forward only
    gc.collect()
    assert len(kept) == 1 and kept[0]() is None and out.grad_fn is not None
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    out.sum().backward()
    assert torch.equal(h.grad, first[0]) and torch.equal(w.grad, first[1])
