r"""The built-in tiny model (a character-level tokenizer, a tiny Llama config) and loading.

The shipped checkpoint (`DEFAULT_MODEL_DIR`) is made by `tools/make_tiny_model.py`: a ~0.49M
parameter Llama warm-started on the arithmetic task's train split so that it knows the response
format, still makes step errors, and has learned to follow a critique or a reference in context.

Tokenizer: one token per character. Every printable ASCII character and "\n" is a token; any
other character is `<unk>`. Specials: `<pad>`, `<eos>`, `<unk>`. Calling the tokenizer adds
**no** BOS/EOS: callers append `eos_token_id` to a response themselves.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHARS", "DEFAULT_MODEL_DIR", "build_tokenizer", "tiny_config", "checkpoint_dir",
           "load_model_and_tokenizer", "no_progress_bars"]

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
