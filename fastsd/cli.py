"""`fastsd-train`: on-policy self-distillation (or GRPO) from a critic's feedback.

    fastsd-train                                   # built-in task and tiny model, on a CPU
    fastsd-train --config run.yaml optim.lr=1e-4   # YAML file plus dotted overrides
    fastsd-train condition=grpo --dry-run          # every key with its meaning, resolved; exit
    fastsd-train steps=2 eval=off run_dir=runs/smoke   # a smoke run: no evaluation
    torchrun --nproc_per_node 2 -m fastsd.cli ...  # the same job on 2 processes (FSDP2)

Data, templates and the critic are checked before the model loads. Ctrl-C stops the run (exit
code 130) and says where the last checkpoint is; the same command resumes from it. With the
default checkpoint.every=0 only the last step saves one: set checkpoint.every=N to resume mid-run.
SIGTERM and SIGHUP (a scheduler, a closed terminal) stop it too and save the last completed step
within checkpoint.stop_timeout seconds (exit code 143 / 129; 3 when that step could not be saved).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .run.openmp import sleep_when_waiting

_BUSY = sleep_when_waiting()  # before torch loads: OpenMP reads its wait policy once

from .config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from .model.dist import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="fastsd-train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with config keys (nested or dotted)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, each key with its meaning, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. condition=grpo optim.lr=1e-4 model=PATH")
    args = parser.parse_intermixed_args(argv)  # --dry-run may stand between overrides
    logging.basicConfig(level=logging.INFO, format="[fastsd] %(levelname)s %(message)s")
    if _BUSY and os.environ.get("RANK", "0") == "0":
        logging.getLogger("fastsd").info(_BUSY)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.exit(2, f"fastsd-train: error: {e}\n")
    if args.dry_run:
        try:
            print(dry_run(cfg), end="")
        except ValueError as e:
            parser.exit(2, f"fastsd-train: error: {e}\n")
        return 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per critic request
    try:
        _run(cfg, parser)
    except KeyboardInterrupt as e:  # Ctrl-C: the step in progress is abandoned, or was written whole
        from .run.run_dir import StoppedAfterStep, interrupted
        from .run.stop import Stopped, stopped_message

        if isinstance(e, Stopped):  # SIGTERM or SIGHUP: what was kept decides the code
            text, code = stopped_message(cfg, e)
            if os.environ.get("RANK", "0") == "0":
                print(text, file=sys.stderr, flush=True)
            return code
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal
            print(interrupted(cfg, isinstance(e, StoppedAfterStep)), file=sys.stderr, flush=True)
        return 130
    return 0


def _run(cfg, parser: argparse.ArgumentParser) -> None:
    from .model import dist
    from .run.lock import WriteFailed
    from .train import train
    from .update import NonFiniteLossError

    d = dist.setup()
    failed = True
    try:
        train(cfg, d)
        failed = False
    except ValueError as e:  # user errors found before or while loading models or data
        parser.exit(2, f"fastsd-train: error: {e}\n")
    except NonFiniteLossError as e:  # nothing of this step was applied; the last checkpoint is intact
        parser.exit(1, f"fastsd-train: error: {e}\n")
    except WriteFailed as e:  # a full disk: the message names the path and what was kept
        parser.exit(1, f"fastsd-train: error: {e}\n")
    finally:
        dist.teardown(d, failed=failed)


def dry_run(cfg) -> str:
    """What --dry-run prints: the annotated config and one rendered student and teacher prompt
    (`fastsd.config.dry_run`); ValueError naming the key if the prompts cannot be rendered."""
    import torch

    from .config.dry_run import annotated_yaml
    from .run.preflight import show_prompts

    return annotated_yaml(cfg, "cuda" if torch.cuda.is_available() else "cpu") + show_prompts(cfg)


if __name__ == "__main__":
    sys.exit(main())
