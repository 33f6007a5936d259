"""A checkpoint read back before a resume: which of its files is damaged, and the checkpoint to
resume from (`resume=auto` falls back past damaged ones; an explicit path stops).

A COMPLETE marker says the write finished; a file damaged since (a truncated copy, a deleted
file, a disk error) is found here by reading every safetensors header (which must cover the
file) and loading trainer_state.pt and the RNG files as a resume does, before the model loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import TrainConfig
from . import checkpoint as ckpt
from .checkpoint_files import complete

__all__ = ["DAMAGED", "damage", "pick_resume"]

log = logging.getLogger("fastsd")

DAMAGED = ".damaged"  # suffix a damaged checkpoint is moved aside with (never deleted)


def damage(path: Path) -> str | None:
    """Why the complete checkpoint `path` cannot be resumed from, naming the file; None if it can."""
    state = path / "trainer_state.pt"
    weights = sorted(path.rglob("*.safetensors"))
    if not (path / "adapter").is_dir() and not any(p.parent == path / "hf" for p in weights):
        return f"{path / 'hf'}: no .safetensors weights"
    if not state.is_file():
        return f"{state}: missing"
    for file in weights:
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except Exception as e:
            return f"{file}: {e}"
    for file in (state, *sorted(path.glob("rng_rank*.pt"))):
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            return f"{file}: {type(e).__name__}: {e}"
    return None


def pick_resume(cfg: TrainConfig) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from (`resume`: auto, never or a path) and the damaged complete
    checkpoints newer than it, each with why. resume=auto: the newest that loads (a warning for
    each damaged one); an explicit path that does not load, or only damaged checkpoints: ValueError."""
    chosen = ckpt.resolve_resume(cfg.resume, cfg.run_dir)
    if chosen is None:
        return None, []
    if cfg.resume != "auto":
        why = damage(chosen)
        if why is not None:
            raise ValueError(f"resume: {chosen} cannot be resumed from, a file is damaged: {why}")
        return chosen, []
    damaged = []
    for _, path in reversed(complete(Path(cfg.run_dir) / ckpt.CHECKPOINTS)):
        why = damage(path)
        if why is None:
            return path, damaged
        log.warning("resume=auto: checkpoint %s is damaged (%s); trying the one before it", path, why)
        damaged.append((path, why))
    raise ValueError(f"resume: auto, but every checkpoint in {cfg.run_dir} is damaged ("
                     + "; ".join(why for _, why in damaged) + "): move them out of checkpoints/ to start afresh")
