"""One dataclass tree for `fastsd-train`: every key, its default and its docstring.

    fastsd-train --config run.yaml condition=reference optim.lr=3e-4 teacher=ema

A bare section name set to a string sets that section's main field: `model=PATH` is
`model.path=PATH`, `data=PATH` is `data.path`, `teacher=ema` is `teacher.kind`, `critic=http`
is `critic.kind`, `loss=sampled_token` is `loss.kind`, `eval=off` is `eval.enabled` (booleans
read true/false, on/off, yes/no, 1/0). Unknown keys and bad values raise ValueError naming the key.

The tree is here; loading (YAML files, overrides) is in `fastsd.config.load`, turning values into
field types and setting dotted keys in `fastsd.config.parse`, validation in `fastsd.config.check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..feedback.prompts import (
    CONTEXT_TEMPLATE,
    CRITIQUE_TEMPLATE,
    PEER_FEEDBACK_TEMPLATE,
    PEER_TEMPLATE,
    REFERENCE_TEMPLATE,
    STUDENT_TEMPLATE,
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    main: ClassVar[str] = "r"
    r: int = 0
    """LoRA rank (peft); 0 trains every weight (full fine-tuning). The paper: 64."""
    alpha: float | None = None
    """LoRA scale numerator (the update is alpha / r * B A); none: 2 * r (the paper's 128 at r=64)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (teachers run without it)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names to adapt (a module matches by its last name parts, as in peft): by default the
    attention and MLP projections. The lm_head and embeddings cannot be adapted (the fused loss
    reads the base head weight)."""
    path: str = ""
    """An existing PEFT adapter folder to start from (its r, alpha, dropout and target modules are
    used); empty: a fresh adapter (B = 0, so step 0 is the base model)."""


@dataclass
class ModelConfig:
    main: ClassVar[str] = "path"
    path: str = "builtin"
    """Local transformers causal-LM checkpoint (with its tokenizer); "builtin" is the shipped tiny model."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter and compute dtype: auto is bf16 mixed precision on CUDA, fp32 on CPUs."""
    liger: bool = True
    """On CUDA, apply liger-kernel's RMSNorm/RoPE/SwiGLU kernels where the architecture allows."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward (less memory, ~30% more compute)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train a LoRA adapter instead of every weight (see LoraConfig)."""


@dataclass
class FieldsConfig:
    question: str = "question"
    """Column (jsonl key or parquet column) holding the question, e.g. OpenMathReasoning's problem."""
    answer: str = "answer"
    """Column holding the ground-truth final answer (text or a number), e.g. expected_answer."""
    reference_solution: str = "reference_solution"
    """Column holding a worked solution, e.g. generated_solution: required with condition=reference
    (the teacher's context); otherwise optional per record (the http critic shows it when present);
    empty: no such column."""
    context: str = ""
    """Column holding a context for the teacher, e.g. a hint, a demonstration or a rubric: required
    with condition=context (read through templates.context), otherwise not read; empty: none."""


@dataclass
class DataConfig:
    main: ClassVar[str] = "path"
    path: str = "builtin"
    """Training questions: a jsonl or .parquet file, a glob or folder of such shards, a
    datasets.save_to_disk folder or a Hugging Face dataset name (docs/datasets.md); columns:
    data.fields; "builtin" is the arithmetic task."""
    eval_path: str = "builtin"
    """Held-out questions (same forms); "builtin" is the arithmetic task's held-out split."""
    split: str = "train"
    """data.path as a Hugging Face dataset name, or a save_to_disk folder of several splits: the split to train on."""
    eval_split: str = "test"
    """data.eval_path as a Hugging Face dataset name, or a save_to_disk folder of several splits: its split."""
    subset: str = ""
    """data.path and data.eval_path as Hugging Face dataset names: the subset (configuration); empty: the default."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    """Which columns of data.path and data.eval_path hold each field."""
    train_size: int = 2000
    """Built-in task: number of training questions."""
    eval_size: int = 128
    """Built-in task: number of held-out questions."""
    seed: int = 0
    """Built-in task: generator seed (also fixes the split)."""
    task: Literal["long", "short"] = "long"
    """Built-in task: long (9-12 operands, a reference in two-operation steps; the shipped model's)
    or short (3-5 operands, a regrouped reference; the task before 2026-12-01). See
    fastsd/tasks/arith.py."""
    too_long: Literal["error", "skip"] = "error"
    """A question whose rendered prompt plus rollout.max_new_tokens is past the model's positions
    (max_position_embeddings): error stops before the model loads, naming file and line; skip
    leaves such questions out, with a warning that counts them."""


@dataclass
class TemplateConfig:
    student: str = STUDENT_TEMPLATE
    """Student prompt; fields: {question}. Only the fields are replaced: other braces, as in
    \\boxed{}, are kept as written."""
    reference: str = REFERENCE_TEMPLATE
    """Teacher prompt for condition=reference; fields: {question}, {reference}."""
    critique: str = CRITIQUE_TEMPLATE
    """Teacher prompt for condition=critique; fields: {question}, {critique}."""
    chat: Literal["auto", "on", "off"] = "auto"
    """Render prompts through the tokenizer's chat template (the filled template is the user turn):
    auto, when the tokenizer has one (the built-in model has none); on, required; off, never."""
    student_chat_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the student's apply_chat_template, e.g. {enable_thinking: false}."""
    teacher_chat_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the teacher's apply_chat_template, e.g. {enable_thinking: true}."""
    student_system: str = ""
    """System message before the student's user turn (chat template only; empty: none)."""
    teacher_system: str = ""
    """System message before the teacher's user turn (chat template only; empty: none)."""
    context: str = CONTEXT_TEMPLATE
    """Teacher prompt for condition=context; fields: {question}, {context} (the record's
    data.fields.context column)."""


@dataclass
class RolloutConfig:
    temperature: float = 1.1
    """Sampling temperature for on-policy rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off)."""
    max_new_tokens: int = 384
    """Longest response, in tokens."""
    group_size: int = 0
    """Rollouts per question; 0 picks the method's default (8 for grpo, 1 for self-distillation)."""
    engine: Literal["auto", "vllm", "fastsd", "generate"] = "auto"
    """Sampler: vllm (a vLLM engine in this process, given the policy's weights before each
    sampling), fastsd (static KV cache, a decode step with fused sampling: compiled on CUDA, eager
    on CPUs), generate (transformers); auto: on CUDA vllm where it is installed and usable, else
    fastsd; on CPUs fastsd (vllm and generate are slower there on the built-in model:
    docs/rollouts.md). The log says which sampler runs."""
    vllm_kv_cache_gib: float | None = None
    """vllm: KV-cache space in GiB; null: 1 on a CPU, on CUDA what vllm_gpu_memory leaves."""
    vllm_gpu_memory: float = 0.3
    """vllm on CUDA: its share of the device's memory (weights, activations, KV cache); the rest
    is the trainer's."""
    vllm_eager: bool | None = None
    """vllm: no compilation or CUDA graphs (starts in seconds; compiled takes minutes on a CPU);
    null: eager on a CPU, compiled on CUDA."""
    stop_at_answer: bool = False
    """Stop a response at the end of its answer tag, not only at EOS (the EOS token is then never
    sampled or trained). Matched on the tag's token ids encoded alone: exact for the built-in
    character tokenizer; a BPE tokenizer may merge the tag with what follows and miss it. vllm
    matches the decoded text, which no merge can hide."""


@dataclass
class LossConfig:
    main: ClassVar[str] = "kind"
    kind: Literal["divergence", "sampled_token"] = "divergence"
    """Self-distillation loss: the divergence (full vocabulary, or top-k: loss.topk), or
    -(A_t.detach() * log p_s(y_t))."""
    divergence: Literal["auto", "forward_kl", "reverse_kl", "jsd"] = "auto"
    """Divergence between teacher and student next-token distributions: forward_kl KL(p_t || p_s),
    reverse_kl KL(p_s || p_t), jsd. auto: forward_kl (the paper's), except reverse_kl for the
    built-in tiny model (model=builtin), which forward KL collapses (docs/training.md, "Why reverse KL")."""
    temperature: float = 1.0
    """Temperature applied to both heads' logits inside the loss."""
    clip: float | None = None
    """Clamp each per-vocabulary summand of the divergence at this value (OPSD uses 0.05)."""
    beta: float = 0.5
    """jsd only: mixture weight of the teacher, in [0, 1] (0: forward_kl, 1: reverse_kl)."""
    pg_clip: float = 0.2
    """grpo: PPO-style ratio clip epsilon."""
    pg_weight: float = 0.0
    """A teacher condition's blend w in [0, 1]: the step's loss is (1 - w) * the distillation loss +
    w * grpo's clipped policy gradient on the group advantages, each a token mean of the step. 0:
    self-distillation alone; 1: grpo's step (the teacher is not asked). Needs rollout.group_size >= 2."""
    topk: int = 0
    """Top-k divergence: over each position's `topk` tokens with the largest logits of loss.topk_from,
    renormalised or with a tail (loss.tail); 0: the full vocabulary. With it loss.clip takes any
    divergence, clamping each category's summand (docs/loss.md, "Top-k"). At most the model's
    vocabulary (checked before the model loads)."""
    topk_from: Literal["teacher", "student"] = "teacher"
    """loss.topk: whose logits pick the tokens (OPSD: the teacher's)."""
    tail: bool = True
    """loss.topk: keep the rest of each side's probability as one more category (true), or renormalise
    over the top-k tokens (false)."""
    is_clip: float | None = None
    """Importance-sampling correction between the sampler's and the trainer's log-probs of the
    sampled tokens: each token's loss and gradient times min(exp(trainer - sampler), is_clip),
    detached (TRL's distillation_is_clip uses 2.0). None: off."""


@dataclass
class TeacherConfig:
    main: ClassVar[str] = "kind"
    kind: Literal["initial", "current", "ema"] = "initial"
    """initial: frozen step-0 weights; current: the live model without gradient; ema: an average."""
    ema_rate: float = 0.99
    """ema: teacher <- rate * teacher + (1 - rate) * student after every optimizer step."""


@dataclass
class CriticConfig:
    main: ClassVar[str] = "kind"
    kind: Literal["builtin", "http"] = "builtin"
    """Who writes the step-aligned critique (condition=critique): builtin, the programmatic critic of
    the arithmetic task, or http, a frozen LLM behind an OpenAI-compatible server."""
    base_url: str = "http://127.0.0.1:8100/v1"
    """http: the server's API root (requests go to {base_url}/chat/completions)."""
    model: str = ""
    """http: the served model name; empty asks {base_url}/models and takes the only one listed."""
    api_key_env: str = "FASTSD_CRITIC_API_KEY"
    """http: name of the environment variable holding the API key (sent as a bearer token if set)."""
    timeout: float | None = None
    """http: seconds one request may take, reply included; null: 30 + max_tokens / 40 (235 s at
    8192 tokens), set when the config loads."""
    step_timeout: float | None = None
    """http: seconds all critiques of one optimizer step may take, retries and Retry-After waits
    included; past it the rest fail (their rollouts get no loss); null: twice timeout."""
    concurrency: int = 32
    """http: requests in flight at once, per process (the server batches them)."""
    retries: int = 4
    """http: retries after a connection error, timeout, 408, 429 or 5xx (other 4xx are final); a
    Retry-After header (seconds or an HTTP date) is waited for, within step_timeout."""
    backoff: float = 1.0
    """http: first retry delay in seconds; doubles per retry (at most 32x), with jitter."""
    max_tokens: int = 8192
    """http: reply length limit, thinking included (reasoning critics such as QwQ may need more;
    a reply cut off here counts as invalid)."""
    max_reply_bytes: int | None = None
    """http: largest reply body read, in bytes; a larger one fails its critique; null: 64 KiB + 32
    bytes per max_tokens (320 KiB at 8192), set when the config loads."""
    max_failed_steps: int = 3
    """http or builtin: after this many consecutive steps in which every critique failed, the run
    stops (exit 2) with the last step's reasons, after saving a checkpoint; 0: never."""
    prompt_file: str = ""
    """http: a text file with the critic's instructions (empty: the built-in faithful-scribe ones for
    the response format). Without fields it is the system message, before fastsd's user message;
    with any of {question} {reference} {answer} {attempt} it is the whole user message, filled in."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """http: fields merged into every request body, overriding fastsd's (e.g. {top_p: 0.95, seed: 0,
    chat_template_kwargs: {enable_thinking: true}}); model, messages and stream are fastsd's."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 2
    """Linear warm-up, in optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate shape after warm-up."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    micro_batch: int = 16
    """Sequences per forward/backward; a step's rollouts are split into micro-batches (accumulation)."""


