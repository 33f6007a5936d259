"""The model being trained: loading (the built-in tiny model or a local checkpoint), LoRA, the
FSDP2 root that runs the decoder body and the fused loss, batches, and the process group.

    load.py    the built-in tokenizer and config, `load_model_and_tokenizer` (never downloads)
    lora.py    LoRA with peft: the trained adapter and the teacher adapters beside it
    policy.py  `Policy`: decoder body + fused loss as one FSDP2 root; the adapter teacher; sharding
    batch.py   student and teacher sequences around the same response tokens
    dist.py    `Dist`: one code path for one process and for torchrun
    assets/    the shipped tiny checkpoint (tools/make_tiny_model.py rebuilds it)
"""

# Only the process group here: importing the room (its dist helpers, say) must not load
# transformers; the rest is imported from its module.
from .dist import Dist

__all__ = ["Dist"]
