"""The fused losses: teacher-student divergence and per-token log-prob from hidden states and
lm_head weights, chunked over tokens, never materialising the [tokens x vocab] logits.

    api.py            the public functions and nn.Modules (entry points)
    checks.py         their arguments checked, every error naming the argument
    autograd.py       the autograd Functions, rows per chunk, masked rows compacted
    torch_backend.py  chunked PyTorch implementation (CPUs, and a fallback anywhere)
    topk.py           top-k divergences (renormalised, or with a tail): the row math, both backends
    kernels/          the Triton kernels and their launchers (CUDA)
    reference.py      the unfused float64 reference the tests and benchmarks compare against
"""

from .api import (
    DivergenceOutput,
    FusedLinearDivergence,
    FusedLinearLogprob,
    fused_linear_divergence,
    fused_linear_logprob,
    resolve_backend,
)
from .checks import BACKENDS, DIVERGENCES, REDUCTIONS

__all__ = [
    "BACKENDS",
    "DIVERGENCES",
    "REDUCTIONS",
    "DivergenceOutput",
    "FusedLinearDivergence",
    "FusedLinearLogprob",
    "fused_linear_divergence",
    "fused_linear_logprob",
    "resolve_backend",
]
