"""Rollout speed: new tokens/s of transformers `generate`, fastsd's RolloutEngine and vLLM, same
model, same prompts, in one run (a short warm-up call per path and batch, which compiles the
engine's step for that shape, is excluded from the timing and reported apart).

    python bench/rollout.py                                   # GPU: Qwen2.5-1.5B shape, bf16, random weights
    python bench/rollout.py --batch 8 32 --new-tokens 512     # shorter
    python bench/rollout.py --model builtin llama10m --batch 16 64 --prompt-len 32 --new-tokens 128
                                                              # CPU: the shipped model, a 10M Llama
    python bench/rollout.py --model builtin --batch 16 192 --prompt-len 64 --new-tokens 256 \
        --paths generate fastsd fastsd-compiled             # CPU: eager against compiled decode steps
    python bench/rollout.py --model builtin --batch 16 192 --prompt-len 64 --new-tokens 256 \
        --paths generate fastsd-forward fastsd-eager      # CPU: the written step against transformers' forward
    python bench/rollout.py --cpu-smoke                       # tiny model on the CPU, a few tokens

Every sequence runs the full `--new-tokens` (no EOS can end it early: generate gets
min_new_tokens, the engine an EOS id that is never sampled, vLLM ignore_eos), sampling at
temperature 1.1. vLLM (`fastsd.rollout.vllm_engine`, where installed) loads the model from a folder and
is pushed the weights in place once per batch (`push_s`, not in the timing). Out of memory is
recorded, not fatal. Prints a markdown table per model and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastsd.rollout.engine import RolloutEngine  # noqa: E402
from fastsd.rollout.vllm_engine import hf_weights  # noqa: E402

QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1e6, rms_norm_eps=1e-6)


LLAMA_10M = dict(hidden_size=320, num_hidden_layers=8, num_attention_heads=5, num_key_value_heads=5,
                 intermediate_size=896, max_position_embeddings=1024, head_dim=64)  # 10.2M parameters


def build(name: str, folder: str):
    """(model, device, folder vLLM can load: the shipped one, or `folder` written with the
    shipped tokenizer where the vocabulary fits it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from fastsd.model.load import DEFAULT_MODEL_DIR, load_model_and_tokenizer, tiny_config

    if name == "builtin":
        lm, _ = load_model_and_tokenizer(DEFAULT_MODEL_DIR, dtype=torch.float32)
        return lm.eval(), "cpu", str(DEFAULT_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    if name == "smoke":
        cfg, dtype, device = tiny_config(len(tok), hidden_size=64, num_hidden_layers=2), torch.float32, "cpu"
    elif name == "llama10m":
        cfg, dtype, device = tiny_config(len(tok), **LLAMA_10M), torch.float32, "cpu"
    else:
        cfg, dtype, device = Qwen2Config(**QWEN_1_5B), torch.bfloat16, "cuda"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialised there: no host copy
        lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    lm.save_pretrained(folder)
    if cfg.vocab_size == len(tok):
        tok.save_pretrained(folder)
    return lm, device, folder


def time_path(path, lm, engine, prompts, new_tokens, device, warm_up: bool = False) -> float:
    """Seconds for one call of `path` ("generate", "fastsd" or "vllm", whose `engine` is then a
    VllmEngine). A warm-up call decodes 16 tokens only; for fastsd's engine with the full cache
    shape, so the timed call reuses its compiled step."""
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
        elif path == "vllm":
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(temperature=1.1, max_tokens=min(new_tokens, 16) if warm_up else new_tokens,
                                    ignore_eos=True, detokenize=False)
            outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs)
        else:  # fastsd's engine, eager or compiled
            engine.generate(prompts, max_new_tokens=new_tokens, temperature=1.1, eos_id=-1, pad_id=0,
                            all_done=(lambda finished: True) if warm_up else None)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def vllm_engine(lm, device, folder):
    """A VllmEngine on `folder`, or the reason there is none (a string)."""
    from fastsd.model.dist import Dist
    from fastsd.rollout.vllm_engine import VllmEngine, unusable

    if unusable() is not None:
        return unusable()
    try:
        return VllmEngine(folder, Dist(device=torch.device(device)), dtype=lm.dtype, seed=0,
                          kv_cache_gib=2.0 if device == "cpu" else None, gpu_memory=0.5, eager=device == "cpu",
                          text=False)  # the Qwen shape's folder has no tokenizer
    except Exception as e:  # noqa: BLE001 - recorded in every vllm row
        return f"{type(e).__name__}: {str(e)[:300]}"


def run_model(name, args, meta, rows, folder) -> None:
    lm, device, folder = build(name, folder)
    engines = {"fastsd": RolloutEngine(lm)} if "fastsd" in args.paths else {}  # the device's default: eager on CPUs
    if "fastsd-compiled" in args.paths:  # the CPU's question: does a compiled decode step beat eager there?
        engines["fastsd-compiled"] = RolloutEngine(lm, compile=True)
    if "fastsd-eager" in args.paths:  # the written step (fastsd.rollout.decode) where the model fits it
        engines["fastsd-eager"] = RolloutEngine(lm, compile=False)
    if "fastsd-forward" in args.paths:  # eager through transformers' forward on a static cache
        engines["fastsd-forward"] = RolloutEngine(lm, compile=False, written_step=False)
    if "vllm" in args.paths:
        engines["vllm"] = vllm_engine(lm, device, folder)
    params = sum(p.numel() for p in lm.parameters())
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, lm.config.vocab_size - 1, (batch, args.prompt_len), generator=g).tolist()
        for path in args.paths:
            row = {"model": name, "params": params, "path": path, "batch": batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens}
            engine = engines.get(path)
            try:
                if isinstance(engine, str):
                    raise RuntimeError(engine)
                if path == "vllm":
                    t0 = time.perf_counter()
                    engine.push(hf_weights(lm))
                    row["push_s"] = time.perf_counter() - t0
                warm = time_path(path, lm, engine, prompts, args.new_tokens, device, warm_up=True)
                row["warm_up_s"] = warm  # for the engine: compiling and recording this shape
                secs = time_path(path, lm, engine, prompts, args.new_tokens, device)
                row.update(status="ok", seconds=secs, tokens_per_s=batch * args.new_tokens / secs)
            except Exception as e:  # noqa: BLE001 - out of memory or a failure: recorded, the next row runs
                oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
                row.update(status="OOM" if oom else f"error: {type(e).__name__}: {str(e)[:300]}")
                if device == "cuda":
                    torch.cuda.empty_cache()
            if path.startswith("fastsd"):
                row["compiled"] = engine.compile  # False: the engine fell back to eager decoding
                row["written_step"] = engine.written_step and not engine.compile
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:  # after every row: a time limit keeps what was done
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta['date']}, {meta['device']}, {name} ({params / 1e6:.2f}M parameters, {lm.dtype}), "
          f"prompts {args.prompt_len}, {args.new_tokens} new tokens, temperature 1.1\n")
    print("| batch | " + " | ".join(f"{p} tok/s" for p in args.paths) + " | vs generate |")
    print("|---" * (len(args.paths) + 2) + "|")
    fmt = lambda x: f"{x['tokens_per_s']:,.0f}" if x and x["status"] == "ok" else (x or {}).get("status", "-")[:60]  # noqa: E731
    for batch in args.batch:
        r = {x["path"]: x for x in rows if x["batch"] == batch and x["model"] == name}
        gen = r.get("generate")
        ups = [f"{p} {r[p]['tokens_per_s'] / gen['tokens_per_s']:.1f}x" for p in args.paths
               if p != "generate" and gen and gen["status"] == r[p]["status"] == "ok"]
        print(f"| {batch} | " + " | ".join(fmt(r.get(p)) for p in args.paths) + f" | {', '.join(ups) or '-'} |")
    for path in [p for p in args.paths if p.startswith("fastsd")]:
        print(f"\n{path}: step compiled{' (CUDA graphs)' if device == 'cuda' else ''}: {engines[path].compile}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", choices=["qwen1.5b", "builtin", "llama10m"], default=["qwen1.5b"],
                    help="qwen1.5b (CUDA); builtin (the shipped model) and llama10m run on the CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--paths", nargs="+",
                    choices=["generate", "fastsd", "fastsd-compiled", "fastsd-eager", "fastsd-forward", "vllm"],
                    default=["generate", "fastsd", "vllm"],
                    help="fastsd: the engine as the trainer runs it (compiled on CUDA, eager on CPUs); "
                         "fastsd-compiled: its step compiled whatever the device; fastsd-eager: eager, the written "
                         "step where the model has its layout; fastsd-forward: eager, transformers' forward")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script, not speed)")
    ap.add_argument("--out", default=os.path.join("bench", "out", "rollout.json"))
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.model, args.batch, args.prompt_len, args.new_tokens = ["smoke"], [2, 4], 16, 8
    elif "qwen1.5b" in args.model and not torch.cuda.is_available():
        ap.error("no CUDA device for --model qwen1.5b: use --model builtin llama10m, or --cpu-smoke")
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model:
            run_model(name, args, meta, rows, os.path.join(tmp, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
