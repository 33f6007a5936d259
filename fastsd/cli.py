"""`fastsd-train`: on-policy self-distillation (or GRPO) from a critic's feedback.

    fastsd-train                                   # built-in task and tiny model, on a CPU
    fastsd-train --config run.yaml optim.lr=1e-4   # YAML file plus dotted overrides
    fastsd-train condition=reference --dry-run     # print the resolved config and exit
    torchrun --nproc_per_node 2 -m fastsd.cli ...  # the same job on 2 processes (FSDP2)
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsd-train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with config keys (nested or dotted)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. condition=grpo optim.lr=1e-4 model=PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fastsd] %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.exit(2, f"fastsd-train: error: {e}\n")
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per critic request
    from . import dist
    from .step import NonFiniteLossError
    from .train import train

    d = dist.setup()
    failed = True
    try:
        train(cfg, d)
        failed = False
    except ValueError as e:  # user errors found while loading models or data
        parser.exit(2, f"fastsd-train: error: {e}\n")
    except NonFiniteLossError as e:  # nothing of this step was applied; the last checkpoint is intact
        parser.exit(1, f"fastsd-train: error: {e}\n")
    finally:
        dist.teardown(d, failed=failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
