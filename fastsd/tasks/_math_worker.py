"""The math grader's worker process (`fastsd.tasks.grading.MathGrader`): run as a script, never imported.

It reads one JSON request per line on stdin, {"a": answer, "t": truth}, and writes one reply per
line on stdout, {"ok": true|false}, after a first line {"ready": true} once math-verify is imported.
It runs math-verify in its own main thread, where math-verify's SIGALRM timeouts work; the parent
bounds each reply's time as well and kills this process when one is late. It exits at end of input.
"""

import json
import resource
import signal
import sys

PARSE_TIMEOUT_S = 1  # math-verify's own bounds (whole seconds: signal.alarm)
VERIFY_TIMEOUT_S = 1
MEMORY_LIMIT = 4 << 30  # an answer that builds a huge number fails with MemoryError, not the machine


def _parse(text: str, parse):
    # \boxed{...} tells math-verify's LaTeX extraction where the answer is; a nested \boxed (an
    # answer written as "\boxed{3}") and bare numbers parse the same way.
    return parse("\\boxed{" + text + "}", parsing_timeout=PARSE_TIMEOUT_S)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes our input
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ValueError, OSError):
        pass
    import logging

    logging.disable(logging.WARNING)  # math-verify logs every timeout; the parent counts them as wrong
    from math_verify import parse, verify

    gold_cache: dict[str, object] = {}
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            truth = req["t"]
            if truth not in gold_cache:
                if len(gold_cache) > 10_000:
                    gold_cache.clear()
                gold_cache[truth] = _parse(truth, parse)
            gold, target = gold_cache[truth], _parse(req["a"], parse)
            ok = bool(gold) and bool(target) and verify(gold, target, timeout_seconds=VERIFY_TIMEOUT_S)
        except BaseException:  # noqa: BLE001 (MemoryError, RecursionError, math-verify's TimeoutException)
            ok = False
        out.write(json.dumps({"ok": bool(ok)}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
