"""fused_linear_divergence with topk= (a divergence over each row's top-k tokens, renormalised or
with a tail) against the float64 reference, both backends (Triton under the interpreter).

The objective jumps where two logits tie at the k-th place, so fp32 logits can be compared with
float64 ones only where the chosen side's k-th and (k+1)-th logits differ by more than rounding:
`_draw` draws fresh inputs until every row has such a margin. Exact ties are tested apart, on
duplicated vocabulary rows (`test_ties_*`), where the result does not depend on which of the tied
tokens is taken.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, VALUE_TOL, assert_values_match, grad_tol, leaf64, make_inputs, random_mask, rel_err

import fastsd
from fastsd.reference import per_token_divergence, reference_divergence

F32, BF16 = torch.float32, torch.bfloat16
MARGIN = 1e-3  # in logits over the temperature; fp32 logits are off float64 by ~1e-6 here


def _margin_ok(h_s, w, h_t, w_t, k, topk_from, temperature):
    h, wt = (h_t, w_t) if topk_from == "teacher" else (h_s, w)
    z = (h.double() @ wt.double().T) / temperature
    if k >= z.shape[1]:
        return True
    top = z.topk(k + 1, dim=1).values
    return bool((top[:, k - 1] - top[:, k] > MARGIN).all())


def _draw(n, d, v, *, k, topk_from, dtype, temperature, shared, confident, device):
    """make_inputs (confident: logits with std ~ 32) until every row has the top-k margin."""
    for _ in range(100):
        h_s, w, h_t, w_t, g = make_inputs(n, d, v, dtype=dtype, device=device)
        if confident:
            w, w_t = w * 16, w_t * 16  # a power of two: exact in every dtype
        if shared:  # teacher = a perturbed student, as in self-distillation
            h_t, w_t = (h_s.float() + 0.5 * torch.randn(h_s.shape, generator=g).to(device)).to(dtype), w
        if _margin_ok(h_s, w, h_t, w_t, k, topk_from, temperature):
            return h_s, w, h_t, w_t, g
    raise AssertionError("no draw with a top-k margin in 100 tries")


def _run(backend, h_s, w, h_t, w_t, kw, upstream, chunk_size=5):
    """Fused and float64 reference, forward and backward: (out, ref, dX, dW, dX64, dW64)."""
    h_s, w = h_s.detach().requires_grad_(True), w.detach().requires_grad_(True)
    w_t_arg = None if w_t is w else w_t
    out = fastsd.fused_linear_divergence(h_s, w, h_t, w_t_arg, backend=backend, chunk_size=chunk_size, **kw)
    (out.loss * upstream).sum().backward()
    h64, w64 = leaf64(h_s), leaf64(w)
    ref = reference_divergence(h64, w64, h_t, None if w_t_arg is None else w_t_arg.double(), **kw)
    (ref.loss * upstream.double()).sum().backward()
    return out, ref, h_s.grad, w.grad, h64.grad, w64.grad


# (divergence, k, topk_from, tail, clip, beta, dtype, mask, reduction, temperature, shared, confident)
CASES = [
    ("forward_kl", 8, "teacher", True, None, 0.5, F32, "some", "mean", 1.0, True, False),
    ("forward_kl", 8, "student", False, None, 0.5, F32, "none", "none", 1.3, False, False),
    ("forward_kl", 5, "teacher", True, 0.01, 0.5, BF16, "some", "sum", 0.7, False, False),
    ("reverse_kl", 8, "student", True, None, 0.5, F32, "some", "none", 1.3, True, False),
    ("reverse_kl", 5, "teacher", False, 0.02, 0.5, F32, "none", "mean", 1.0, False, False),
    ("reverse_kl", 1, "teacher", True, None, 0.5, BF16, "some", "mean", 1.0, False, False),  # K = 1
    ("jsd", 8, "teacher", False, None, 0.3, F32, "some", "mean", 2.0, True, False),
    ("jsd", 5, "student", True, 0.01, 0.8, BF16, "none", "none", 1.0, False, False),
    ("forward_kl", 1, "student", True, None, 0.5, F32, "some", "mean", 1.0, False, False),  # K = 1
    ("forward_kl", 8, "teacher", True, None, 0.5, F32, "some", "mean", 1.0, True, True),  # confident
    ("reverse_kl", 4, "student", True, 0.05, 0.5, F32, "none", "sum", 1.0, False, True),
    ("jsd", 8, "teacher", False, None, 0.5, F32, "some", "none", 1.0, True, True),
]


def _ids(case):
    div, k, frm, tail, clip, beta, dtype, mask, red, temp, shared, conf = case
    return (f"{div}-k{k}-{frm}-{'tail' if tail else 'renorm'}{f'-clip{clip}' if clip else ''}-{str(dtype)[6:]}"
            f"-mask_{mask}-{red}-T{temp}{'-shared' if shared else ''}{'-confident' if conf else ''}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_topk_matches_float64(backend, case, device):
    div, k, frm, tail, clip, beta, dtype, mask_kind, red, temp, shared, confident = case
    n, v = 23, 97
    h_s, w, h_t, w_t, g = _draw(n, 24, v, k=k, topk_from=frm, dtype=dtype, temperature=temp, shared=shared,
                                confident=confident, device=device)
    mask = random_mask(mask_kind, n, g)
    mask = None if mask is None else mask.to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device) if red == "none" else torch.tensor(1.7, device=device)
    kw = dict(divergence=div, beta=beta, clip=clip, temperature=temp, reduction=red, mask=mask, target_ids=targets,
              topk=k, topk_from=frm, tail=tail)
    out, ref, dx, dw, dx64, dw64 = _run(backend, h_s, w, h_t, w_t, kw, upstream)

    vt, gt = VALUE_TOL[dtype], grad_tol(dtype, backend)
    assert_values_match(out, ref, vt)
    assert dx.dtype == dtype and dw.dtype == dtype
    assert rel_err(dx, dx64) < gt
    assert rel_err(dw, dw64) < gt
    if mask is not None:  # masked rows: no value, no gradient
        assert torch.all(out.per_token[~mask] == 0) and torch.all(dx[~mask] == 0)
    if clip is not None:  # the clip is live in this draw
        unclipped = reference_divergence(h_s, w, h_t, w_t, **{**kw, "clip": None}).per_token
        assert (ref.per_token - unclipped).abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", [False, True])
def test_k_equal_to_the_vocabulary_is_the_full_divergence(backend, divergence, tail, device):
    """K = V: renormalised over everything, or with an empty tail, it is the full divergence
    (the reference without topk), values and gradients; the top-k side is either."""
    n, v = 19, 61
    h_s, w, h_t, w_t, g = make_inputs(n, 16, v, device=device)
    mask = random_mask("some", n, g).to(device)
    kw = dict(divergence=divergence, beta=0.4, temperature=1.2, mask=mask, reduction="sum")
    frm = ["teacher", "student"][int(torch.randint(0, 2, (1,), generator=g))]
    out, _, dx, dw, _, _ = _run(backend, h_s, w, h_t, w_t, dict(kw, topk=v, topk_from=frm, tail=tail),
                                torch.tensor(1.0))
    _, full, _, _, dx64, dw64 = _run(backend, h_s, w, h_t, w_t, kw, torch.tensor(1.0))
    assert rel_err(out.per_token, full.per_token) < VALUE_TOL[F32]
    assert rel_err(dx, dx64) < grad_tol(F32, backend)
    assert rel_err(dw, dw64) < grad_tol(F32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_k1_renormalised_is_zero(backend, divergence, device):
    """One token renormalised is probability 1 on both sides: no divergence, no gradient."""
    h_s, w, h_t, w_t, _ = make_inputs(9, 16, 33, device=device)
    out, _, dx, dw, _, _ = _run(backend, h_s, w, h_t, w_t, dict(divergence=divergence, topk=1, tail=False),
                                torch.tensor(1.0))
    assert out.per_token.abs().max() < 1e-6  # JSD's log M of (1-beta) + beta: fp32 rounding
    assert torch.all(dx == 0) and torch.all(dw == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked_give_nothing(backend, device):
    """Every row masked (the Triton backend still walks the chunks, with no host sync): a zero loss,
    zero log-probs and gradients, for masked target ids of -100 too."""
    h_s, w, h_t, w_t, _ = make_inputs(7, 16, 33, device=device)
    mask = torch.zeros(7, dtype=torch.bool, device=device)
    targets = torch.full((7,), -100, device=device)
    h_s.requires_grad_(True), w.requires_grad_(True)
    out = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, divergence="jsd", topk=4, tail=True, mask=mask,
                                         target_ids=targets, reduction="sum", backend=backend, chunk_size=3)
    out.loss.backward()
    assert out.loss.item() == 0 and torch.all(out.per_token == 0)
    assert torch.all(out.student_logprob == 0) and torch.all(out.teacher_logprob == 0)
    assert torch.all(h_s.grad == 0) and torch.all(w.grad == 0)


def _tied_inputs(n, d, v, dups, k, topk_from, device):
    """Shared weights whose last `dups` rows copy random earlier ones (exact ties in both heads'
    logits), drawn until no other near-tie sits at the k-th place. Returns inputs and the groups
    (each vocabulary row's first copy)."""
    for _ in range(100):
        h_s, w, h_t, _, g = make_inputs(n, d, v, device=device)
        src = torch.randint(0, v - dups, (dups,), generator=g)
        w[v - dups:] = w[src]
        group = torch.cat([torch.arange(v - dups), src])
        h_t = h_s + 0.5 * torch.randn(h_s.shape, generator=g).to(device)
        z = (h_t if topk_from == "teacher" else h_s).double() @ w.double().T
        kth = z.topk(k, dim=1).values[:, -1:]
        near = (z - kth).abs() <= MARGIN  # the tokens around the k-th place: one group of copies
        gid = group.to(z.device)
        first = torch.where(near, gid, -1).amax(1, keepdim=True)
        one_group = bool(torch.where(near, gid == first, True).all())
        straddles = bool(((z >= kth).sum(1) > k).any())  # the case worth testing: a tie across the cut
        if one_group and straddles:
            return h_s, w, h_t, group
    raise AssertionError("no draw with ties at the k-th place in 100 tries")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,topk_from,tail", [("forward_kl", "teacher", True), ("jsd", "student", False),
                                                       ("reverse_kl", "student", True)])
