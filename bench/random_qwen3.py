"""A random Qwen3-shaped checkpoint of ~0.5B parameters and a small math data set, built at run
time (nothing downloaded), for bench/gpu_session.sh's `train_cuda` stage: fastsd-train itself on
CUDA for a few steps.

    python bench/random_qwen3.py --out /tmp/qwen3-0.5b --data /tmp/qwen3-data [--tiny]

The body is Qwen3-0.6B's (28 layers, width 1024, MLP 3072, 16 query and 8 KV heads of 128, tied
embeddings) with its 151936-row vocabulary: 0.60B parameters, ~0.44B outside the embeddings. The
tokenizer is tests/standin.py's byte-level BPE (~470 tokens, loaded as Qwen2Tokenizer like a
Qwen3 checkpoint's); ids past it decode to nothing, as Qwen3's padding rows do. Weights are
saved in bf16 (fastsd-train loads them as fp32 parameters under bf16 autocast on CUDA). `--tiny`
builds a 2-layer, width-64 model with the same vocabulary, to check the stage on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from standin import build_standin, write_math_data  # noqa: E402

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096)
TINY = dict(QWEN3_06B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="checkpoint directory")
    ap.add_argument("--data", required=True, help="directory for train.jsonl and test.jsonl")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same vocabulary (CPU check)")
    args = ap.parse_args()
    if torch.cuda.is_available():  # random init of 0.6B parameters: seconds on the GPU, not on the CPU
        torch.set_default_device("cuda")
    path = build_standin(args.out, dtype=torch.bfloat16, **(TINY if args.tiny else QWEN3_06B))
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)  # parameters counted from the shape (norms left out)
    per_layer = (c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
                 + 3 * c.hidden_size * c.intermediate_size)
    n = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    print(f"{path}: {n / 1e9:.2f}B parameters ({c.num_hidden_layers * per_layer / 1e9:.2f}B outside the embeddings)")
    print(*write_math_data(args.data))


if __name__ == "__main__":
    main()
