"""The public surface: argument checking, modules, backend choice, packaging."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import make_inputs, rel_err

import fastsd
from fastsd.reference import reference_divergence


def _inputs(n=6, d=16, v=50):
    h_s, w, h_t, w_t, _ = make_inputs(n, d, v)
    return h_s, w, h_t, w_t


BAD_DIVERGENCE_CALLS = [
    ("weight", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w[:, :-1], t)),
    ("teacher_hidden", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t[:-1])),
    ("teacher_weight", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, wt[:-1])),
    ("student_hidden", lambda h, w, t, wt: fastsd.fused_linear_divergence(h.double(), w.double(), t)),
    ("student_hidden", lambda h, w, t, wt: fastsd.fused_linear_divergence(h.double(), w, t)),
    ("temperature", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, temperature=0.0)),
    ("temperature", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, temperature=-1.0)),
    ("beta", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, divergence="jsd", beta=-0.01)),
    ("beta", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, divergence="jsd", beta=1.01)),
    ("beta", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, divergence="jsd", beta=float("nan"))),
    ("divergence", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, divergence="kl")),
    ("reduction", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, reduction="avg")),
    ("target_ids", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, target_ids=torch.full((6,), 50))),
    ("target_ids", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, target_ids=torch.full((6,), -1))),
    ("target_ids", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, target_ids=torch.zeros(5, dtype=torch.long))),
    ("mask", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, mask=torch.ones(5, dtype=torch.bool))),
    ("mask", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, mask=torch.ones(6))),
    ("backend", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, backend="cuda")),
    ("chunk_size", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, chunk_size=0)),
    ("clip", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, clip=float("nan"))),
    ("clip", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, clip=-1.0)),
    ("divergence", lambda h, w, t, wt: fastsd.fused_linear_divergence(h, w, t, divergence=None)),
    # [B, T] against [T, B]: the same number of rows, paired wrongly
    ("teacher_hidden", lambda h, w, t, wt: fastsd.fused_linear_divergence(h.reshape(2, 3, -1), w, t.reshape(3, 2, -1))),
]


@pytest.mark.parametrize("name,call", BAD_DIVERGENCE_CALLS, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD_DIVERGENCE_CALLS)])
def test_bad_divergence_input_names_the_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call(*_inputs())


BAD_LOGPROB_CALLS = [
    ("target_ids", lambda h, w: fastsd.fused_linear_logprob(h, w, torch.full((6,), 50))),
    ("target_ids", lambda h, w: fastsd.fused_linear_logprob(h, w, torch.zeros(6))),
    ("temperature", lambda h, w: fastsd.fused_linear_logprob(h, w, torch.zeros(6, dtype=torch.long), temperature=0)),
    ("weight", lambda h, w: fastsd.fused_linear_logprob(h, w.T.contiguous(), torch.zeros(6, dtype=torch.long))),
    ("mask", lambda h, w: fastsd.fused_linear_logprob(h, w, torch.zeros(6, dtype=torch.long), mask=torch.ones(2, dtype=torch.bool))),
]


@pytest.mark.parametrize("name,call", BAD_LOGPROB_CALLS, ids=[n for n, _ in BAD_LOGPROB_CALLS])
def test_bad_logprob_input_names_the_argument(name, call):
    h, w, _, _ = _inputs()
    with pytest.raises(ValueError, match=name):
        call(h, w)


def test_modules_match_functions():
    h_s, w, h_t, w_t = _inputs()
    ids = torch.randint(0, 50, (6,))
    mod = fastsd.FusedLinearDivergence("jsd", beta=0.3, temperature=1.2)
    a = mod(h_s, w, h_t, w_t, target_ids=ids)
    b = fastsd.fused_linear_divergence(h_s, w, h_t, w_t, target_ids=ids, divergence="jsd", beta=0.3, temperature=1.2)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.student_logprob, b.student_logprob)
    assert "jsd" in repr(mod)
    lp_mod = fastsd.FusedLinearLogprob(temperature=0.5)
    assert torch.equal(lp_mod(h_s, w, ids), fastsd.fused_linear_logprob(h_s, w, ids, temperature=0.5))


@pytest.mark.parametrize("name,kw", [("divergence", dict(divergence="kl")), ("beta", dict(divergence="jsd", beta=7)),
                                     ("temperature", dict(temperature=-1)), ("reduction", dict(reduction="avg")),
                                     ("chunk_size", dict(chunk_size=0)), ("backend", dict(backend="cuda")),
                                     ("clip", dict(clip=0.0))])
def test_modules_check_their_options_at_construction(name, kw):
    with pytest.raises(ValueError, match=name):
        fastsd.FusedLinearDivergence(**kw)
    if name in ("temperature", "chunk_size", "backend"):
        with pytest.raises(ValueError, match=name):
            fastsd.FusedLinearLogprob(**kw)


def test_one_flat_side_may_meet_a_batched_side():
    h_s, w, h_t, _ = _inputs()
    ref = fastsd.fused_linear_divergence(h_s, w, h_t).loss
    assert torch.equal(fastsd.fused_linear_divergence(h_s.reshape(2, 3, -1), w, h_t).loss, ref)
    assert torch.equal(fastsd.fused_linear_divergence(h_s, w, h_t.reshape(2, 3, -1)).loss, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gives_zero_loss_and_zero_gradients(backend, device):
    w = _inputs()[1].to(device).requires_grad_(True)
    for lead in ((0,), (2, 0)):
        h = torch.zeros(*lead, 16, device=device, requires_grad=True)
        out = fastsd.fused_linear_divergence(h, w, torch.zeros(*lead, 16, device=device), backend=backend)
        assert out.loss.item() == 0.0 and out.per_token.shape == (0,)
        out.loss.backward()
        assert h.grad.shape == h.shape and torch.all(w.grad == 0)
        lp = fastsd.fused_linear_logprob(h, w, torch.zeros(lead, dtype=torch.long, device=device), backend=backend)
        assert lp.shape == (0,)
        lp.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivatives_are_refused_not_silently_wrong(backend, reduction, device):
    """The backward's gradients are not differentiable: create_graph=True would drop the fused
    term from a second derivative without a word (it did), so it raises."""
    h_s, w, h_t, _ = (t.to(device) for t in _inputs())
    h_s.requires_grad_(True)
    ids = torch.zeros(6, dtype=torch.long, device=device)
    calls = [lambda: fastsd.fused_linear_divergence(h_s, w, h_t, reduction=reduction, backend=backend).loss.sum(),
             lambda: fastsd.fused_linear_logprob(h_s, w, ids, backend=backend).sum()]
    for call in calls:
        with pytest.raises(RuntimeError, match="not twice differentiable"):
            torch.autograd.grad(call() + (h_s**2).sum(), h_s, create_graph=True)
        (g,) = torch.autograd.grad(call(), h_s)  # a plain gradient still works
        assert g.shape == h_s.shape


def test_reduction_none_and_sum_are_consistent_with_mean():
    h_s, w, h_t, _ = _inputs(n=10)
    mask = torch.tensor([True, False] * 5)
    none = fastsd.fused_linear_divergence(h_s, w, h_t, mask=mask, reduction="none").loss
    total = fastsd.fused_linear_divergence(h_s, w, h_t, mask=mask, reduction="sum").loss
    mean = fastsd.fused_linear_divergence(h_s, w, h_t, mask=mask).loss
    assert none.shape == (10,) and torch.all(none[~mask] == 0)
    assert torch.allclose(none.sum(), total) and torch.allclose(total / 5, mean)
    ref = reference_divergence(h_s, w, h_t, mask=mask)
    assert rel_err(mean, ref.loss) < 2e-5


def test_backend_choice_and_environment_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTSD_BACKEND", raising=False)
    assert fastsd.resolve_backend(None, cpu) == "torch"
    assert fastsd.resolve_backend(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv("FASTSD_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastsd.resolve_backend(None, cpu) == "triton"
    assert fastsd.resolve_backend("torch", cpu) == "torch"  # an explicit argument wins
    monkeypatch.setenv("FASTSD_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend"):
        fastsd.resolve_backend(None, cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fastsd.resolve_backend("triton", cpu)


def test_kernels_are_only_importable_inside_fastsd():
    """A top-level `kernels` would shadow the Hugging Face package transformers imports at start.

    The Triton code is `fastsd.loss.kernels`, inside the package; a fresh interpreter started in
    the checkout's root (which `python -c` and `python -m` put first on sys.path) finds no
    `kernels` among the checkout's own folders."""
    import fastsd.loss.kernels

    root = pathlib.Path(fastsd.__file__).resolve().parent.parent
    assert pathlib.Path(fastsd.loss.kernels.__file__).resolve().parent == root / "fastsd" / "loss" / "kernels"
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    found = pathlib.Path(out).resolve() if out else None  # an installed `kernels` (a venv may lie in the checkout)
    assert found is None or "site-packages" in found.parts or root not in found.parents, out