def test_ties_give_the_reference_whichever_tied_token_is_taken(backend, divergence, topk_from, tail, device):
    """Duplicated vocabulary rows tie exactly, also at the k-th place: the loss, dX and dW summed over
    each group of copies (what a different pick among tied tokens leaves unchanged) match float64."""
    n, v, k = 29, 40, 6
    h_s, w, h_t, group = _tied_inputs(n, 16, v, 20, k, topk_from, device)
    kw = dict(divergence=divergence, topk=k, topk_from=topk_from, tail=tail, reduction="mean", temperature=0.9)
    out, ref, dx, dw, dx64, dw64 = _run(backend, h_s, w, h_t, w, kw, torch.tensor(1.0))
    fold = lambda t: torch.zeros(v, t.shape[1], dtype=t.dtype).index_add_(0, group, t.cpu())
    assert rel_err(out.per_token, ref.per_token) < VALUE_TOL[F32]
    assert rel_err(dx, dx64) < grad_tol(F32, backend)
    assert rel_err(fold(dw.double()), fold(dw64)) < grad_tol(F32, backend)


def test_the_reference_tail_by_hand():
    """K = 1 with a tail is the two-category divergence of (p_1, 1 - p_1) on each side."""
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    first = t.argmax(1, keepdim=True)
    a = t.softmax(1).gather(1, first).squeeze(1)
    b = s.softmax(1).gather(1, first).squeeze(1)
    by_hand = {
        "forward_kl": a * (a / b).log() + (1 - a) * ((1 - a) / (1 - b)).log(),
        "reverse_kl": b * (b / a).log() + (1 - b) * ((1 - b) / (1 - a)).log(),
    }
    m, m1 = 0.7 * b + 0.3 * a, 0.7 * (1 - b) + 0.3 * (1 - a)
    by_hand["jsd"] = (0.3 * (a * (a / m).log() + (1 - a) * ((1 - a) / m1).log())
                      + 0.7 * (b * (b / m).log() + (1 - b) * ((1 - b) / m1).log()))
    for div, want in by_hand.items():
        got = per_token_divergence(s, t, divergence=div, beta=0.3, topk=1, topk_from="teacher", tail=True)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), div


