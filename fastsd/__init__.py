"""fastsd: on-policy self-distillation from a critic's feedback, with fused divergence kernels.

The public API (the fused losses, `fastsd.loss`) is imported on first use, so the command-line
programs can set the OpenMP environment before torch loads (`fastsd.run.openmp`).
"""

__version__ = "0.1.0"

__all__ = [
    "DivergenceOutput",
    "FusedLinearDivergence",
    "FusedLinearLogprob",
    "fused_linear_divergence",
    "fused_linear_logprob",
    "resolve_backend",
]


def __getattr__(name: str):
    if name in __all__:
        from . import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'fastsd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
