"""`fastsd-select`: keep the problems a model fails (the paper's data step).

    fastsd-select --out runs/hard                       # built-in task, shipped model, k=16, passes 0-4
    fastsd-select --out runs/hard data=train.jsonl model=PATH --k 16 --max-pass 4
    fastsd-select --out runs/hard-test --split eval data.eval_size=512   # from the held-out questions
    torchrun --nproc_per_node 2 -m fastsd.select.cli --out runs/hard ...  # problems sharded by rank

Every fastsd-train key applies (model, data, templates, format, grader, rollout, critic, seed);
the k samples of a problem are drawn at rollout.temperature. A problem is kept when its pass
count p (samples whose final answer the grader accepts) satisfies min-pass <= p <= max-pass, both
ends included: the default 0..4 of 16 is the paper's "solved fewer than 5 times in 16". With
--critic-check it is kept only if the critic (condition=critique, critic.kind) also returns a
valid critique of its first failed sample. The output, OUT/selected.jsonl, holds each kept record
as read plus a "select" object (passes, k, pass_rate): `fastsd-train data=OUT/selected.jsonl`
reads it. Stopped, the same command goes on from OUT/graded.jsonl; the same seed gives the same
output, stopped or not, on any number of processes. Data, templates and lengths are checked
before the model loads, each error naming the key, file and line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..run.openmp import sleep_when_waiting

sleep_when_waiting()  # before torch loads: OpenMP reads its wait policy once

from ..config import load_config  # noqa: E402
from .run import SelectOptions, select  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from ..model.dist import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="fastsd-select", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with fastsd-train config keys (nested or dotted)")
    parser.add_argument("--out", required=True, help="output folder: select.json, graded.jsonl, selected.jsonl")
    parser.add_argument("--k", type=int, default=16, help="samples per problem (default 16)")
    parser.add_argument("--min-pass", type=int, default=0, help="keep problems solved at least this often (default 0)")
    parser.add_argument("--max-pass", type=int, default=4, help="... and at most this often, of k (default 4)")
    parser.add_argument("--split", default="train", choices=["train", "eval"],
                        help="select from data.path (train) or data.eval_path (eval)")
    parser.add_argument("--batch", type=int, default=16, help="problems sampled together, k samples each (default 16)")
    parser.add_argument("--critic-check", action="store_true",
                        help="keep only problems whose first failed sample the critic critiques validly")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="fastsd-train keys, e.g. model=PATH data=FILE")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fastsd-select] %(levelname)s %(message)s")
    opts = SelectOptions(args.out, args.k, args.min_pass, args.max_pass, args.split, args.batch, args.critic_check)
    try:
        opts.check()
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.exit(2, f"fastsd-select: error: {e}\n")
    from ..model import dist

    d = dist.setup()
    failed = True
    try:
        summary = select(cfg, opts, d)
        failed = False
    except ValueError as e:
        parser.exit(2, f"fastsd-select: error: {e}\n")
    except KeyboardInterrupt:
        if d.main:
            print(f"fastsd-select: stopped; {opts.out}/graded.jsonl keeps what was graded: the same command goes on",
                  file=sys.stderr, flush=True)
        return 130
    finally:
        dist.teardown(d, failed=failed)
    if d.main:
        print(f"selected {summary['selected']} of {summary['problems']} problems -> {opts.out}/selected.jsonl "
              f"(passes histogram 0..{opts.k}: {summary['passes_histogram']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
