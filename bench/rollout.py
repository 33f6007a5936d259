"""Rollout speed: new tokens/s of transformers `generate` and of fastsd's RolloutEngine, same model,
same prompts, in one run (a short warm-up call per path and batch, which compiles the engine's
step for that shape, is excluded from the timing and reported apart).

    python bench/rollout.py                                   # GPU: Qwen2.5-1.5B shape, bf16, random weights
    python bench/rollout.py --batch 8 32 --new-tokens 512     # shorter
    python bench/rollout.py --cpu-smoke                       # tiny model on the CPU, a few tokens

Every sequence runs the full `--new-tokens` (no EOS can end it early: generate gets
min_new_tokens, the engine an EOS id that is never sampled), sampling at temperature 1.1. Out of
memory is recorded, not fatal. Prints a markdown table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastsd.engine import RolloutEngine  # noqa: E402

QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1e6, rms_norm_eps=1e-6)


def build(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if args.cpu_smoke:
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=300, max_position_embeddings=512)
        dtype, device = torch.float32, "cpu"
    else:
        cfg = Qwen2Config(**QWEN_1_5B)
        dtype, device = torch.bfloat16, "cuda"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialised there: no host copy
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval(), device


def time_path(path, lm, engine, prompts, new_tokens, device, warm_up: bool = False) -> float:
    """Seconds for one call of `path` ("generate" or "fastsd"). A warm-up call decodes 16 tokens
    only; for the engine with the full cache shape, so the timed call reuses its compiled step."""
    V = lm.config.vocab_size
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        if path == "generate":
            ids = torch.tensor(prompts, device=device)
            n = min(new_tokens, 16) if warm_up else new_tokens
            lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.1,
                        top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, eos_token_id=V - 1, pad_token_id=0)
        else:
            engine.generate(prompts, max_new_tokens=new_tokens, temperature=1.1, eos_id=-1, pad_id=0,
                            all_done=(lambda finished: True) if warm_up else None)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--paths", nargs="+", choices=["generate", "fastsd"], default=["generate", "fastsd"])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script, not speed)")
    ap.add_argument("--out", default=os.path.join("bench", "out", "rollout.json"))
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.batch, args.prompt_len, args.new_tokens = [2, 4], 16, 8
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: use --cpu-smoke")
    lm, device = build(args)
    engine = RolloutEngine(lm)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "shape": "tiny" if args.cpu_smoke else "Qwen2.5-1.5B", "dtype": str(lm.dtype)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(1, lm.config.vocab_size - 1, (batch, args.prompt_len), generator=g).tolist()
        for path in args.paths:
            row = {"path": path, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
            try:
                warm = time_path(path, lm, engine, prompts, args.new_tokens, device, warm_up=True)
                row["warm_up_s"] = warm  # for the engine: compiling and recording this shape
                secs = time_path(path, lm, engine, prompts, args.new_tokens, device)
                row.update(status="ok", seconds=secs, tokens_per_s=batch * args.new_tokens / secs)
            except Exception as e:  # noqa: BLE001 - out of memory or a failure: recorded, the next row runs
                oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
                row.update(status="OOM" if oom else f"error: {type(e).__name__}: {str(e)[:300]}")
                if device == "cuda":
                    torch.cuda.empty_cache()
            if path == "fastsd":
                row["compiled"] = engine.compile  # False: the engine fell back to eager decoding
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:  # after every row: a time limit keeps what was done
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta['date']}, {meta['device']}, {meta['shape']} {meta['dtype']}, prompts {args.prompt_len}, "
          f"{args.new_tokens} new tokens, temperature 1.1\n")
    print("| batch | generate tok/s | fastsd tok/s | speed-up |\n|---|---|---|---|")
    for batch in args.batch:
        r = {x["path"]: x for x in rows if x["batch"] == batch}
        fmt = lambda x: f"{x['tokens_per_s']:,.0f}" if x and x["status"] == "ok" else (x or {}).get("status", "-")  # noqa: E731
        gen, ours = r.get("generate"), r.get("fastsd")
        up = (f"{ours['tokens_per_s'] / gen['tokens_per_s']:.1f}x"
              if gen and ours and gen["status"] == ours["status"] == "ok" else "-")
        print(f"| {batch} | {fmt(gen)} | {fmt(ours)} | {up} |")
    if "fastsd" in args.paths:
        print(f"\nengine step compiled{' (CUDA graphs)' if device == 'cuda' else ''}: {engine.compile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
