"""Top-k (`topk=`, test_topk.py) combined with the other options of issue 26: per-token `weights=`,
`return_entropy=` (the student's full-vocabulary entropy), clip on every divergence, JSD's beta at
0 and 1, and torch.autocast; both backends (Triton under the interpreter), against the float64
reference on fresh random inputs drawn with a top-k margin (see test_topk.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, VALUE_TOL, grad_tol, leaf64, random_mask, rel_err
from test_topk import _draw

import fastsd
from fastsd.reference import reference_divergence

F32, BF16 = torch.float32, torch.bfloat16


def _nan_masked_weights(n, mask, g, device):
    """Weights in [0, 2], NaN on masked rows (which must never be read)."""
    w = 2 * torch.rand(n, generator=g)
    w[~mask.cpu()] = float("nan")
    return w.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,k,topk_from,tail,clip,reduction", [
    ("forward_kl", 6, "teacher", True, None, "mean"),
    ("reverse_kl", 4, "student", False, 0.02, "none"),
    ("jsd", 6, "teacher", True, 0.01, "sum"),
])
def test_topk_with_weights_and_entropy_matches_float64(backend, divergence, k, topk_from, tail, clip, reduction,
                                                       device):
    """Each row's top-k loss and gradient times its weight (per_token unweighted), and the student's
    entropy over the full vocabulary, from the same pass."""
    n, v = 21, 89
    h_s, w, h_t, w_t, g = _draw(n, 24, v, k=k, topk_from=topk_from, dtype=F32, temperature=1.2, shared=True,
                                confident=False, device=device)
    mask = random_mask("some", n, g).to(device)
    weights = _nan_masked_weights(n, mask, g, device)
    upstream = torch.randn(n, generator=g).to(device) if reduction == "none" else torch.tensor(0.9, device=device)
    kw = dict(divergence=divergence, beta=0.35, clip=clip, temperature=1.2, reduction=reduction, mask=mask,
              topk=k, topk_from=topk_from, tail=tail)
    h_s, w = h_s.requires_grad_(True), w.requires_grad_(True)
    out = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, weights=weights, return_entropy=True, backend=backend,
                                         chunk_size=5, **kw)
    (out.loss * upstream).sum().backward()
    h64, w64 = leaf64(h_s), leaf64(w)
    ref = reference_divergence(h64, w64, h_t, w_t.double(), weights=weights, **kw)
    (ref.loss * upstream.double()).sum().backward()
    assert torch.isfinite(out.loss).all()
    assert rel_err(out.loss, ref.loss) < VALUE_TOL[F32]
    assert rel_err(out.per_token, ref.per_token) < VALUE_TOL[F32]
    assert rel_err(h_s.grad, h64.grad) < grad_tol(F32, backend)
    assert rel_err(w.grad, w64.grad) < grad_tol(F32, backend)
    assert not out.entropy.requires_grad and torch.all(out.entropy[~mask] == 0)
    assert rel_err(out.entropy, ref.entropy) < VALUE_TOL[F32]
    # the weights are applied: doubled, the loss doubles (compared with the unweighted loss instead,
    # a draw whose weights average out over the rows would fail); and the entropy is the full
    # vocabulary's, not the K categories'
    doubled = fastsd.fused_linear_divergence(h_s.detach(), w.detach(), h_t, w_t, weights=2 * weights,
                                             backend=backend, chunk_size=5, **kw)
    assert rel_err(doubled.loss, 2 * ref.loss) < VALUE_TOL[F32]
    cats = torch.log_softmax((h_s.detach().double() @ w.detach().double().T / 1.2).topk(k, 1).values, 1)
    assert rel_err(torch.where(mask, -(cats.exp() * cats).sum(1), 0.0), ref.entropy) > 0.01
    if clip is not None:  # the clip is live in this draw
        assert rel_err(reference_divergence(h_s, w, h_t, w_t, **{**kw, "clip": None}).per_token,
                       ref.per_token) > 100 * VALUE_TOL[F32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta,kl", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_topk_jsd_endpoints_are_the_topk_kls(backend, tail, beta, kl, device):
    """Top-k JSD with beta 0 / 1 is the top-k forward / reverse KL (TRL's and Liger's convention), with
    clip too: values and gradients, and against float64."""
    n, v, k = 17, 61, 5
    h_s, w, h_t, w_t, g = _draw(n, 16, v, k=k, topk_from="teacher", dtype=F32, temperature=1.0, shared=False,
                                confident=False, device=device)
    kw = dict(topk=k, tail=tail, clip=0.05, reduction="sum", backend=backend, chunk_size=4)
    grads = []
    for div in ("jsd", kl):
        hs, ws = h_s.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = fastsd.fused_linear_divergence(hs, ws, h_t, w_t, divergence=div, beta=beta, **kw)
        out.loss.backward()
        grads.append((out.per_token, hs.grad, ws.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    ref = reference_divergence(h_s, w, h_t, w_t, divergence="jsd", beta=beta, topk=k, tail=tail, clip=0.05)
    assert rel_err(grads[0][0], ref.per_token) < VALUE_TOL[F32]
    # not the mixture's limit (0): a real divergence
    assert ref.per_token.abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(BF16, F32), (BF16, BF16)], ids=["hbf16-wf32", "hbf16-wbf16"])
@pytest.mark.parametrize("divergence,tail", [("forward_kl", True), ("jsd", False)])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_topk_under_autocast_matches_float64(backend, dtypes, divergence, tail, backward_inside, device):
    """16-bit activations over fp32 (or bf16) weights under bf16 autocast: the top-k row math stays
    fp32, each gradient comes back in its input's dtype."""
    h_dtype, w_dtype = dtypes
    n, v, k = 19, 83, 6
    h_s, w, h_t, w_t, g = _draw(n, 24, v, k=k, topk_from="teacher", dtype=F32, temperature=1.0, shared=True,
                                confident=False, device=device)
    h_s, h_t, w, w_t = h_s.to(h_dtype), h_t.to(h_dtype), w.to(w_dtype), w_t.to(w_dtype)
    mask = random_mask("some", n, g).to(device)
    kw = dict(divergence=divergence, beta=0.4, mask=mask, topk=k, tail=tail, reduction="mean")
    h_s, w = h_s.requires_grad_(True), w.requires_grad_(True)
    with torch.autocast(torch.device(device).type, dtype=BF16):
        out = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, backend=backend, chunk_size=6, **kw)
        if backward_inside:
            out.loss.backward()
    if not backward_inside:
        out.loss.backward()
    assert out.loss.dtype == F32
    h64, w64 = leaf64(h_s), leaf64(w)
    ref = reference_divergence(h64, w64, h_t, w_t.double(), **kw)
    ref.loss.backward()
    assert rel_err(out.per_token, ref.per_token) < VALUE_TOL[F32]
    assert h_s.grad.dtype == h_dtype and w.grad.dtype == w_dtype
    assert rel_err(h_s.grad, h64.grad) < grad_tol(h_dtype, backend)
    assert rel_err(w.grad, w64.grad) < grad_tol(w_dtype, backend)
