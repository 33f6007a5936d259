"""A run's bookkeeping: what is checked before the model loads, what the run is built from, the
run directory's logs and its checkpoints.

    preflight.py           `preflight` (entry point): every check that needs no model, first
    prompt_fit.py          questions whose prompt plus max_new_tokens is past the model's positions
    build.py               models, optimizer and critic from the config
    run_dir.py             config.yaml, metrics.jsonl, rollouts.jsonl; log lines, Ctrl-C
    progress.py            the step bar or heartbeat lines, and each evaluation's progress
    checkpoint.py          resumable checkpoints (one process or FSDP2): what is saved and loaded
    checkpoint_files.py    the checkpoint folders on disk: found, published atomically, pruned
    checkpoint_check.py    a checkpoint read back before a resume: its damaged file; resume=auto falls back
    adapter_checkpoint.py  the LoRA pieces of a checkpoint
    stop.py                SIGTERM and SIGHUP: stop at a consistent point, save the last completed step
    lock.py                one writer per run directory: run.lock, taken before the model loads
    openmp.py              OpenMP's wait policy: passive on a busy machine, set before torch loads
    trackers.py            log.report_to: TensorBoard, W&B, trackio get the config and every metrics row
"""

# Nothing imported here: its modules range from the stdlib alone (checkpoint_files) to the whole
# model stack (build), and importing one must not load the others.
