#!/usr/bin/env bash
# Everything a lent GPU has to check and time, in two calls of at most 10 minutes each (a session
# has 15 minutes of device time, start included). Run from the repository root on the GPU machine:
#
#   bash bench/gpu_session.sh kernels   # GPU tests of the Triton path, kernel bench, rollouts (<= 9.5 min)
#   bash bench/gpu_session.sh e2e       # one update per loss path, checkpointing, FSDP2 (<= 8.5 min)
#
# The GPU image lacks liger-kernel: carry its wheel in .whl/ (git-ignored through
# .git/info/exclude), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
# Logs and JSON go to $OUT (bench/out without it). Every stage has its own time limit, so a slow
# stage costs its own results only. Rollouts decode 256 new tokens, the reference anchor's length.
# Paste the printed tables into bench/RESULTS.md with the date and the card.
set -uo pipefail
part=${1:?"usage: bash bench/gpu_session.sh kernels|e2e"}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}

case "$part" in
kernels)
    # the Triton kernels against float64 on the GPU (compiled, not interpreted), and the engine
    stage tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_loss.py tests/test_kernels.py tests/test_api.py
    stage engine_tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine.py -k "not torchrun"
    stage gpu_bench 120 python3 bench/gpu_bench.py --quick --out "$OUT/gpu_bench.json"
    stage rollout 150 python3 bench/rollout.py --batch 8 32 --new-tokens 256 --out "$OUT/rollout.json"
    ;;
e2e)
    stage e2e 240 python3 bench/e2e_step.py --batch 4 8 16 --ckpt off --steps 2 --out "$OUT/e2e.json"
    stage e2e_ckpt 150 python3 bench/e2e_step.py --batch 8 16 32 --ckpt on --steps 2 --paths fastsd liger_fljsd \
        --out "$OUT/e2e_ckpt.json"
    # the fused loss's workspace (default 512 MB of fp32 logits) against liger's smaller chunks
    FASTSD_WORKSPACE_MB=128 stage e2e_ws128 60 python3 bench/e2e_step.py --paths fastsd --batch 4 8 --ckpt off \
        --steps 2 --out "$OUT/e2e_ws128.json"
    stage e2e_fsdp 90 torchrun --nproc_per_node 1 bench/e2e_step.py --fsdp --paths fastsd --batch 4 --ckpt off \
        --steps 2 --out "$OUT/e2e_fsdp.json"
    ;;
*)
    echo "unknown part: $part (kernels or e2e)"
    exit 2
    ;;
esac
