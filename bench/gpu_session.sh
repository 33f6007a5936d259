#!/usr/bin/env bash
# Everything a lent GPU has to check and time, in two parts, one device call each (a call runs at
# most 10 minutes; a session has 15 minutes of device time, the machine's start included, so a
# session may only have room for one part: run them in this order). From the repository root:
#
#   bash bench/gpu_session.sh kernels   # Triton path vs float64 on the GPU, the CUDA-graph engine
#                                       # test, rollouts, kernel bench, then the loss options
#                                       # (autocast, clip, weights, entropy)      (stages <= 595 s)
#   bash bench/gpu_session.sh e2e       # one update per loss path, checkpointing, a smaller loss
#                                       # workspace, FSDP2, then fastsd-train itself for 3 steps
#                                       # (bench/train_cuda.sh)                   (stages <= 595 s)
#
# Each part's last stage came last on purpose (issue 26): if install time pushes a part past the
# call's 600 s, only that stage is cut, and what it wrote under $OUT still comes back.
#
# The GPU image lacks liger-kernel, and its setuptools may predate the `license = "..."` form of
# pyproject.toml (setuptools < 77 rejects it; the GPU machine cannot download a newer one for an
# isolated build). Carry both as wheels in .whl/ (run with carry [".whl"]; git-ignored through
# .git/info/exclude: `echo /.whl/ >> .git/info/exclude`), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5 setuptools
# They are installed into /tmp/site, which goes first on PYTHONPATH (so the editable install's
# build uses the carried setuptools).
# Output goes to $OUT (bench/out without it): one log, session.log, and each bench's JSON, written
# as it goes, so a stage stopped at its time limit keeps what it finished. Rollouts decode 256 new
# tokens, the reference anchor's length. Paste the printed tables into bench/RESULTS.md with the
# date and the card.
set -uo pipefail
part=${1:?"usage: bash bench/gpu_session.sh kernels|e2e"}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG=$OUT/session.log
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
    && python3 -c "import fastsd.loss.kernels" >>"$LOG" 2>&1 \
    || { cat "$LOG"; echo "fastsd did not install (no setuptools wheel in .whl/? see the header)"; exit 1; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    python3 -c "import liger_kernel" 2>/dev/null || echo "WARNING: liger-kernel is missing (carry .whl): its rows will say so"
} 2>&1 | tee -a "$LOG"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, appending to the log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

case "$part" in
kernels)
    stage tests 140 python3 -m pytest -q -x -p no:cacheprovider tests/loss/test_loss.py \
        tests/loss/test_logprob.py tests/loss/test_kernels.py tests/loss/test_api.py tests/loss/test_topk.py
    stage engine_cuda 100 python3 -m pytest -q -p no:cacheprovider tests/rollout/test_engine.py -k on_cuda
    stage rollout 200 python3 bench/rollout.py --batch 8 32 --new-tokens 256 --out "$OUT/rollout.json"
    stage gpu_bench 120 python3 bench/gpu_bench.py --quick --out "$OUT/gpu_bench.json" --cases fastsd_fkl fastsd_rkl \
        fastsd_jsd fastsd_logprob floor eager_fkl liger_fused_fkl liger_chunked_fkl
    stage loss_options 35 python3 -m pytest -q -x -p no:cacheprovider tests/loss/test_autocast.py \
        tests/loss/test_clip_beta.py tests/loss/test_weights_entropy.py tests/loss/test_topk_combined.py
    ;;
e2e)
    stage e2e 240 python3 bench/e2e_step.py --batch 4 8 16 --ckpt off --steps 2 --out "$OUT/e2e.json"
    stage e2e_ckpt 120 python3 bench/e2e_step.py --batch 8 16 32 --ckpt on --steps 2 --paths fastsd liger_fljsd \
        --out "$OUT/e2e_ckpt.json"
    # the fused loss's workspace (default 512 MB of fp32 logits) against liger's smaller chunks
    FASTSD_WORKSPACE_MB=128 stage e2e_ws128 60 python3 bench/e2e_step.py --paths fastsd --batch 4 8 --ckpt off \
        --steps 2 --out "$OUT/e2e_ws128.json"
    stage e2e_fsdp 90 python3 -m torch.distributed.run --standalone --nproc_per_node 1 bench/e2e_step.py --fsdp \
        --paths fastsd --batch 4 --ckpt off --steps 2 --out "$OUT/e2e_fsdp.json"
    KEEP="$OUT/train_cuda" stage train_cuda 85 bash bench/train_cuda.sh /tmp/fastsd-train-cuda
    ;;
*)
    echo "unknown part: $part (kernels or e2e)"
    exit 2
    ;;
esac
