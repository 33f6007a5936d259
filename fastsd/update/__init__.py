"""The step's update stage: the loss over the trained rollouts, backward, clip, optimizer step.

    step.py  `update` (entry point), and the loss of one micro-batch by condition
"""

from .step import NonFiniteLossError, update

__all__ = ["NonFiniteLossError", "update"]