@pytest.mark.parametrize("name,kw", [
    ("topk", dict(topk=0)), ("topk", dict(topk=34)), ("topk", dict(topk=2.0)), ("topk", dict(topk=True)),
    ("topk_from", dict(topk=2, topk_from="both")), ("tail", dict(topk=2, tail="yes")),
    ("clip", dict(topk=2, divergence="jsd", clip=0.0)),  # clip on every divergence, > 0
])
def test_bad_topk_options_name_the_argument(name, kw):
    h_s, w, h_t, _, _ = make_inputs(3, 8, 33)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        fastsd.fused_linear_divergence(h_s, w, h_t, **kw)
    if kw.get("topk") != 34:  # the vocabulary is known only at the call
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fastsd.FusedLinearDivergence(**kw)


def test_module_passes_the_topk_options():
    h_s, w, h_t, w_t, _ = make_inputs(6, 8, 33)
    mod = fastsd.FusedLinearDivergence("reverse_kl", topk=3, topk_from="student", tail=False, clip=0.2)
    got = mod(h_s, w, h_t, w_t).loss
    want = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, divergence="reverse_kl", topk=3, topk_from="student",
                                          tail=False, clip=0.2).loss
    assert torch.equal(got, want)
    full = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, divergence="reverse_kl").loss
    assert not math.isclose(got.item(), full.item())
