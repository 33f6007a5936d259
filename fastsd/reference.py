"""`fastsd.reference`, the public name of the float64 reference (it lives in `fastsd.loss.reference`)."""

from .loss.reference import per_token_divergence, reference_divergence, reference_logprob

__all__ = ["per_token_divergence", "reference_divergence", "reference_logprob"]
