"""Test set-up: without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import DEVICE  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE
