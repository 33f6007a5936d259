"""Process-group helpers: one code path for a single process and for torchrun (FSDP2)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """Sums over ranks (float64 on the reduction device); a no-op for one process."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def spans_processes() -> bool:
    """A process group of more than one process is up (a one-process group, such as the one an
    in-process vLLM engine starts, is not)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup() -> Dist:
    """Initialise the process group under torchrun (WORLD_SIZE set); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda") if cuda else torch.device("cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank=rank, world=world, device=torch.device("cuda", local) if cuda else torch.device("cpu"))


def teardown(d: Dist, *, failed: bool = False) -> None:
    """Destroy the process group; after a success, behind a barrier, so no rank tears its
    connections down while another still finishes (after a failure the others may never come)."""
    if d.enabled and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank: atexit handlers run and output is flushed, then the process exits
    without interpreter finalisation. gloo's worker threads outlive destroy_process_group and free
    finished collectives on their own time; seen under gdb: one freed the teardown barrier, which
    held the last all_gather, whose tensor was bound to a Python object, so it took the GIL while
    the interpreter finalised; CPython ends such a thread, which aborts the process ("terminate
    called without an active exception", SIGABRT, after all work is done; 1 run in 10 to 20 of a
    2-process job here; pytorch/pytorch#190489). Nothing is left to finalise: files are closed
    and checkpoints whole."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def run_main(body, argv) -> int:
    """A command's main: `body(argv)`'s exit code for one process; under torchrun (WORLD_SIZE > 1)
    the rank ends itself through `exit_rank`, also after parser.exit and --help."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return body(argv)
    try:
        code = body(argv)
    except SystemExit as e:  # parser.exit and --help: the message is out already
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    exit_rank(code)
