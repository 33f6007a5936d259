r"""A stand-in for a real chat model, built at test time: nothing is downloaded.

    from standin import build_standin, write_math_data
    path = build_standin(tmp_dir)        # a checkpoint directory: fastsd-train model=PATH loads it
    train, test = write_math_data(tmp_dir)   # jsonl files of LaTeX-answer questions

    python tests/standin.py MODEL_DIR DATA_DIR   # the same by hand (data under OpenMathReasoning's column names)

The model is a tiny random `Qwen3ForCausalLM` shaped like Qwen3-1.7B in what matters to fastsd
(tied embeddings, explicit head_dim, grouped KV heads). Its tokenizer is a byte-level BPE trained
here with `tokenizers` on a few kilobytes of text, with Qwen2's pre-tokenizer and normaliser, so
it loads through `AutoTokenizer` as `Qwen2Tokenizer` exactly as a Qwen3 checkpoint's does. Its
chat template is a small Jinja template in Qwen3's style: `<|im_start|>role\n...<|im_end|>\n`
turns, and `enable_thinking=false` puts an empty `<think>\n\n</think>\n\n` block in the
generation prompt. EOS is `<|im_end|>`, padding `<|endoftext|>`, as in Qwen3.

tests/conftest.py's session-scoped fixtures `standin` (the checkpoint directory) and `math_data`
(the (train, test) jsonl paths) build each once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

__all__ = ["CHAT_TEMPLATE", "SPECIALS", "build_tokenizer", "build_standin", "math_examples", "write_math_data"]

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
THINK = ("<think>", "</think>")  # added, not special: they survive decode(skip_special_tokens=True), as in Qwen3
# Qwen2's pre-tokenizer (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# (question, answer, reference solution): answers in LaTeX, decimals, negatives, integers.
_FRACTIONS = [(3, 4), (2, 3), (5, 8), (1, 6), (7, 9), (4, 5), (3, 7), (5, 6), (1, 12), (9, 10)]


def math_examples() -> list[dict]:
    """48 questions with LaTeX final answers (\\frac, \\sqrt, decimals, negatives, integers)."""
    out = []
    for a, b in _FRACTIONS:
        out.append({"question": f"Simplify $\\frac{{{2 * a}}}{{{2 * b}}}$.", "answer": f"\\frac{{{a}}}{{{b}}}",
                    "reference_solution": f"Divide numerator and denominator by 2.\n\n"
                                          f"So the answer is $\\boxed{{\\frac{{{a}}}{{{b}}}}}$."})
        out.append({"question": f"Write {a / b:.2f} rounded as a decimal with two places.", "answer": f"{a / b:.2f}",
                    "reference_solution": f"It is already {a / b:.2f}.\n\nThe answer is $\\boxed{{{a / b:.2f}}}$."})
    for n in (2, 3, 5, 6, 7, 10, 11, 13):
        out.append({"question": f"Simplify $\\sqrt{{{4 * n}}}$.", "answer": f"2\\sqrt{{{n}}}",
                    "reference_solution": f"$\\sqrt{{{4 * n}}} = \\sqrt{{4}}\\sqrt{{{n}}}$.\n\n"
                                          f"The answer is $\\boxed{{2\\sqrt{{{n}}}}}$."})
    for x in range(1, 11):
        out.append({"question": f"Solve $x + {x + 3} = 3$ for $x$.", "answer": str(-x),
                    "reference_solution": f"Subtract {x + 3} from both sides: $x = 3 - {x + 3}$.\n\n"
                                          f"The answer is $\\boxed{{{-x}}}$."})
        out.append({"question": f"What is ${x} \\times {x + 1}$?", "answer": str(x * (x + 1)),
                    "reference_solution": f"${x} \\times {x + 1} = {x * (x + 1)}$.\n\nThe answer is $\\boxed{{{x * (x + 1)}}}$."})
    return out


def _corpus() -> list[str]:
    """Text to train the tokenizer on: the data, chat turns and some prose."""
    rows = math_examples()
    texts = [f"{r['question']}\n{r['reference_solution']}\n" for r in rows]
    texts += [f"{IM_START}user\n{r['question']}{IM_END}\n{IM_START}assistant\n" for r in rows]
    texts += ["Let me think step by step. First, we simplify the expression. Then we check the answer.\n\n"
              "Therefore, the final answer is $\\boxed{42}$. Since x > 0 and y < 1, the bound holds.\n"] * 4
    return texts


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's normaliser and pre-tokenizer, trained on `_corpus()`."""
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_corpus(), trainer=trainer)
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_END, pad_token=ENDOFTEXT,
                                  clean_up_tokenization_spaces=False, model_max_length=4096)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_standin(path: str | Path, *, seed: int = 0, head_dim: int = 32, dtype: torch.dtype = torch.float32,
                  **shape) -> Path:
    """Write the stand-in checkpoint (model, tokenizer, chat template) to `path`; returns it.
    `shape`: Qwen3Config fields overriding the tiny shape (bench/random_qwen3.py builds a ~0.5B
    one; a `vocab_size` above the tokenizer's leaves rows no text maps to, as Qwen3's has)."""
    path = Path(path)
    tok = build_tokenizer()
    fields = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024)
    config = Qwen3Config(
        **{**fields, **shape}, tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # As a Qwen3 checkpoint's tokenizer_config.json does: AutoTokenizer builds Qwen2Tokenizer.
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_file.write_text(json.dumps(tok_cfg, indent=2))
    return path


def write_math_data(directory: str | Path, fields: dict[str, str] | None = None) -> tuple[Path, Path]:
    """train.jsonl (the first 36 questions) and test.jsonl (the other 12) in `directory`.

    `fields` renames the columns, e.g. {"question": "problem", "answer": "expected_answer",
    "reference_solution": "generated_solution"} writes OpenMathReasoning's names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = math_examples()
    names = {k: (fields or {}).get(k, k) for k in ("question", "answer", "reference_solution")}
    out = []
    for name, part in (("train.jsonl", rows[:36]), ("test.jsonl", rows[36:])):
        p = directory / name
        p.write_text("".join(json.dumps({names[k]: v for k, v in r.items()}) + "\n" for r in part))
        out.append(p)
    return out[0], out[1]


if __name__ == "__main__":  # python tests/standin.py MODEL_DIR DATA_DIR: build both by hand
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python tests/standin.py MODEL_DIR DATA_DIR")
    print(build_standin(sys.argv[1]))
    print(*write_math_data(sys.argv[2], {"question": "problem", "answer": "expected_answer",
                                         "reference_solution": "generated_solution"}))
