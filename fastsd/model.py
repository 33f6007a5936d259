r"""The built-in tiny model (a character-level tokenizer, a tiny Llama config), loading, and LoRA.

The shipped checkpoint (`DEFAULT_MODEL_DIR`) is made by `tools/make_tiny_model.py`: a ~0.49M
parameter Llama warm-started on the arithmetic task's train split so that it knows the response
format, still makes step errors, and has learned to follow a critique or a reference in context.

LoRA (`apply_lora`, with peft): the loaded model is wrapped in a `peft.PeftModel` whose adapter
"default" trains while every base weight is frozen. Further adapters of the same shape can be held
beside it ("ema", "initial": teachers that cost adapter-sized memory); `adapter_active` runs a block
with one of them, or with none (the base model exactly), in place of "default".

Tokenizer: one token per character. Every printable ASCII character and "\n" is a token; any
other character is `<unk>`. Specials: `<pad>`, `<eos>`, `<unk>`. Calling the tokenizer adds
**no** BOS/EOS: callers append `eos_token_id` to a response themselves.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHARS", "DEFAULT_MODEL_DIR", "build_tokenizer", "tiny_config", "checkpoint_dir",
           "load_model_and_tokenizer",
           "no_progress_bars", "apply_lora", "is_lora", "adapter_params", "add_adapter_copy", "paired_adapters", "adapter_active",
           "trainable_summary"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # "\n" then printable ASCII, ids 3..98
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-arith"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (see the module docstring); round-trips through save/load."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token; no normaliser, so nothing is stripped.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join tokens with no separator
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    assert all(len(tok(c)["input_ids"]) == 1 for c in CHARS), "tokenizer is not one id per char"
    return tok


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A tiny Llama config (~0.49M parameters at a 99-token vocabulary); `overrides` set any field.

    Llama, not Qwen2: for a `qwen2` checkpoint `AutoTokenizer` always builds `Qwen2Tokenizer`,
    whose byte-level pre-tokenizer replaces ours (and drops newlines); for `llama` it loads ours.
    """
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # not hidden/heads = 24: vLLM's CPU attention takes head dims 32, 64, ...
        intermediate_size=288,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a Path if it holds a checkpoint's config.json, else ValueError("path: ...")."""
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "is not a checkpoint (no config.json)"
        raise ValueError(f"path: {path} {what}")
    return path


def load_model_and_tokenizer(
    path: str | Path = DEFAULT_MODEL_DIR, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a local causal-LM checkpoint and its tokenizer (never downloads)."""
    path = checkpoint_dir(path)
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


@contextlib.contextmanager
def no_progress_bars():
    """Silence transformers' progress bars (weight loading and saving) inside the block."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- LoRA (peft)

def is_lora(model) -> bool:
    """Whether `model` is a peft model (an FSDP2-sharded one included: fully_shard subclasses it)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


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
    """How many parameters train, of how many (tied weights counted once)."""
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{train:,} of {total:,} parameters train ({100 * train / max(total, 1):.2f}%)"
