"""fastsd-train sets OMP_WAIT_POLICY=PASSIVE before torch loads (libgomp reads it once, then) when
the machine is busy, keeps a value the user set, and leaves an idle machine's default alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Fakes the load average, records the variable at the moment torch is first imported, then imports
# the program's module.
PROBE = """
import importlib.abc, os, sys
os.getloadavg = lambda: ({load}, 0.0, 0.0)
seen = []
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
        return None
sys.meta_path.insert(0, Probe())
import fastsd.cli
assert "torch" in sys.modules, "fastsd.cli no longer loads torch: the probe proves nothing"
print(seen[0])
"""


@pytest.mark.parametrize("load, user, want", [
    (999.0, None, "PASSIVE"),  # busy: waiting threads sleep
    (0.0, None, "<unset>"),  # idle: OpenMP's default (spin, then sleep) is the faster there
    (999.0, "ACTIVE", "ACTIVE"),  # the user's choice is kept
    (999.0, "spincount", "<unset>"),  # so is a GOMP_SPINCOUNT
])
def test_the_wait_policy_is_set_before_torch_loads_on_a_busy_machine(load, user, want):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if user == "spincount":
        env["GOMP_SPINCOUNT"] = "10000"
    elif user:
        env["OMP_WAIT_POLICY"] = user
    out = subprocess.run([sys.executable, "-c", PROBE.format(load=load)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [want]


def test_importing_fastsd_does_not_load_torch_until_the_api_is_used():
    code = ("import sys, fastsd; assert 'torch' not in sys.modules; f = fastsd.fused_linear_divergence; "
            "assert 'torch' in sys.modules and callable(f); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