def test_masked_rows_may_hold_ignore_index_targets():
    h_s, w, h_t, _ = _inputs()
    mask = torch.tensor([True, False, True, True, False, True])
    ids = torch.randint(0, 50, (6,))
    ids[~mask] = -100  # the usual "ignore" label
    out = fastsd.fused_linear_divergence(h_s, w, h_t, mask=mask, target_ids=ids)
    ref = reference_divergence(h_s, w, h_t, mask=mask, target_ids=ids.clamp(min=0))
    assert rel_err(out.student_logprob, ref.student_logprob) < 2e-5
    lp = fastsd.fused_linear_logprob(h_s, w, ids, mask=mask)
    assert torch.all(lp[~mask] == 0) and torch.all(lp[mask] < 0)


def test_explicit_shared_teacher_weight_equals_none():
    h_s, w, h_t, _ = _inputs()
    a = fastsd.fused_linear_divergence(h_s, w, h_t, w).loss
    b = fastsd.fused_linear_divergence(h_s, w, h_t).loss
    assert torch.equal(a, b)


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Evaluation calls under torch.no_grad() must not run the backward matmuls."""
    from fastsd.loss import torch_backend

    seen = []
    real = torch_backend.divergence_chunked
    monkeypatch.setattr(torch_backend, "divergence_chunked", lambda *a, **k: seen.append(k) or real(*a, **k))
    h_s, w, h_t, _ = _inputs()
    h_s.requires_grad_(True)
    w.requires_grad_(True)
    with torch.no_grad():
        out = fastsd.fused_linear_divergence(h_s, w, h_t)
    assert not out.loss.requires_grad
    assert seen and seen[0]["row_scale"] is None and not seen[0]["need_dx"] and not seen[0]["need_dw"]
