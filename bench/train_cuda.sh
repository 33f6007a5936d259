#!/usr/bin/env bash
# fastsd-train itself for a few steps, as bench/gpu_session.sh's `train_cuda` stage runs it on a
# lent GPU: a random Qwen3-shaped model of ~0.5B parameters built here (bench/random_qwen3.py),
# bf16 autocast over fp32 parameters (model.dtype=auto on CUDA), the Triton loss (the default on
# CUDA), the compiled fastsd engine, LoRA, and the importance correction (loss.is_clip, so the
# engine's log-probs of the sampled tokens are used); 3 steps on the full vocabulary, then one more
# resumed with the top-k divergence (loss.topk=64). From the repository root:
#
#   bash bench/train_cuda.sh DIR            # on the GPU
#   bash bench/train_cuda.sh DIR --tiny     # the same steps with a 2-layer model, on a CPU
#
# PYTHON (default python3) runs it. DIR gets the model (1.2 GB at full size), the data and the run
# directory; with KEEP set, the run's metrics.jsonl and config.yaml are copied there at the end.
set -euo pipefail
dir=${1:?"usage: bash bench/train_cuda.sh DIR [--tiny]"}
tiny=${2:-}
py=${PYTHON:-python3}
"$py" bench/random_qwen3.py --out "$dir/model" --data "$dir/data" $tiny
run() {
"$py" -m fastsd.cli model="$dir/model" data="$dir/data/train.jsonl" data.eval_path="$dir/data/test.jsonl" \
    condition=reference format=free grader=exact eval=off questions_per_step=4 \
    rollout.max_new_tokens=48 optim.micro_batch=4 rollout.engine=fastsd model.lora.r=16 loss.is_clip=2 \
    "templates.student_chat_kwargs={enable_thinking: false}" run_dir="$dir/run" "$@"
}
run steps=3               # the full vocabulary
run steps=4 loss.topk=64  # resumed for one more step with the top-k divergence (teacher's top 64, a tail)
"$py" - "$dir/run/metrics.jsonl" <<'PY'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"reward"' in line]
assert len(rows) == 4, rows
for r in rows:
    assert math.isfinite(r["grad_norm"]) and 0 <= r["is_clipped"] <= 1, r
    print({k: r.get(k) for k in ("step", "loss", "entropy", "is_clipped", "grad_norm", "tok_s", "time_update")})
PY
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$dir/run/metrics.jsonl" "$dir/run/config.yaml" "$KEEP/"; fi