@dataclass
class EvalConfig:
    main: ClassVar[str] = "enabled"
    enabled: bool = True
    """Evaluate on the held-out questions at all (eval=off: no evaluation, for a smoke run)."""
    every: int = 0
    """Evaluate every N optimizer steps (0: only at start and end)."""
    k: int = 12
    """Samples per held-out question: avg@k, pass@k, maj@k."""
    temperature: float = 1.1
    """Sampling temperature for evaluation."""
    batch_size: int = 0
    """Samples drawn together in one sampler call (fastsd's engine, generate); 0: 256 on CUDA, and
    on a CPU as many as keep their KV cache within 1 GiB, at most 1024 (larger batches spread each
    decode step's fixed cost: docs/rollouts.md)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep: int = 2
    """Keep the last K complete checkpoints."""
    stop_timeout: float = 20.0
    """Seconds from a SIGTERM/SIGHUP within which the last completed step is saved (0: no save on a stop)."""


@dataclass
class PeerConfig:
    feedback: Literal["none", "verdict", "critique"] = "none"
    """condition=peer: feedback on the rollout's own attempt beside the demonstration: none, verdict
    (the grader's: the answer given and whether it is right), or critique (the critic's)."""
    template: str = PEER_TEMPLATE
    """condition=peer: the teacher's prompt; fields: {question}, {demonstration} (a correct sibling's
    response), {feedback} (peer.feedback_template filled in, or empty)."""
    feedback_template: str = PEER_FEEDBACK_TEMPLATE
    """condition=peer: how the feedback reads in {feedback}; fields: {feedback}."""
    success: float = 1.0
    """condition=peer: a rollout with a reward >= this is correct (a demonstration for its siblings)."""
    strip_thinking: bool = False
    """condition=peer: remove <think>...</think> (and an unclosed <think> to the end) from a demonstration."""
    max_demo_tokens: int = 0
    """condition=peer: keep a demonstration's first N tokens, and the feedback's first N (0: no bound);
    the question and the template's own text are never cut."""
    fallback: Literal["none", "reference", "critique"] = "none"
    """condition=peer: the teacher of a rollout with no correct sibling: none (no teacher, no loss;
    counted), reference (the reference solution, templates.reference) or critique (the critic's,
    templates.critique)."""


