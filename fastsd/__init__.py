"""fastsd: on-policy self-distillation from a critic's feedback, with fused divergence kernels."""

from .loss import (
    DivergenceOutput,
    FusedLinearDivergence,
    FusedLinearLogprob,
    fused_linear_divergence,
    fused_linear_logprob,
    resolve_backend,
)

__version__ = "0.1.0"

__all__ = [
    "DivergenceOutput",
    "FusedLinearDivergence",
    "FusedLinearLogprob",
    "fused_linear_divergence",
    "fused_linear_logprob",
    "resolve_backend",
]
