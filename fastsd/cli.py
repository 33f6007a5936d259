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


def show_prompts(cfg) -> str:
    """What the student and the teacher read before the response, for the first training question
    (--dry-run). Loads the tokenizer and the data, not the model; ValueError naming the key."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from .build import load_data
    from .conditions import example_prompts
    from .model import DEFAULT_MODEL_DIR

    path = Path(DEFAULT_MODEL_DIR if cfg.model.path == "builtin" else cfg.model.path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path: {path} {'does not exist' if not path.exists() else 'is not a checkpoint (no config.json)'}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path: cannot load the tokenizer of {path} ({e})") from None
    example = load_data(cfg)[0][0]
    prompts = example_prompts(cfg, tok, example)

    def lines(text: str) -> list[str]:  # every newline shown as \n, so the prompt's end is exact
        return [f"#   {line}" for line in text.replace("\n", "\\n\n").rstrip("\n").split("\n")]

    out = ["", "# The student's prompt for the first training question (the response follows it):",
           *lines(prompts["student"])]
    if prompts["teacher"] is None:
        out.append(f"# condition={cfg.condition}: no teacher")
    else:
        out += ["# The teacher's prompt (the student's response tokens follow it unchanged):",
                *lines(prompts["teacher"])]
    return "\n".join(out) + "\n"


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
        try:
            print(show_prompts(cfg), end="")
        except ValueError as e:
            parser.exit(2, f"fastsd-train: error: {e}\n")
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