@dataclass
class LogConfig:
    main: ClassVar[str] = "report_to"
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=list)
    """Experiment trackers that get the config and every metrics.jsonl row, rank 0 only: any of
    tensorboard, wandb, trackio (extras fastsd[tensorboard], fastsd[wandb], fastsd[trackio];
    docs/trackers.md); empty: metrics.jsonl only."""
    project: str = "fastsd"
    """wandb and trackio: the project the run is logged under (the run is named after run_dir)."""
    samples: int = 4
    """Held-out questions per evaluation shown in the trackers' table of sampled responses (0: no table)."""


@dataclass
class TrainConfig:
    condition: str = "critique"
    """Feedback: grpo (binary reward), reference (teacher sees a reference solution), critique, peer
    (a correct sibling rollout), context (a data column), or a user condition module.path:Class
    (docs/conditions.md)."""
    steps: int = 60
    """Optimizer steps."""
    questions_per_step: int = 16
    """Questions per optimizer step (across all ranks)."""
    seed: int = 0
    """Seed for sampling, data order and initialisation."""
    run_dir: str = "runs/default"
    """Where the config, logs, rollouts and checkpoints go."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint in run_dir, if any; never; or a checkpoint path."""
    log_every: int = 1
    """Heartbeat/metrics line every N steps."""
    format: Literal["steps", "free"] = "steps"
    """Solver response format: steps (<step_k>...</step_k> tags then <answer>...</answer>, the
    built-in task's) or free (free-form reasoning, answer in the last \\boxed{...}, steps are its
    paragraphs); see fastsd/tasks/format.py."""
    grader: Literal["exact", "math"] = "exact"
    """Final-answer check for the reward, avg@k/pass@k/maj@k and the http critic's answer: exact
    (string match after stripping) or math (math-verify: 0.75 = 3/4 = \\frac{3}{4})."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    templates: TemplateConfig = field(default_factory=TemplateConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def group_size(self) -> int:
        return self.rollout.group_size or self.feedback_condition().group_size

    def feedback_condition(self):
        """The condition `condition` names, built (`fastsd.feedback.registry`); ValueError naming the key."""
        from ..feedback.registry import get_condition

        return get_condition(self)

    def sampler(self, device_type: str) -> str:
        """rollout.engine resolved for a device type ("cuda", "cpu"): auto is vllm on CUDA
        unless `vllm_unusable` says why not, then fastsd; fastsd (eager) on CPUs."""
        if self.rollout.engine != "auto":
            return self.rollout.engine
        if device_type != "cuda":
            return "fastsd"
        return "vllm" if self.vllm_unusable() is None else "fastsd"

    def vllm_unusable(self) -> str | None:
        """Why rollout.engine=auto does not pick vllm (None: it does)."""
        from ..rollout.vllm_engine import unusable

        return unusable()
