"""How many of a run's rewarded rollouts reached the right answer through a wrong step?

    python tools/right_answer_wrong_steps.py runs/compare_hard/peer-seed0 runs/compare_hard/grpo-seed0

For each run folder of the built-in task: over its rollouts.jsonl, the rollouts with reward 1,
and the share of them with a wrong intermediate step (the built-in critic's first_error), in
the first 10 and the last 10 steps. With condition=peer such a rollout is a sibling's
demonstration: the grader checks the final answer only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastsd.feedback.critic import ArithCritic
from fastsd.tasks.format import parse_response


def wrong_step(critic: ArithCritic, row: dict) -> bool:
    parsed = parse_response(row["response"])
    return critic.critique(row["question"], row["truth"], parsed.steps, parsed.answer).first_error is not None


def main(argv: list[str]) -> int:
    critic = ArithCritic()
    for folder in argv:
        rows = [json.loads(line) for line in (Path(folder) / "rollouts.jsonl").read_text().splitlines()]
        last = max(r["step"] for r in rows)
        for name, steps in (("steps 1-10", range(1, 11)), (f"steps {last - 9}-{last}", range(last - 9, last + 1))):
            right = [r for r in rows if r["step"] in steps and r["reward"] == 1]
            bad = sum(wrong_step(critic, r) for r in right)
            share = f"{bad / len(right):.2f}" if right else "-"
            print(f"{folder}\t{name}\trollouts {sum(r['step'] in steps for r in rows)}\treward 1: {len(right)}"
                  f"\twith a wrong step: {bad} ({share})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
