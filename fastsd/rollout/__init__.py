"""The step's rollout stage: the student samples responses to its prompts, which are parsed and
rewarded.

    rollouts.py     `rollout` (entry point): k samples per question as `Rollout` records
    sample.py       `sample`: token ids in, sampled token ids out, through one of the engines
    engine.py       fastsd's static-KV-cache engine with a fused decode step
    decode.py       the eager decode step written out for the Llama layout
    vllm_engine.py  vLLM in the trainer's process, the policy's weights pushed in place
"""

from .rollouts import Rollout, rollout
from .sample import sample

__all__ = ["Rollout", "rollout", "sample"]
