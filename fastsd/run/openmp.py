"""OpenMP threads that sleep when they wait, for fastsd's programs (`fastsd-train`, `fastsd-select`).

PyTorch's CPU build splits each operator over its threads with OpenMP (GNU libgomp in the pip
wheels). By default a thread that has done its share spins for a while before it sleeps, ready
for the next operator. That is free on an idle machine and ruinous on a busy one: a spinning
thread holds a core that the thread it waits for needs, and a small model's step is thousands of
short operators. `OMP_WAIT_POLICY=PASSIVE` makes a waiting thread sleep at once; measured figures
are in docs/cpu.md. libgomp reads the variable once, when torch loads, so `sleep_when_waiting()`
runs before anything imports torch, and a value the user set is kept.
"""

from __future__ import annotations

import os


def sleep_when_waiting() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless it is set (before torch loads; see the module docstring)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
