"""Atomic, resumable checkpoints for one process or FSDP2 under torchrun.

Layout of `run_dir/checkpoints/step_{step:08d}/`:

    hf/                  HF export: config, safetensors weights, tokenizer (AutoModelForCausalLM-loadable)
    adapter/             LoRA runs only: the adapters in PEFT format; hf/ is then the merged export
                         (see fastsd/run/adapter_checkpoint.py)
    trainer_state.pt     full (unsharded) optimizer state keyed by parameter name, scheduler state,
                         the caller's `state` dict, world size
    rng_rank{r}.pt       python `random`, numpy, torch CPU (and CUDA) RNG states of rank r
    teacher.safetensors  full teacher weights (only when a teacher was given)
    COMPLETE             written last

Atomic-write scheme: see `fastsd.run.checkpoint_files`.

Under torch.distributed every rank calls `save_checkpoint`/`load_checkpoint` (the state-dict
gathers and broadcasts are collectives); rank 0 writes and reads the shared files, each rank its
own RNG file. A shared filesystem is assumed. An error on any rank is raised on every rank.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..model.dist import spans_processes
from ..model.load import no_progress_bars
from ..model.lora import is_lora
from .adapter_checkpoint import ADAPTER, gather_adapters, load_adapters, write_adapters
from .checkpoint_files import COMPLETE, complete, fsync, is_complete, make_tmp, prune, seal

__all__ = ["COMPLETE", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_resume", "rng_state"]

log = logging.getLogger("fastsd")

CHECKPOINTS = "checkpoints"
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only


# ---------------------------------------------------------------- process-group helpers

def _rank() -> int:
    return dist.get_rank() if spans_processes() else 0


def _agree(error: BaseException | None, what: str) -> None:
    """Collective (also a barrier): raise on every rank if any rank failed."""
    if spans_processes():
        msgs: list = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    else:
        msgs = [None]
    if error is not None:
        raise error
    for r, msg in enumerate(msgs):
        if msg is not None:
            raise RuntimeError(f"{what} failed on rank {r}: {msg}")


def _on_rank0(fn, what: str):
    """Run `fn` on rank 0 only; raise its error on every rank, else return its result on every rank."""
    error = result = None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    _agree(error, what)
    if not spans_processes():
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- state pieces

def _alias_groups(module: nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied embeddings), first name first."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _tie(sd: dict, module: nn.Module) -> dict:
    """Point every alias at one tensor. Hazard: gathered FSDP2 state dicts hold tied weights as
    separate copies, which transformers' save (it detects ties by storage) would write twice."""
    for names in _alias_groups(module):
        present = [n for n in names if n in sd]
        for n in names if present else ():
            sd[n] = sd[present[0]]
    return sd


def _untie(sd: dict, module: nn.Module) -> dict:
    """Keep one name per tied parameter (safetensors refuses shared storage)."""
    for names in _alias_groups(module):
        for n in names[1:]:
            sd.pop(n, None)
    return {k: v.contiguous() for k, v in sd.items()}


def rng_state() -> dict:
    """This rank's random state: what a checkpoint saves to go on with the same draws."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name (rank 0; {} elsewhere).

    Hazard: `get_optimizer_state_dict` initialises an optimizer that has never stepped by taking a
    zero-lr step (AdamW's step count becomes 1), so such an optimizer is saved by its hyper-parameters.
    """
    if not optimizer.state:
        return {"state": {}, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                              for g in optimizer.param_groups]}
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def _check_loadable(path: Path) -> None:
    """`load_checkpoint` reads with weights_only=True: find unloadable `state` entries now, not at resume."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"state: holds objects a weights_only load refuses (use plain Python "
                         f"containers, numbers, strings and tensors): {e}") from e


def _write_shared(tmp: Path, model, tokenizer, model_sd: dict, trainer: dict, teacher, teacher_sd) -> None:
    """Rank 0's files: the HF export (LoRA: the adapters and the merged export), trainer_state.pt,
    teacher.safetensors."""
    if is_lora(model):
        write_adapters(tmp, model, tokenizer, model_sd)
    else:
        with no_progress_bars():
            model.save_pretrained(tmp / "hf", state_dict=_tie(model_sd, model))
        tokenizer.save_pretrained(tmp / "hf")
    torch.save(trainer, tmp / "trainer_state.pt")
    _check_loadable(tmp / "trainer_state.pt")
    if teacher_sd is not None:
        save_file(_untie(teacher_sd, teacher), tmp / "teacher.safetensors")


# ---------------------------------------------------------------- public API

def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model, tokenizer, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, teacher: nn.Module | None = None, keep: int,
                    rng: dict | None = None) -> Path:
    """Write checkpoint `step` of `model` (a transformers PreTrainedModel or a peft model of one,
    FSDP2-sharded or not) and return its final path; then keep only the last `keep` complete
    checkpoints. `rng`: the random state to save (`rng_state()` taken earlier), else the current one.
    A `teacher` that is `model` itself (LoRA: its teacher adapter lives in the model)
    adds nothing. See the module docstring for the layout and the atomic-write scheme. Every rank
    must call it."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    rank, world = _rank(), dist.get_world_size() if spans_processes() else 1
    rng = rng_state() if rng is None else rng
    stepped = bool(optimizer.state)
    teacher = None if teacher is model else teacher
    # collective; LoRA: only the adapters (the base is model.path, frozen)
    model_sd = gather_adapters(model) if is_lora(model) else get_model_state_dict(model, options=_GATHER)
    optim_sd = _optimizer_state(model, optimizer)  # collective
    teacher_sd = None if teacher is None else get_model_state_dict(teacher, options=_GATHER)
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = Path(_on_rank0(lambda: make_tmp(final), f"creating a checkpoint directory in {root}"))
    try:
        error = None
        try:
            if rank == 0:
                trainer = {"optimizer": optim_sd, "optimizer_stepped": stepped, "state": state, "step": step,
                           "scheduler": None if scheduler is None else scheduler.state_dict(), "world_size": world}
                _write_shared(tmp, model, tokenizer, model_sd, trainer, teacher, teacher_sd)
            torch.save(rng, tmp / f"rng_rank{rank}.pt")
            fsync(tmp / f"rng_rank{rank}.pt")
        except Exception as e:
            error = e
        _agree(error, f"writing checkpoint {final}")  # also a barrier: every rank's files are in tmp now
        _on_rank0(lambda: seal(tmp, final, step, world), f"publishing checkpoint {final}")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _on_rank0(lambda: prune(root, keep, final), "checkpoint.keep")  # no rank moves on before this
    return final


