"""LoRA checkpoint pieces (used by `fastsd.run.checkpoint` when the model is a peft model).

In a LoRA run's checkpoint directory:

    adapter/             PEFT format of the trained adapter "default" (adapter_config.json,
                         adapter_model.safetensors, tokenizer): `PeftModel.from_pretrained(base, adapter/)`
    adapter/ema/         the same for a teacher adapter held beside it (ema; initial from model.lora.path)
    hf/                  the adapter merged into the base weights (peft's merge_and_unload), with the
                         tokenizer: `AutoModelForCausalLM.from_pretrained(hf/)`, as in a full run

Resume reads `adapter/` only (bitwise: the fp32 adapter weights as trained); `hf/` is the export.
The merged export loads the base again from the adapter's `base_model_name_or_path` (model.path):
on rank 0, for the time of the save, one more copy of the base model in CPU memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..model.dist import spans_processes
from ..model.load import no_progress_bars
from ..model.lora import adapter_params

__all__ = ["ADAPTER", "gather_adapters", "write_adapters", "load_adapters"]

ADAPTER = "adapter"
_WEIGHTS = "adapter_model.safetensors"


def _dir(root: Path, name: str) -> Path:
    """peft's layout: the adapter "default" at the top, any other in a subfolder of its name."""
    return root if name == "default" else root / name


def gather_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's weights, full and on the CPU, keyed by parameter name. Collective under
    FSDP2 (every rank gathers the same parameters in the same order); all ranks get them."""
    out = {}
    for params in adapter_params(model).values():
        for name, p in params.items():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().to("cpu", copy=True)
    return out


def write_adapters(root: Path, model: nn.Module, tokenizer, weights: dict[str, torch.Tensor]) -> None:
    """`root/adapter` in PEFT format (every adapter) and `root/hf`, the merged export (rank 0)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = root / ADAPTER
    with no_progress_bars():
        model.save_pretrained(str(adapter_dir), state_dict=weights)
        tokenizer.save_pretrained(adapter_dir)
        base_path = model.peft_config["default"].base_model_name_or_path
        dtype = next(p for n, p in model.named_parameters() if not p.requires_grad and ".lora_" not in n).dtype
        # peft initialises the new LoRA layers (then overwritten) from torch's generator: forked, so
        # that saving draws nothing and the checkpoint schedule never changes a run's numbers.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, local_files_only=True)
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")


def _read(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's adapters under their parameter names in `model`; checked against it."""
    from peft import get_peft_model_state_dict

    full = {}
    for name, params in adapter_params(model).items():
        file = _dir(path / ADAPTER, name) / _WEIGHTS
        if not file.is_file():
            raise ValueError(f"path: {path} holds no adapter {name!r} ({file} is missing; "
                             f"was it saved with another teacher.kind?)")
        saved = load_file(file)
        # peft's own key rule (the adapter name dropped), by mapping each parameter's index through it
        index = {k: torch.tensor(i) for i, k in enumerate(params)}
        names = list(params)
        by_key = {k: names[int(v)] for k, v in get_peft_model_state_dict(model, state_dict=index, adapter_name=name).items()}
        missing, unexpected = sorted(by_key.keys() - saved.keys()), sorted(saved.keys() - by_key.keys())
        if missing or unexpected:
            raise ValueError(f"path: {file} does not fit the model's adapter {name!r} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for key, tensor in saved.items():
            p = params[by_key[key]]
            if tuple(tensor.shape) != tuple(p.shape):
                raise ValueError(f"path: {file}: {key} has shape {list(tensor.shape)}, the model's {list(p.shape)} "
                                 f"(another model.lora.r?)")
            full[by_key[key]] = tensor
    return full


def load_adapters(path: Path, model: nn.Module, on_rank0) -> None:
    """Load every adapter of `model` from checkpoint `path` (rank 0 reads; broadcast under FSDP2).
    `on_rank0(fn, what)`: checkpoint's runner that raises a rank-0 failure on every rank."""
    full: dict = {}
    on_rank0(lambda: full.update(_read(path, model)), f"loading {path / ADAPTER}")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False,
                                                               broadcast_from_rank0=spans_processes()))
