"""Test set-up: without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
OpenMP's wait policy is set as fastsd-train sets it (fastsd.run.openmp: passive on a busy
machine), before torch loads.
"""

import os

from fastsd.run.openmp import sleep_when_waiting

sleep_when_waiting()

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import DEVICE  # noqa: E402


def pytest_configure(config):
    """`pytest -m vllm` asks for the vLLM tests: there an unusable vLLM fails the run instead of
    skipping every test it would have run."""
    if config.option.markexpr.strip() == "vllm":
        from fastsd.rollout.vllm_engine import unusable

        if unusable() is not None:
            raise pytest.UsageError(f"-m vllm: the vLLM tests were asked for, but vLLM is not usable here: {unusable()}")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """A tiny random Qwen3 chat checkpoint with a locally trained BPE tokenizer (tests/standin.py)."""
    from standin import build_standin

    return build_standin(tmp_path_factory.mktemp("standin"))


@pytest.fixture(scope="session")
def math_data(tmp_path_factory):
    """(train.jsonl, test.jsonl) of LaTeX-answer questions (tests/standin.py)."""
    from standin import write_math_data

    return write_math_data(tmp_path_factory.mktemp("math-data"))


# Every FSDP2 parity case of the suite (tests/fsdp_train_worker.py): one process and two under
# torchrun each run all of them in one start, instead of one start per case.
FSDP_PARITY = {
    "critique": ["condition=critique"],
    "grpo": ["condition=grpo"],
    "uneven-critique": ["rollouts=7", "condition=critique"],  # rank 1 has 3 rollouts to rank 0's 4
    "peer": ["condition=peer", "peer.fallback=reference", "peer.feedback=critique"],
    "blend": ["condition=critique", "loss.pg_weight=0.5", "rollout.group_size=2"],
    "lora-ema": ["condition=critique", "model.lora.r=8", "teacher=ema"],  # tests/model/test_lora.py
}


@pytest.fixture(scope="session")
def fsdp_parity(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Case name -> (one process's results, two processes' results), as fsdp_train_worker.py saves them."""
    from runs import fsdp_worker

    folder = tmp_path_factory.mktemp("fsdp-parity")
    one, two = (fsdp_worker(folder, nproc, FSDP_PARITY) for nproc in (1, 2))
    return {name: (one[name], two[name]) for name in FSDP_PARITY}
