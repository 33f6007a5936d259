"""What grader=math costs per answer: worker start, uncached and cached calls, a pathological answer.

    python tools/grading_cost.py [--answers 600]

Answers are spellings, half right and half wrong, of LaTeX ground truths of the kinds
OpenMathReasoning has (fractions, decimals, radicals, percentages, intervals, sets, negative
numbers, polynomials, units), with fresh numbers per pair so that nothing is cached.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from fastsd.tasks.grading import MathGrader


def kinds(rng: random.Random, right: bool) -> tuple[str, str]:
    """One (answer, truth) pair of a random kind, with fresh numbers (so nothing is cached)."""
    a, b, c = rng.randint(1, 999), rng.randint(2, 99), rng.randint(2, 50)
    d = 0 if right else rng.choice([1, -1, 2])
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice([f"{(a + d) / b}", f"{a + d}/{b}", rf"\dfrac{{{a + d}}}{{{b}}}"]), rf"\frac{{{a}}}{{{b}}}"
    if kind == 1:
        return rf"{c + d}\sqrt{{2}}", rf"\sqrt{{{2 * c * c}}}"
    if kind == 2:
        return rng.choice([f"{(a + d) / 100}", rf"{a + d}\%"]), rf"{a}\%"
    if kind == 3:
        return rf"\left({a + d}, {a + b}\right]", f"({a}, {a + b}]"
    if kind == 4:
        return rf"\{{{a + b}, {a + d}\}}", rf"\{{{a}, {a + b}\}}"
    if kind == 5:
        return rng.choice([f"-{a + d}.0", f"-{a + d}"]), f"-{a}"
    if kind == 6:
        return f"(x+{c + d})^2", f"x^2 + {2 * c}x + {c * c}"
    return rf"{a + d} \text{{ cm}}", f"{a}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=600, help="uncached answers to time")
    args = ap.parse_args()
    rng = random.Random(0)
    labels = [rng.random() < 0.5 for _ in range(args.answers)]
    pairs = [kinds(rng, right) for right in labels]
    g = MathGrader()
    t = time.perf_counter()
    g.equal("1", "1.0")
    start = time.perf_counter() - t
    cold, agree = [], 0
    for (a, truth), right in zip(pairs, labels):
        t = time.perf_counter()
        agree += g.equal(a, truth) == right
        cold.append(time.perf_counter() - t)
    t = time.perf_counter()
    for a, truth in pairs:
        g.equal(a, truth)
    warm = (time.perf_counter() - t) / len(pairs)
    t = time.perf_counter()
    g.equal(r"10^{10^{10}}", "10")
    patho = time.perf_counter() - t
    g.close()
    ms = [c * 1e3 for c in cold]
    q = statistics.quantiles(ms, n=100)
    print(f"worker start {start:.2f} s; {len(ms)} uncached answers: mean {statistics.mean(ms):.1f} ms, "
          f"median {q[49]:.1f} ms, p99 {q[98]:.1f} ms, max {max(ms):.1f} ms; cached {warm * 1e6:.1f} us; "
          f"pathological 10^{{10^{{10}}}}: {patho:.2f} s (wrong); worker timeouts {g.stats['timeouts']}; "
          f"{agree}/{len(pairs)} graded as intended")


if __name__ == "__main__":
    main()
