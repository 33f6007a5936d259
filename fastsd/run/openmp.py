"""OpenMP threads that sleep when they wait, on a busy machine, for fastsd's programs
(`fastsd-train`, `fastsd-select`).

PyTorch's CPU build splits each operator over its threads with OpenMP (GNU libgomp in the pip
wheels). By default a thread that has done its share spins for a while before it sleeps, ready
for the next operator. On an idle machine that is the fastest; on a busy one a spinning thread
holds a core that the thread it waits for needs, and a small model's step is thousands of short
operators. `OMP_WAIT_POLICY=PASSIVE` makes a waiting thread sleep at once: measured on the 2-core
machine (docs/cpu.md), it kept a loaded run near its fair share of the CPUs (5-14x faster than
spinning beside 4 busy processes) but doubled an idle machine's rollout time. So it is set only
when the machine is busy as the program starts (the 1-minute load average at least the number of
CPUs this process may use), and never over a value the user set (OMP_WAIT_POLICY or
GOMP_SPINCOUNT). libgomp reads the variables once, when torch loads: this runs before that.
"""

from __future__ import annotations

import os


def sleep_when_waiting() -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE when the machine is busy and the user set no wait policy (see
    the module docstring); returns why it was set, for the log, or None."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load < cpus:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return (f"the machine is busy (load average {load:.1f} on {cpus} CPUs): OMP_WAIT_POLICY=PASSIVE, so "
            f"waiting threads sleep instead of spinning (set OMP_WAIT_POLICY=ACTIVE to keep them spinning; docs/cpu.md)")