def _load_full(module: nn.Module, read, source: Path) -> None:
    """Load the full state dict `read()` returns on rank 0 (every rank when not distributed) into
    `module`; rank 0 reads and checks it inside `_on_rank0` so a failure there cannot hang the others."""
    full: dict = {}

    def read_and_check() -> None:
        full.update(_tie(read(), module))
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - full.keys()), sorted(full.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"path: {source} does not fit the model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    _on_rank0(read_and_check, f"loading {source}")
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True,
                                                                broadcast_from_rank0=spans_processes()))


def _read_hf_weights(hf: Path) -> dict:
    files = sorted(hf.glob("*.safetensors"))
    if not files:
        raise ValueError(f"path: {hf} holds no .safetensors weights")
    full = {}
    for f in files:
        full.update(load_file(f))
    return full


def load_checkpoint(path: str | os.PathLike, *, model, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, teacher: nn.Module | None = None) -> dict:
    """Restore model weights (and optimizer, scheduler, teacher, this rank's RNG) from the complete
    checkpoint `path`; return the caller's `state` dict saved with it. Every rank must call it."""
    path = Path(path)
    if not is_complete(path):
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {COMPLETE})"
        raise ValueError(f"path: {path} {what}")
    teacher = None if teacher is model else teacher
    if is_lora(model) != (path / ADAPTER).is_dir():
        how = ("with LoRA (it holds adapter/)", "without") if not is_lora(model) else ("without LoRA (no adapter/)", "with")
        raise ValueError(f"path: {path} was saved {how[0]}; this run is configured {how[1]} LoRA: "
                         "set model.lora as in the run that saved it")
    if teacher is not None and not (path / "teacher.safetensors").is_file():
        raise ValueError(f"path: {path} holds no teacher.safetensors (saved without a teacher)")
    rank0 = _rank() == 0
    # mmap: ranks > 0 need only the small entries, not the optimizer tensors
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
    if is_lora(model):
        load_adapters(path, model, _on_rank0)
    else:
        _load_full(model, lambda: _read_hf_weights(path / "hf"), path / "hf")
    if teacher is not None:
        _load_full(teacher, lambda: load_file(path / "teacher.safetensors"), path / "teacher.safetensors")
    if optimizer is not None:
        saved = trainer["optimizer"]
        if len(saved["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(f"path: {path} holds {len(saved['param_groups'])} optimizer param groups, "
                             f"the optimizer has {len(optimizer.param_groups)}")
        if trainer["optimizer_stepped"]:
            set_optimizer_state_dict(model, optimizer, saved if rank0 else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=spans_processes()))
        # Hyper-parameters as saved (also for an optimizer saved before its first step);
        # set_optimizer_state_dict alone turns tuples such as AdamW's betas into lists.
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("checkpoint: %s missing (saved with %s ranks); RNG not restored", rng_file, trainer["world_size"])
    return trainer["state"]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `run_dir/checkpoints`, or None."""
    found = complete(Path(run_dir) / CHECKPOINTS)
    return found[-1][1] if found else None


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """`resume`: "auto" (latest complete checkpoint in `run_dir`, or None), "never" (None), or the
    path of a complete checkpoint."""
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume == "never":
        return None
    path = Path(resume)
    if not is_complete(path):
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {COMPLETE})"
        raise ValueError(f"resume: {resume!r} {what}; expected auto, never or a checkpoint directory")
    return path
