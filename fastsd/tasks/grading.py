"""Is a final answer right? One grader serves the reward, avg@k / pass@k / maj@k and the critic's
final-answer check (config key `grader`).

- `exact`: the answer equals the ground truth after stripping surrounding whitespace (the
  built-in arithmetic task's rule).
- `math`: Hugging Face's math-verify decides: it parses LaTeX and plain numbers (`\\frac{3}{4}`,
  `\\dfrac34`, `0.75`, `3/4`, `75\\%`, `\\boxed{...}`, intervals, sets, text units) to SymPy and
  compares them; `verify(gold=truth, target=answer)`.

`Grader.equal(answer, truth)` never raises, is thread-safe, and takes bounded time. math-verify
bounds its own time with SIGALRM, which works only in a process's main thread; so the math grader
runs it in a worker process of its own (`_math_worker.py`, started on first use, one per grader,
where math-verify runs in the main thread with its 1-second timeouts), and waits at most
`timeout` seconds (default 10) for each reply. A late reply kills the worker (the next call starts
a fresh one) and the answer counts as wrong, as does one math-verify cannot parse. An answer equal
to the truth as a string is right without asking. Results are cached by (answer, truth): the same
answers recur across samples, evaluations and critiques. POSIX only (select on pipes).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

__all__ = ["Grader", "ExactGrader", "MathGrader", "make_grader", "GRADERS"]

GRADERS = ("exact", "math")
_WORKER = Path(__file__).with_name("_math_worker.py")
log = logging.getLogger("fastsd")


class Grader:
    """Decides whether a final answer equals the ground truth; see the module docstring."""

    kind = "?"

    def equal(self, answer: str | None, truth: str) -> bool:
        raise NotImplementedError


class ExactGrader(Grader):
    """`answer.strip() == str(truth).strip()`; None is never right."""

    kind = "exact"

    def equal(self, answer: str | None, truth: str) -> bool:
        return isinstance(answer, str) and answer.strip() == str(truth).strip()


class MathGrader(Grader):
    """math-verify in a worker process, `timeout` seconds per answer, cached (module docstring)."""

    kind = "math"
    CACHE_SIZE = 200_000

    def __init__(self, timeout: float = 10.0, start_timeout: float = 120.0):
        self.timeout = timeout
        self.start_timeout = start_timeout  # python start-up plus importing sympy, on a busy machine
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._proc: subprocess.Popen | None = None
        self._stderr = None  # the worker's stderr, a temporary file (read when it fails to start)
        self.stats = {"calls": 0, "cached": 0, "timeouts": 0, "starts": 0}
        atexit.register(self.close)

    def equal(self, answer: str | None, truth: str) -> bool:
        if not isinstance(answer, str) or not answer.strip():
            return False
        a, t = answer.strip(), str(truth).strip()
        if a == t:  # what math-verify would say, without asking it
            return True
        with self._lock:
            self.stats["calls"] += 1
            hit = self._cache.get((a, t))
            if hit is not None:
                self.stats["cached"] += 1
                self._cache.move_to_end((a, t))
                return hit
            ok = self._ask(a, t)
            self._cache[(a, t)] = ok
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
            return ok

    def _ask(self, answer: str, truth: str) -> bool:
        """One request to the worker (lock held); False on a late reply or a dead worker."""
        try:
            if self._proc is None:
                self._start()
            line = json.dumps({"a": answer, "t": truth}) + "\n"
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
            reply = self._readline(self.timeout)
        except (OSError, ValueError):
            reply = None
        if reply is None:  # late, crashed or unreadable: the next call gets a fresh worker
            self.stats["timeouts"] += 1
            log.warning("grader=math: no verdict within %.0f s on %.80r against %.80r; counted as wrong",
                        self.timeout, answer, truth)
            self._kill()
            return False
        return reply.get("ok") is True

    def check(self) -> None:
        """Start the worker and grade one known pair; ValueError naming `grader` if that fails
        (math-verify missing or broken), so a run does not find every answer wrong."""
        with self._lock:
            try:
                if self._proc is None:
                    self._start()
            except (OSError, ValueError) as e:
                raise ValueError(f"grader: math-verify does not work here: {e}") from None
            if not self._ask("1/2", "0.5"):
                raise ValueError("grader: math-verify does not grade 1/2 = 0.5 here; is math-verify installed?")

    def _start(self) -> None:
        self.stats["starts"] += 1
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, str(_WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr)
        if self._readline(self.start_timeout) != {"ready": True}:
            self._stderr.seek(0)
            said = self._stderr.read().decode(errors="replace").strip().splitlines()
            self._kill()
            raise OSError(f"the worker ({_WORKER.name}) did not start" + (f": {said[-1]}" if said else ""))

    def _readline(self, timeout: float) -> dict | None:
        """The worker's next reply, or None when it has none within `timeout` seconds."""
        out = self._proc.stdout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([out], [], [], left)
            if ready:
                raw = out.readline()
                if not raw:  # the worker died
                    return None
                return json.loads(raw)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout, self._stderr):
                try:
                    f.close()
                except OSError:
                    pass
            self._stderr = None

    def close(self) -> None:
        """Stop the worker (it also exits by itself when this process ends)."""
        with self._lock:
            self._kill()


_SHARED: dict[str, Grader] = {}
_SHARED_LOCK = threading.Lock()


def make_grader(kind: str) -> Grader:
    """The grader named by config key `grader` ("exact" or "math"); one shared instance per kind
    per process, so its worker and cache serve every caller. The math grader is checked on a known
    pair when first made. ValueError naming the key otherwise."""
    if kind not in GRADERS:
        raise ValueError(f"grader: expected one of {GRADERS}, got {kind!r}")
    if kind == "math" and importlib.util.find_spec("math_verify") is None:
        raise ValueError("grader: math needs the math-verify package (pip install math-verify)")
    with _SHARED_LOCK:
        if kind not in _SHARED:
            grader = ExactGrader() if kind == "exact" else MathGrader()
            if kind == "math":
                grader.check()
            _SHARED[kind] = grader
        return _SHARED[kind]
