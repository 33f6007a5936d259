"""LoRA with peft: the loaded model wrapped in a `peft.PeftModel` whose adapter "default" trains
while every base weight is frozen.

Further adapters of the same shape can be held beside it ("ema", "initial": teachers that cost
adapter-sized memory); `adapter_active` runs a block with one of them, or with none (the base
model exactly), in place of "default".
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

__all__ = ["apply_lora", "is_lora", "base_model", "adapter_params", "add_adapter_copy", "paired_adapters",
           "adapter_active", "trainable_summary"]


def is_lora(model) -> bool:
    """Whether `model` is a peft model (an FSDP2-sharded one included: fully_shard subclasses it)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_model(model):
    """The transformers model under a peft wrapper, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name, or its last dot-separated parts."""
    return name == target or name.endswith("." + target)


def _lora_config(lora):
    """The peft LoraConfig of `lora` (config.LoraConfig), from `lora.path` if set; and the config key
    its target modules come from."""
    import peft

    if not lora.path:
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.r,
                               lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                               task_type="CAUSAL_LM"), "model.lora.target_modules"
    path = Path(lora.path)
    if not (path / "adapter_config.json").is_file():
        what = "does not exist" if not path.exists() else "is not a PEFT adapter (no adapter_config.json)"
        raise ValueError(f"model.lora.path: {path} {what}")
    conf = peft.PeftConfig.from_pretrained(str(path))
    if not isinstance(conf, peft.LoraConfig):
        raise ValueError(f"model.lora.path: {path} holds a {conf.peft_type} adapter, not LoRA")
    conf.inference_mode = False  # it trains on
    return conf, "model.lora.path"


def apply_lora(lm: PreTrainedModel, lora) -> nn.Module:
    """Wrap `lm` (in place) in a peft model with the LoRA adapter "default" of `lora`
    (config.LoraConfig): fresh, or loaded from `lora.path`. Only the adapter trains; the output head
    and the input embeddings stay the base's."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import load_peft_weights

    conf, key = _lora_config(lora)
    names = [n for n, _ in lm.named_modules() if n]
    targets = conf.target_modules if isinstance(conf.target_modules, (list, set, tuple)) else []
    unmatched = sorted(t for t in targets if not any(_matches(n, t) for n in names))
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"{key}: {unmatched} match no module of {type(lm).__name__} "
                         f"(its Linear layers are named {linear})")
    try:
        model = peft.get_peft_model(lm, conf)
    except ValueError as e:  # e.g. a regex that matches nothing
        raise ValueError(f"{key}: {e}") from None
    for what, module in (("lm_head", lm.get_output_embeddings()), ("input embeddings", lm.get_input_embeddings())):
        if isinstance(module, BaseTunerLayer):
            raise ValueError(f"{key}: adapts the {what}; the fused loss reads the base head weight, "
                             "so the head and the (often tied) embeddings must stay the base's")
    if lora.path:
        path = Path(lora.path)
        base = conf.base_model_name_or_path
        try:
            result = peft.set_peft_model_state_dict(model, load_peft_weights(str(path), device="cpu"))
        except RuntimeError as e:  # size mismatch: an adapter of another model
            raise ValueError(f"model.lora.path: the adapter in {path} (trained on {base}) does not fit "
                             f"model.path: {str(e).strip().splitlines()[-1].strip()}") from None
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"model.lora.path: the adapter in {path} (trained on {base}) does not fit model.path "
                             f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    return model


def adapter_params(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """Adapter name -> {parameter name in `model`: parameter}, over every tuner layer of `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, dict[str, nn.Parameter]] = {name: {} for name in model.peft_config}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        for layer_name in mod.adapter_layer_names:
            for adapter, sub in getattr(mod, layer_name).items():
                items = sub.named_parameters() if isinstance(sub, nn.Module) else [("", sub)]
                for pn, p in items:
                    out.setdefault(adapter, {})[f"{mod_name}.{layer_name}.{adapter}" + (f".{pn}" if pn else "")] = p
    return out


def add_adapter_copy(model: nn.Module, name: str) -> None:
    """A frozen second adapter `name` holding a copy of "default" (adapter-sized memory)."""
    model.add_adapter(name, model.peft_config["default"])
    with torch.no_grad():
        for p, src in paired_adapters(model, name, "default"):
            p.copy_(src)
            p.requires_grad_(False)


def paired_adapters(model: nn.Module, a: str, b: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(parameter of adapter `a`, the same slot's parameter of adapter `b`) over the whole model."""
    params = adapter_params(model)
    pairs = list(zip(params[a].items(), params[b].items(), strict=True))
    assert all(na.replace(f".{a}", f".{b}") == nb and pa.shape == pb.shape for (na, pa), (nb, pb) in pairs)
    return [(pa, pb) for (_, pa), (_, pb) in pairs]


@contextlib.contextmanager
def adapter_active(model: nn.Module, name: str | None):
    """Run the block with adapter `name` in place of "default"; None: with every adapter off, which
    is the base model exactly (peft's disabled LoRA layers call the base layer alone). The adapters'
    requires_grad flags are as before afterwards ("default" trains, the others are frozen)."""
    if name is None:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter("default")


def trainable_summary(model: nn.Module) -> str:
    """How many parameters train, of how many: the model and its trained adapter, tied weights
    counted once; the frozen teacher adapters held beside it (ema, initial) count in neither,
    as peft counts one adapter."""
    teachers = ({id(p) for name, ps in adapter_params(model).items() if name != "default" for p in ps.values()}
                if is_lora(model) else set())
    params = [p for p in model.parameters() if id(p) not in teachers]
    train = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return f"{train:,} of {total:,} parameters train ({100 * train / max(total, 1):.2f}%)"
